"""The entry layer: the ``securemark`` command (:mod:`~flows.entry.cli`), ``make serve``
(:mod:`~flows.entry.serve`) and the pipeline driver (:mod:`~flows.entry.pipeline`). It
imports the stages and the adapters; nothing below it imports it (the wrapper every DVC
stage runs under is :mod:`flows.adapters.stage`)."""
