"""User-facing errors. The CLI prints their message on one line (no traceback) and exits 2."""


class DreamboothError(Exception):
    """An error the user can fix; the message says what was expected, what was found, what to do."""


class ConfigError(DreamboothError):
    pass


class InputError(DreamboothError):
    """Bad photos or folders given by the user."""


class ModelError(DreamboothError):
    """A base model that cannot be found or read."""
