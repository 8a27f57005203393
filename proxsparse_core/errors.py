"""One exception type for mistakes a user can fix; the CLI and the UI show its message as is."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (no stack trace shown)."""


class Stopped(UserError):
    """The user pressed Stop (or Ctrl-C): the work ended early and left nothing half-done.

    The one way the project says "stopped" with an exception: pruning, perplexity, recovery and
    export raise it; the callers keep whatever finished before it."""
