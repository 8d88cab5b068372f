"""Exceptions with messages meant for the person at the terminal."""


class SecureMarkError(Exception):
    """Base class for every error SecureMark raises on purpose."""


class InvalidConfig(SecureMarkError, ValueError):
    """A configuration value that cannot work: a params entry, a plug-in's option, a
    command-line flag. Entry points exit 2 with the message; task runners never retry it."""


class UnknownName(InvalidConfig):
    """A name that no registry knows (attack, scorer, decoder, code family, transport...);
    the message lists the valid names."""


class InvalidInput(SecureMarkError, ValueError):
    """Data handed to the core that cannot be used as it is (wrong shape, NaN, empty)."""


class ConfigError(InvalidConfig):
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


class LedgerError(SecureMarkError):
    """The customer ledger refused an operation; the message says which and why."""


class LedgerFull(LedgerError):
    """Every code word of the codebook is already assigned to a customer."""


class LedgerMismatch(LedgerError):
    """An existing ledger belongs to another codebook (or capacity) than the one given."""


class InvalidCustomerId(LedgerError, ValueError):
    """A customer id that cannot be used in alias and file names."""


class SecretError(SecureMarkError):
    """The vendor secret is missing, exposed, malformed or does not match a key."""


class SecretMissing(SecretError, FileNotFoundError):
    """No vendor secret at the expected path."""


class SecretExists(SecretError, FileExistsError):
    """Refused to overwrite an existing vendor secret (it would orphan every issued copy)."""


class InsecureSecret(SecretError, PermissionError):
    """The secret file is readable or writable by group or others."""


class InvalidModel(SecureMarkError):
    """A suspicious model file that cannot be examined (not a model, wrong shapes, NaN...)."""


class ServerFailed(SecureMarkError, RuntimeError):
    """A server the project starts exited early or did not become healthy in time
    (the message names its log)."""

