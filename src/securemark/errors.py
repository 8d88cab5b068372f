"""Exceptions with messages meant for the person at the terminal."""


class SecureMarkError(Exception):
    """Base class for every error SecureMark raises on purpose."""


class ConfigError(SecureMarkError, ValueError):
    """A params value that cannot work; the message names the offending key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"params.yaml: {key}: {message}")
        self.key = key


class DatasetMissingError(SecureMarkError, FileNotFoundError):
    """Fashion-MNIST is not where it was expected."""


class ValidationFailed(SecureMarkError):
    """A data validation suite failed; ``failures`` lists what failed and where."""

    def __init__(self, message: str, failures: list[dict]) -> None:
        super().__init__(message)
        self.failures = failures
