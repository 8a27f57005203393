"""Model output as safe HTML: a small Markdown subset, and the text after a given character
marked (where two generations part ways).

Every character of the model's text goes through `html.escape`; the only tags in the result are
the ones written here (p, br, pre, code, strong, em, ul, ol, li, h4, mark). What is rendered:
code fences (also an unclosed one, as while a generation streams), `inline code`, **bold**,
*italic*, bulleted and numbered lists and # headings. A numbered list keeps the model's numbers:
items apart by blank lines, or with indented lines under them, stay one list, and a list that
starts at another number than 1 (a paragraph cut it) starts there, never "1. … 1. …". The
divergence mark works on offsets into the raw text, so it survives the rendering: each piece of
text is marked from that offset on, inside whatever block it sits in.
"""
from __future__ import annotations

import itertools

import html
import re

FENCE = re.compile(r"^\s*```")
ITEM = re.compile(r"^\s*(?:([-*+])|(\d+)[.)])\s+")
HEADING = re.compile(r"^\s*#{1,6}\s+")
INLINE = re.compile(r"`([^`\n]+)`|\*\*([^*\n]+)\*\*|(?<![*\w])\*([^*\n]+)\*(?![*\w])")
MARK = '<mark class="ps-diff">'


class _Renderer:
    def __init__(self, cut: int | None):
        self.cut = cut

    def text(self, s: str, at: int) -> str:
        """`s` (found at offset `at` of the raw text) escaped, marked from the cut on."""
        if self.cut is None or at + len(s) <= self.cut:
            return html.escape(s)
        k = max(0, self.cut - at)
        return html.escape(s[:k]) + (MARK + html.escape(s[k:]) + "</mark>" if s[k:] else "")

    def inline(self, s: str, at: int) -> str:
        out, pos = [], 0
        for m in INLINE.finditer(s):
            out.append(self.text(s[pos:m.start()], at + pos))
            group = next(i for i in (1, 2, 3) if m.group(i) is not None)
            tag = {1: "code", 2: "strong", 3: "em"}[group]
            out.append(f"<{tag}>{self.text(m.group(group), at + m.start(group))}</{tag}>")
            pos = m.end()
        out.append(self.text(s[pos:], at + pos))
        return "".join(out)


def _fenced(lines: list[str], offsets: list[int], i: int, r: _Renderer) -> tuple[str, int]:
    """The code block whose opening fence is line i: its HTML and the line after its closing fence."""
    body, i = [], i + 1
    while i < len(lines) and not FENCE.match(lines[i]):
        body.append(r.text(lines[i], offsets[i]))
        i += 1
    return "<pre><code>" + "\n".join(body) + "</code></pre>", i + 1


def render(text: str, cut: int | None = None) -> str:
    """HTML for `text`, everything from character `cut` on inside <mark class="ps-diff">."""
    r = _Renderer(cut)
    lines = text.split("\n")
    offsets = list(itertools.accumulate((len(x) + 1 for x in lines[:-1]), initial=0))   # where each line starts
    out: list[str] = []
    para: list[str] = []
    items: list[str] = []
    kind = None                              # "ul" or "ol" while a list is open
    start = 1                                # the number a numbered list starts at

    def close():
        nonlocal kind
        if para:
            out.append("<p>" + "<br>".join(para) + "</p>")
            para.clear()
        if items:
            opening = f'<ol start="{start}">' if kind == "ol" and start != 1 else f"<{kind}>"
            out.append(opening + "".join(f"<li>{i}</li>" for i in items) + f"</{kind}>")
            items.clear()
        kind = None

    def next_item_kind(j: int):
        """The list kind of the next non-blank line from line j on (None: not a list item)."""
        while j < len(lines) and not lines[j].strip():
            j += 1
        m = ITEM.match(lines[j]) if j < len(lines) else None
        return None if m is None else ("ul" if m.group(1) else "ol")

    i = 0
    while i < len(lines):
        line, off = lines[i], offsets[i]
        if FENCE.match(line):
            close()
            html, i = _fenced(lines, offsets, i, r)
            out.append(html)
            continue
        item = ITEM.match(line)
        heading = HEADING.match(line)
        if not line.strip():
            if not (items and next_item_kind(i + 1) == kind):    # items apart by blank lines: one list
                close()
        elif item:
            this = "ul" if item.group(1) else "ol"
            if para or (kind and kind != this):
                close()
            if not items:
                start = int(item.group(2)) if this == "ol" and len(item.group(2)) < 10 else 1
            kind = this
            items.append(r.inline(line[item.end():], off + item.end()))
        elif heading:
            close()
            out.append(f"<h4>{r.inline(line[heading.end():], off + heading.end())}</h4>")
        elif items and line[:1] in " \t":                   # an indented line goes on with its item
            items[-1] += "<br>" + r.inline(line.strip(), off + len(line) - len(line.lstrip()))
        else:
            if items:
                close()
            para.append(r.inline(line, off))
        i += 1
    close()
    return "".join(out)
