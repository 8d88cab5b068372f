"""The entry layer: the ``securemark`` command (:mod:`~flows.entry.cli`), ``make serve``
(:mod:`~flows.entry.serve`) and the wrapper every DVC stage runs under
(:mod:`~flows.entry.stage`)."""
