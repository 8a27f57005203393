"""How the app talks back: one-line messages instead of stack traces, and small HTML helpers.

Every handler turns a `UserError` into its message as is, and any other exception into one
line (the full trace goes to the server log only), so a mistake never breaks the page.

Where the line goes depends on who asked. An event fired by a widget of the page shows it as a
toast and leaves its outputs as they were. A client calling an endpoint by name (gradio_client,
plain HTTP) gets `gr.Error`, whose message Gradio sends as the response's "error" (it hides
every other exception, which is how API clients used to get `{"error": null}`). A gr.Error in
the page would also cover the outputs with an "Error" pane until dismissed, hiding results
such as the perplexity table; hence the two paths. Outside a request (tests, scripts) a
handler warns, as in the page.

Some requests fail inside Gradio before any handler runs: a file field that is not the record of
a file uploaded to this server, or fewer values than the endpoint takes. `readable_requests`
turns those into one line too.
"""
from __future__ import annotations

import functools
import html
import inspect
import logging

import gradio as gr

from proxsparse_core.errors import UserError

from .inputs import shown

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


def from_page(evt) -> bool:
    """True when a widget of the page fired the event (`evt`: the handler's gr.EventData);
    False when a client called the endpoint by name (no widget triggered it)."""
    return getattr(evt, "target", None) is not None


def fail(message: str, skip=None, page: bool = False):
    """Report a failed request: an API call gets gr.Error; the page (`page`) or a plain call
    gets a toast and `skip`, so the outputs stay as they were."""
    if in_request() and not page:
        raise gr.Error(message, print_exception=False)
    notify(message)
    return skip


def guarded(n_outputs: int):
    """Decorator for a handler (plain or generator): on error report one line (`fail`) and
    leave its `n_outputs` outputs as they are. The wrapped handler takes one more keyword,
    `page` (see `from_page`)."""
    def wrap(fn):
        skip = tuple(gr.skip() for _ in range(n_outputs)) if n_outputs != 1 else gr.skip()
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, page: bool = False, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:  # noqa: BLE001
                    yield fail(explain(exc), skip, page)
            return gen

        @functools.wraps(fn)
        def plain(*args, page: bool = False, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                return fail(explain(exc), skip, page)
        return plain
    return wrap


def readable_requests(demo: gr.Blocks) -> gr.Blocks:
    """Make a request Gradio cannot read fail with one line naming what is wrong, instead of
    `{"error": null}` for its client and a stack trace in the server log. Gradio reads an event's
    values (checks their number, stores uploaded files, validates file records) in
    `Blocks.preprocess_data` before the handler, even with preprocess=False; this wraps that one
    method of `demo`. Gradio's own refusals stay in force (a path that was not uploaded through this
    server is never read); only their message changes."""
    read = demo.preprocess_data

    @functools.wraps(read)
    async def checked(block_fn, inputs, *args, **kwargs):
        try:
            return await read(block_fn, inputs, *args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:  # noqa: BLE001
            raise gr.Error(_unreadable(block_fn.inputs, inputs, exc), print_exception=False) from None

    demo.preprocess_data = checked
    return demo


def _unreadable(widgets: list, values, exc: Exception) -> str:
    wanted = len(widgets)
    if not isinstance(values, list) or len(values) < wanted:
        got = len(values) if isinstance(values, list) else shown(values)
        return f"this endpoint takes {wanted} value{'s' * (wanted != 1)}; the request sent {got}"
    files = [f"“{w.label}”" if w.label else "the file" for w in widgets if isinstance(w, gr.File)]
    if files:
        log.warning("unreadable file field: %s: %s", type(exc).__name__, str(exc).splitlines()[0])
        return (f"the file field {' / '.join(files)} must be empty or the record of a file uploaded to this "
                f"server (gradio_client: handle_file(path)); the request's value could not be read")
    log.warning("unreadable request", exc_info=exc)
    return f"the request's values could not be read ({type(exc).__name__}); nothing was started"


def esc(text) -> str:
    return html.escape(str(text))


def fmt_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
