"""Widgets by name: a tab keeps its components in a `Widgets` table, and its handlers read their
inputs as a dict keyed by those names and answer with a *view* — a NamedTuple whose field names
are widget names — or a plain dict keyed by name. A field left at `SKIP` (or a name left out)
leaves its widget as it is. `Widgets.listen` wires such a handler to a Gradio event: the event's
inputs and outputs are listed by name, in the order the HTTP API keeps, and nothing counts
positions or pads an answer with `gr.skip()` by hand.

Views stay tuples, so the plain functions behind the handlers (which tests call) still unpack
as before: `table, note = frame`.
"""
from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Callable

import gradio as gr

from .feedback import explain, fail, from_page

SKIP = gr.skip()             # {"__type__": "update"}: the widget stays as it is


def is_skip(value) -> bool:
    return isinstance(value, dict) and value == SKIP


def fields_of(view) -> list[str]:
    """The names a view (a NamedTuple class or instance) or a list of names stands for."""
    return list(view._fields) if hasattr(view, "_fields") else list(view)


class Widgets:
    """A tab's components by name."""

    def __init__(self, **components):
        self._by_name: dict[str, Any] = {}
        for name, component in components.items():
            self.add(name, component)

    def add(self, name: str, component):
        if name in self._by_name:
            raise ValueError(f"two widgets named {name!r}")
        self._by_name[name] = component
        return component

    def __getitem__(self, name: str):
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def __call__(self, names) -> list:
        """The components named by `names` (a list of names, or a view), in that order."""
        return [self._by_name[n] for n in fields_of(names)]

    def updates(self, answer, outputs: list[str]):
        """A handler's answer (a view or a dict keyed by name) as Gradio takes it for `outputs`:
        a dict keyed by component without the skipped ones (the one value for one output)."""
        if not outputs:
            return None
        items = answer._asdict() if hasattr(answer, "_asdict") else dict(answer or {})
        unknown = set(items) - set(outputs)
        if unknown:
            raise ValueError(f"the handler answered {sorted(unknown)}, which are not its outputs {outputs}")
        if len(outputs) == 1:
            return items.get(outputs[0], SKIP)
        changed = {self._by_name[k]: v for k, v in items.items() if not is_skip(v)}
        return changed or SKIP

    def listen(self, trigger, fn: Callable[[dict, bool], Any], inputs: Iterable[str] = (),
               outputs=(), stream: bool = False, **kw):
        """Wire `fn(values, page)` to `trigger` (e.g. `button.click`, or a list of them for
        `gr.on`): `values` maps each name of
        `inputs` to what its widget sent, `page` says whether the page fired the event (rather
        than an API client). `fn` returns — or, as a generator (or with `stream`, a function
        returning an iterator), yields — a view or dict for `outputs` (names, or a view class). A
        failure is reported as one line (feedback.fail) and leaves every output as it is."""
        ins, outs = fields_of(inputs), fields_of(outputs)

        def answer(result):
            return self.updates(result, outs)

        if stream or inspect.isgeneratorfunction(fn):
            def handler(evt: gr.EventData, *values):
                page = from_page(evt)
                try:
                    for result in fn(dict(zip(ins, values)), page):
                        yield answer(result)
                except gr.Error:                # already the one line for an API client
                    raise
                except Exception as exc:  # noqa: BLE001 - one line, the page stays as it is
                    yield fail(explain(exc), SKIP, page)
        else:
            def handler(evt: gr.EventData, *values):
                page = from_page(evt)
                try:
                    return answer(fn(dict(zip(ins, values)), page))
                except gr.Error:
                    raise
                except Exception as exc:  # noqa: BLE001
                    return fail(explain(exc), SKIP, page)
        handler.__name__ = handler.__qualname__ = getattr(fn, "__name__", "handler")
        if isinstance(trigger, (list, tuple)):
            return gr.on(list(trigger), handler, self(ins) or None, self(outs) or None, **kw)
        return trigger(handler, self(ins) or None, self(outs) or None, **kw)
