"""Held-out texts of other domains for bench/quality.py, collected from files on this machine.

None of them is in any calibration source the app offers (the built-in text is Python's
language and library reference; `mix` adds text the model writes itself):

* legal.txt   — licence texts (GPL-3, Apache-2.0, MPL-2.0, Python's LICENSE): legal English;
* mldocs.txt  — docstrings of transformers' generation and training configuration: machine-
                learning API documentation (technical, but not Python's reference);
* manual.txt  — the IDLE user guide (idlelib/help.html as plain text): a software manual.

    python bench/texts.py            # writes bench/texts/*.txt (about 60 K characters each)
"""
from __future__ import annotations

import ast
import html
import re
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent / "texts"
LIMIT = 60_000


def _clip(text: str) -> str:
    text = re.sub(r"\n{3,}", "\n\n", text.replace("\r", "")).strip()
    return text[:LIMIT].rsplit("\n\n", 1)[0]


def legal() -> str:
    parts = []
    for p in ("/usr/share/common-licenses/GPL-3", "/usr/share/common-licenses/Apache-2.0",
              "/usr/share/common-licenses/MPL-2.0", Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"):
        if Path(p).exists():
            parts.append(Path(p).read_text(errors="replace"))
    return _clip("\n\n".join(parts))


def mldocs() -> str:
    import transformers
    root = Path(transformers.__file__).parent
    docs = []
    for rel in ("generation/configuration_utils.py", "training_args.py", "modeling_utils.py",
                "tokenization_utils_base.py"):
        f = root / rel
        if not f.exists():
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d) > 200:
                    docs.append(d)
    return _clip("\n\n".join(docs))


def manual() -> str:
    f = Path(sysconfig.get_paths()["stdlib"]) / "idlelib" / "help.html"
    raw = f.read_text(errors="replace")
    raw = re.sub(r"(?s)<(script|style).*?</\1>", "", raw)
    text = html.unescape(re.sub(r"<[^>]+>", "", raw))
    text = "\n".join(line.strip() for line in text.splitlines())
    return _clip(re.sub(r"\n{2,}", "\n\n", text))


def main():
    OUT.mkdir(exist_ok=True)
    for name, make in (("legal", legal), ("mldocs", mldocs), ("manual", manual)):
        text = make()
        (OUT / f"{name}.txt").write_text(text)
        print(f"{name}.txt: {len(text):,} characters")


if __name__ == "__main__":
    main()
