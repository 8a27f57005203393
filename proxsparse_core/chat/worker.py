"""The child process of chat_template.py: renders chat templates, one JSON request per line.

Started by chat_template.py as a plain script (it imports nothing from this package), it lives
as long as the parent uses it, and the parent kills it whenever a template runs past its time,
so nothing here needs to be interruptible. It only guards against what the parent cannot see:
an address-space limit makes a template that builds a huge string fail with MemoryError instead
of swapping the machine, and an alarm (default action: the kernel ends the process, even inside
a C-level big-number operation) ends a runaway render if the parent has gone away.

Protocol (stdin/stdout, one JSON object per line, ASCII only):
  → {"ready": true}                                   once, after start-up
  ← {"template": str, "conversations": [[message, …], …], "add_generation_prompt": bool,
     "kwargs": {…}, "max_chars": [int, …], "alarm_s": int}
  → {"ok": true, "texts": [str, …]}
    or {"ok": false, "kind": "error" | "memory" | "size", "error": str}
"""
import json
import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]          # this folder's modules (config.py, data.py, …) must not shadow real ones

MEMORY_BYTES = 512 * 2**20   # address space a render may add to the worker's own


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _limit_memory():
    try:
        import resource
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        want = used + MEMORY_BYTES
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft == resource.RLIM_INFINITY or want < soft:
            resource.setrlimit(resource.RLIMIT_AS, (want, hard))
    except (ImportError, OSError, ValueError):
        pass                 # not Unix: the parent's time limit still ends a runaway render


def _render(req, render_jinja_template) -> dict:
    import jinja2

    try:
        texts, _ = render_jinja_template(conversations=req["conversations"], chat_template=req["template"],
                                         add_generation_prompt=req["add_generation_prompt"], **req["kwargs"])
    except MemoryError:
        return {"ok": False, "kind": "memory", "error": "it needs more memory than a chat template is allowed"}
    except jinja2.exceptions.SecurityError as exc:
        return {"ok": False, "kind": "error",
                "error": f"it tried something the template sandbox forbids ({_one_line(exc)})"}
    except jinja2.exceptions.TemplateSyntaxError as exc:
        return {"ok": False, "kind": "error", "error": f"syntax error on line {exc.lineno}: {_one_line(exc.message)}"}
    except RecursionError:
        return {"ok": False, "kind": "error", "error": "it recurses too deeply"}
    except Exception as exc:  # noqa: BLE001 - any failure of untrusted template code is reported, not raised
        return {"ok": False, "kind": "error", "error": f"{type(exc).__name__}: {_one_line(exc)}"}
    for text, cap in zip(texts, req["max_chars"]):
        if len(text) > cap:
            return {"ok": False, "kind": "size", "error": f"its output is longer than {cap:,} characters"}
    return {"ok": True, "texts": texts}


def main():
    # the protocol gets its own copy of stdout; fd 1 itself goes to stderr, so a stray print
    # (from a library) can never corrupt an answer
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="ascii", newline="\n")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import signal
    alarm = getattr(signal, "alarm", None)
    if alarm is not None:
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
    from transformers.utils.chat_template_utils import render_jinja_template
    _limit_memory()
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if alarm is not None:
            alarm(int(req.get("alarm_s", 60)))
        try:
            answer = json.dumps(_render(req, render_jinja_template), ensure_ascii=True)
        except MemoryError:
            answer = json.dumps({"ok": False, "kind": "memory",
                                 "error": "it needs more memory than a chat template is allowed"})
        if alarm is not None:
            alarm(0)
        out.write(answer + "\n")
        out.flush()


if __name__ == "__main__":
    main()
