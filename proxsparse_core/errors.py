"""One exception type for mistakes a user can fix; the CLI and the UI show its message as is."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (no stack trace shown)."""
