"""How the app talks back: one-line messages instead of stack traces, and small HTML helpers.

Every handler turns a `UserError` into its message as is, and any other exception into one
line (the full trace goes to the server log only), so a mistake never breaks the page.

Inside a request a failed handler raises `gr.Error` with that line: the page shows it as a
toast and keeps its outputs as they were, and an API client gets it as the response's
"error" (Gradio sends the message of a `gr.Error`, and hides every other exception). Called
as a plain function (tests, scripts), a handler warns instead and leaves its outputs as they are.
"""
from __future__ import annotations

import functools
import html
import inspect
import logging

import gradio as gr

from proxsparse_core.errors import UserError

log = logging.getLogger("proxsparse.ui")


def explain(exc: BaseException) -> str:
    """The one line a user sees for an exception (call inside `except`)."""
    if isinstance(exc, UserError):
        return str(exc)
    log.exception("handler failed")
    return f"unexpected error ({type(exc).__name__}: {exc}); the app is still usable"


def notify(message: str, level: str = "warning"):
    """A toast in the page (a log line when called outside a request, e.g. in tests)."""
    (gr.Info if level == "info" else gr.Warning)(message)


def in_request() -> bool:
    """True while Gradio runs an event handler (the test Gradio itself uses for toasts)."""
    from gradio.context import LocalContext

    return LocalContext.blocks.get(None) is not None and LocalContext.event_id.get(None) is not None


def fail(message: str, skip=None):
    """Report a failed request: raise gr.Error inside a request, else warn and return `skip`."""
    if in_request():
        raise gr.Error(message, print_exception=False)
    notify(message)
    return skip


def guarded(n_outputs: int):
    """Decorator for a handler (plain or generator): on error report one line (`fail`) and
    leave its `n_outputs` outputs as they are."""
    def wrap(fn):
        skip = tuple(gr.skip() for _ in range(n_outputs)) if n_outputs != 1 else gr.skip()
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    yield fail(explain(exc), skip)
            return gen

        @functools.wraps(fn)
        def plain(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                return fail(explain(exc), skip)
        return plain
    return wrap


def esc(text) -> str:
    return html.escape(str(text))


def fmt_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
