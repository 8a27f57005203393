"""ProxSparse Studio: learn 2:4 sparsity masks for causal LMs in the browser.

    python app.py                      # http://127.0.0.1:7860, bundled offline model preselected
    python app.py --port 0             # any free port
    python app.py --host 0.0.0.0       # listen on the network (you choose to)
    python app.py --share              # public Gradio link (opt-in)
    python app.py --model ./my-model   # preselect another model (HF id or local folder)
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="ProxSparse Studio (Gradio app)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0 = any free port)")
    p.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    p.add_argument("--model", help="model preselected in the Learn tab (default: the bundled SmolLM2)")
    p.add_argument("--preset", help="preset preselected in the Learn tab (default: bundled-quality, the bundled "
                                     "model's best measured setting; quick-demo is its one-minute version)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from proxsparse_core.config import DEFAULT_PRESET, PRESETS, RunConfig
    from ui.layout import build_app, launch

    preset = args.preset or DEFAULT_PRESET
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    defaults = RunConfig().with_preset(preset)
    if args.model:
        defaults.model = args.model
    demo = build_app(defaults=defaults, preset=preset)
    launch(demo, host=args.host, port=args.port or free_port(args.host), share=args.share)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for --port 0)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
