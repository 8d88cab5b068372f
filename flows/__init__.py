"""Prefect flows: the only code that reads params, touches ``data/``, logs to MLflow
and writes reports. Each flow calls the pure core in ``securemark``.

Importing this package sets quiet, project-local defaults for Prefect, DVC and Great
Expectations (only where the caller has not set them), before Prefect reads its
settings: Prefect keeps its state in ``./.prefect`` instead of the home directory, and
no tool sends analytics.
"""

import os
from pathlib import Path

_DEFAULTS = {
    "PREFECT_HOME": str(Path.cwd() / ".prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_LOGGING_LEVEL": "INFO",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)
