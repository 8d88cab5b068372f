"""What the flows stand on: paths and settings (the project), MLflow (tracking, the model
registry, the pyfunc wrapper), Prefect (artifacts, task runners, local servers), the
vendor's private state, and report rendering. No stage logic lives here."""
