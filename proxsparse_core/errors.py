"""One exception type for mistakes a user can fix; the CLI and the UI show its message as is."""


class UserError(Exception):
    """Bad input or an unusable environment, explained in one line (no stack trace shown)."""


class SettingError(UserError):
    """A bad value of one named setting (a RunConfig field): its message is "<setting> <problem>",
    and a caller that names settings its own way (the app's widget labels) reads the two fields."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem


class Stopped(UserError):
    """The user pressed Stop (or Ctrl-C): the work ended early and left nothing half-done.

    The one way the project says "stopped" with an exception: pruning, perplexity, recovery and
    export raise it; the callers keep whatever finished before it."""
