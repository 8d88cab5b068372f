"""Private split training (SplitFed style) with a privacy partition.

- :mod:`messages`: what may cross the owner/vendor boundary (features, labels, gradients).
- :mod:`defence`: the privacy partition's defence (NoPeek distance correlation, noise).
- :mod:`parties`: the data owner and the vendor's server, each holding its half.
- :mod:`transport`: how messages travel (in-process, torch.distributed gloo).
- :mod:`protocol`: the training schedule, identical whatever the transport.
"""
