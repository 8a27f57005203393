"""ProxSparse Studio: learn 2:4 sparsity masks for causal LMs in the browser.

    python app.py                      # http://127.0.0.1:7860, bundled offline model preselected
    python app.py --port 0             # any free port
    python app.py --host 0.0.0.0       # listen on the network (you choose to)
    python app.py --share              # public Gradio link (opt-in)
    python app.py --model ./my-model   # preselect another model (HF id or local folder; no preset then)
    python app.py --allow-remote-code  # let visitors load models that ship their own Python code
    python app.py --runs-dir ./runs    # where every result is saved as a run folder (and listed)

Without --host / --port, GRADIO_SERVER_NAME and GRADIO_SERVER_PORT are honoured, as in any
Gradio app. Mistakes in the command line (a bad port, a port already in use) are one line on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 7860
EXIT_USAGE = 2


class UsageError(Exception):
    """A bad command line or environment, said in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line and exit code 2, like the CLI
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def port_number(text: str) -> int:
    try:
        port = int(text)
    except (TypeError, ValueError):
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a whole number from 0 to 65535, got {text!r}")
    return port


def parse_args(argv=None, env=None) -> argparse.Namespace:
    """The command line, with host and port resolved (flags, else the environment, else defaults)."""
    p = _Parser(description="ProxSparse Studio (Gradio app)")
    p.add_argument("--host", help=f"address to listen on (default $GRADIO_SERVER_NAME, else {DEFAULT_HOST}: "
                                  "this machine only)")
    p.add_argument("--port", type=port_number, help=f"port (default $GRADIO_SERVER_PORT, else {DEFAULT_PORT}; "
                                                    "0 = any free port)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--model", help="model preselected in the Learn tab (default: the bundled SmolLM2)")
    p.add_argument("--preset", help="preset preselected in the Learn tab (default: quick-demo on a machine without "
                                     "a GPU, the bundled model's short version for a class period; bundled-quality, "
                                     "its best measured setting, on a GPU)")
    p.add_argument("--runs-dir", metavar="DIR",
                   help="where every result the app makes is saved as a run folder, and listed in the Saved runs "
                        "tab (default $PROXSPARSE_RUNS, else ~/.cache/proxsparse/runs)")
    p.add_argument("--allow-remote-code", action="store_true",
                   help="allow 'Trust remote code': a model folder's own Python then runs inside this server "
                        "when a visitor asks for it (off by default; only for models you trust)")
    args = p.parse_args(argv)
    args.host, args.port = address(args.host, args.port, os.environ if env is None else env)
    return args


def address(host: str | None, port: int | None, env) -> tuple[str, int]:
    """(host, port): the flags, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else the defaults."""
    host = host if host is not None else (env.get("GRADIO_SERVER_NAME", "").strip() or DEFAULT_HOST)
    if port is not None:
        return host, port
    raw = env.get("GRADIO_SERVER_PORT", "").strip()
    if not raw:
        return host, DEFAULT_PORT
    try:
        return host, port_number(raw)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"GRADIO_SERVER_PORT: {exc}") from None


def check_listen(host: str, port: int) -> int:
    """The port to listen on (port 0: any free one); fails early, in one line, when nothing
    could listen on host:port."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError):
        raise UsageError(f"cannot listen on {host!r}: not an address or name of this machine") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on {host} is already in use; choose another with --port "
                                 f"(0 = any free port)") from None
            raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        return s.getsockname()[1]


def _stop_on_sigterm():
    """`kill` ends the app like Ctrl-C: Gradio closes its server and exit-time cleanup runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


def run(argv=None):
    args = parse_args(argv)
    from proxsparse_core.config import BUNDLED, PRESETS, RunConfig, default_preset
    from ui.jobs import JobManager
    from ui.layout import build_app, launch

    preset = args.preset or default_preset()
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    host = args.host
    port = check_listen(host, args.port)
    if args.allow_remote_code:
        from proxsparse_core.models import loading as models
        models.allow_remote_code(True)                 # the process-wide gate of proxsparse_core
    defaults = RunConfig().with_preset(preset)
    if args.model and args.model != defaults.model:
        # a preset's settings are made for its model: another model starts from the plain,
        # model-agnostic defaults (or the settings of a --preset asked for by name), and the
        # Learn tab shows "custom" rather than a preset that does not fit
        defaults = (RunConfig().with_preset(preset) if args.preset else RunConfig())
        defaults.model = args.model
    jobs = JobManager(allow_remote_code=args.allow_remote_code, runs_dir=args.runs_dir)
    if defaults.model == BUNDLED:
        jobs.preload(defaults)      # the bundled model is read while the page opens: the first Start learns at once
    demo = build_app(jobs, defaults=defaults, preset=preset)
    _stop_on_sigterm()
    try:
        launch(demo, host=host, port=port, share=args.share)
    except OSError as exc:      # lost a race for the port, or the address vanished
        raise UsageError(f"could not start the server on {host}:{port}: {str(exc).splitlines()[0]}") from None


def main(argv=None):
    try:
        run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:   # Ctrl-C or kill: Gradio has closed its server; no traceback
        print("stopped", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    main()
