"""SecureMark: trace leaked image classifiers back to the customers who leaked them.

The package is the pure core: tensors, modules and small frozen dataclasses in,
results out. Orchestration (Prefect), tracking (MLflow), params and files live in
the top-level ``flows`` package, which calls into this one.
"""

__version__ = "0.1.0"
