"""Render a model's chat template — untrusted Jinja from its folder — within a time and size bound.

Its one job: turn chat messages into prompt token ids exactly as the tokenizer's
`apply_chat_template` would, except that the template runs in a separate worker process
(worker.py, transformers' own `render_jinja_template`) that this module kills
when the template runs past `DEADLINE_S`, when `stop` is set (checked every `POLL_S`), or on
Ctrl-C. A template that loops for ever, computes `9**(9**9)` (one C-level operation no Python
code can interrupt), builds a huge string or tries a sandbox escape therefore ends in one
`TemplateProblem` line (`Stopped` on Stop) and never holds the caller. The worker also caps
memory (an address-space limit on Unix) and the size of what a template may add to the
messages (`EXTRA_CHARS`).

The worker starts on the first render and is then reused; after a kill, the next render starts
a fresh one. Measured on a 2-core CPU: starting it takes about half a second (Python and
transformers' template helpers; no torch), and a one-prompt render, tokenizing included, about
a tenth of a millisecond more than `apply_chat_template` in-process; the 48 instructions of
selfgen.py go in one round trip of a few milliseconds.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
import time

from proxsparse_core.errors import Stopped, UserError

DEADLINE_S = 10.0         # one render (all the prompts of one call) may take this long
START_TIMEOUT_S = 60.0    # starting the worker (not counted in DEADLINE_S: a busy machine is not the template's fault)
POLL_S = 0.1              # how often the wait looks at `stop`
EXTRA_CHARS = 16_384      # characters a template may add to one conversation's own text
MAX_REMEMBERED = 32       # templates that ran past the bound, answered at once when asked again

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


class TemplateProblem(UserError):
    """The model's chat template failed or ran past its bound (not Stop)."""


class _Worker:
    def __init__(self):
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        self.proc = subprocess.Popen([sys.executable, "-u", WORKER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     encoding="ascii", bufsize=1, creationflags=flags)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="chat-template-reader").start()

    def _read(self):
        try:
            for line in self.proc.stdout:
                self.lines.put(line)
        except (OSError, ValueError):
            pass
        self.lines.put(None)                     # end of output: the worker is gone

    def wait_line(self, until: float, stop: threading.Event | None, late: str):
        while True:
            try:
                line = self.lines.get(timeout=POLL_S)
            except queue.Empty:
                line = ""
            if line is None:
                raise TemplateProblem("the chat template worker ended unexpectedly")
            if line:
                return json.loads(line)
            if stop is not None and stop.is_set():
                raise Stopped("stopped by the user while the chat template was rendered")
            if time.monotonic() > until:
                raise TemplateProblem(late)

    def kill(self):
        try:
            self.proc.kill()
            self.proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except (OSError, ValueError):
                pass


_lock = threading.Lock()
_worker: _Worker | None = None
_over_bound: dict[str, str] = {}     # template sha256 → why it was stopped


def _take_lock(until: float, stop: threading.Event | None):
    while not _lock.acquire(timeout=POLL_S):
        if stop is not None and stop.is_set():
            raise Stopped("stopped by the user while waiting for the chat template worker")
        if time.monotonic() > until:
            raise TemplateProblem("the chat template worker stayed busy with another request")


def render(template: str, conversations: list[list[dict]], *, add_generation_prompt: bool = True,
           variables: dict | None = None, stop: threading.Event | None = None) -> list[str]:
    """The template rendered for each conversation (a list of {"role", "content"} messages),
    with `variables` (the tokenizer's special tokens) visible to it, as `apply_chat_template`
    renders it. Raises TemplateProblem (one line) when the template fails or runs past the
    bound, Stopped when `stop` is set first."""
    global _worker
    key = hashlib.sha256(template.encode("utf-8", "surrogatepass")).hexdigest()
    if key in _over_bound:
        raise TemplateProblem(f"the model's chat template {_over_bound[key]} (earlier; not run again)")
    caps = [EXTRA_CHARS + sum(len(str(m.get("content", ""))) for m in c) for c in conversations]
    request = json.dumps({"template": template, "conversations": conversations,
                          "add_generation_prompt": add_generation_prompt, "kwargs": variables or {},
                          "max_chars": caps, "alarm_s": int(DEADLINE_S) + 5}, ensure_ascii=True)
    _take_lock(time.monotonic() + START_TIMEOUT_S + DEADLINE_S, stop)
    try:
        try:
            if _worker is None or _worker.proc.poll() is not None:
                if _worker is not None:
                    _worker.kill()
                _worker = _Worker()
                _worker.wait_line(time.monotonic() + START_TIMEOUT_S, stop,
                                  f"the chat template worker did not start within {START_TIMEOUT_S:.0f} s")
            _worker.proc.stdin.write(request + "\n")
            _worker.proc.stdin.flush()
            answer = _worker.wait_line(time.monotonic() + DEADLINE_S, stop,
                                       f"ran past its {DEADLINE_S:g} s limit and was stopped")
        except BaseException as exc:
            # Stop, the time limit, Ctrl-C, a broken pipe: the worker may be mid-render, so it goes
            if _worker is not None:
                _worker.kill()
                _worker = None
            if isinstance(exc, (BrokenPipeError, OSError, ValueError)) and not isinstance(exc, UserError):
                raise TemplateProblem(f"the chat template worker failed ({type(exc).__name__})") from None
            if isinstance(exc, TemplateProblem) and str(exc).startswith("ran past"):
                _remember(key, str(exc))
                raise TemplateProblem(f"the model's chat template {exc}") from None
            raise
    finally:
        _lock.release()
    if not answer.get("ok"):
        if answer.get("kind") == "memory":
            _remember(key, answer["error"].replace("it needs", "needed"))
        raise TemplateProblem(f"the model's chat template failed: {answer.get('error')}")
    return answer["texts"]


def _remember(key: str, why: str):
    if len(_over_bound) >= MAX_REMEMBERED:
        _over_bound.pop(next(iter(_over_bound)))
    _over_bound[key] = why


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_user_prompts(tokenizer, prompts: list[str], stop: threading.Event | None = None) -> list[list[int]]:
    """Token ids of each prompt as one user message followed by the assistant's turn, exactly
    what `tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)`
    gives — one bounded render for all of them."""
    try:
        template = tokenizer.get_chat_template()
    except ValueError as exc:        # a dict of templates without a default one
        raise TemplateProblem(f"the model's chat template cannot be chosen: {' '.join(str(exc).split())[:200]}") \
            from None
    if not isinstance(template, str):
        raise TemplateProblem("the model's chat template is not text")
    variables = {k: (v if isinstance(v, (str, list)) else str(v)) for k, v in tokenizer.special_tokens_map.items()}
    variables = {k: ([str(x) for x in v] if isinstance(v, list) else v) for k, v in variables.items()}
    texts = render(template, [[{"role": "user", "content": p}] for p in prompts], variables=variables, stop=stop)
    try:
        out = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    except Exception as exc:  # noqa: BLE001 - the rendered text came from the template
        raise TemplateProblem(f"the text the model's chat template wrote cannot be tokenized "
                              f"({type(exc).__name__})") from None
    if not all(out):
        raise TemplateProblem("the model's chat template wrote nothing for a prompt")
    return out


def shutdown():
    """End the worker (a later render starts a new one)."""
    global _worker
    with _lock:
        if _worker is not None:
            _worker.kill()
            _worker = None
