"""The one exception type for problems a user must fix (config, data, environment)."""


class FactftError(Exception):
    """A user-facing error: its message says what is wrong and what to change.

    Scripts show only the message (see factft.logging.to_log), never a traceback.
    """
