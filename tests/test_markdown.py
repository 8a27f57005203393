"""ui.markdown: model output as safe HTML, with the divergence mark surviving the rendering."""
import re

from ui.markdown import MARK, render

CODE = ("```python\ndef add(a, b):\n    return a + b\n```\n\nThis uses the built-in `sum` and **no loop**."
        "\n\n1. **Fast:** yes\n2. short\n\n- a\n- b <i>\n\n```python")


def text_of(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_fences_inline_code_bold_and_lists_render():
    out = render(CODE)
    assert "<pre><code>def add(a, b):\n    return a + b</code></pre>" in out
    assert "<code>sum</code>" in out and "<strong>no loop</strong>" in out
    assert "<ol><li><strong>Fast:</strong> yes</li><li>short</li></ol>" in out
    assert "<ul><li>a</li><li>b &lt;i&gt;</li></ul>" in out
    assert out.endswith("<pre><code></code></pre>")          # an unclosed fence, as while streaming


def test_model_output_never_becomes_markup():
    evil = '<script>alert(1)</script> <img src=x onerror=alert(2)> **<b>x</b>** `<svg onload=1>`'
    out = render(evil)
    assert "<script" not in out and "<img" not in out and "<svg" not in out and "<b>" not in out
    assert "&lt;script&gt;" in out and "&lt;svg onload=1&gt;" in out
    assert set(re.findall(r"</?([a-z0-9]+)", out)) <= {"p", "br", "strong", "code", "pre", "em", "ul", "ol", "li", "h4",
                                                       "mark"}


def test_the_mark_starts_at_the_raw_offset_and_covers_the_rest():
    for cut in (0, 5, 14, 40, 60, 90, CODE.index("b <i>")):
        out = render(CODE, cut)
        before, _, after = out.partition(MARK)
        # the text before the first mark is exactly the raw text before the cut, markup removed
        plain = text_of(before).replace("&lt;", "<").replace("&gt;", ">")
        raw_visible = re.sub(r"```\w*|\*|`|^\d+\. |^- ", "", CODE[:cut], flags=re.M)   # markers are not text
        assert plain.replace("\n", "") == raw_visible.replace("\n", ""), cut
        marked = "".join(re.findall(r'<mark class="ps-diff">(.*?)</mark>', out, flags=re.S))
        assert text_of(marked).replace("\n", "").endswith("b &lt;i&gt;")                  # to the end
    assert MARK not in render(CODE, None) and MARK not in render(CODE, len(CODE))


def test_numbered_items_keep_their_numbers():
    """Issue 28 (8): a model's "1. … 2. … 3. …" with blank lines between the items, or lines under
    an item, rendered as three lists that each said "1."."""
    apart = render("Steps:\n1. one\n\n2. two\n   more about two\n\n3. three\n\nDone.")
    assert apart == ("<p>Steps:</p><ol><li>one</li><li>two<br>more about two</li><li>three</li></ol>"
                     "<p>Done.</p>")
    cut = render("1. first\nnot indented\n2. second\n3. third")       # a paragraph cuts the list
    assert cut.count("<ol") == 2 and '<ol start="2"><li>second</li><li>third</li></ol>' in cut
    assert render("4. four\n5. five").startswith('<ol start="4">')
    assert render("- a\n\n- b") == "<ul><li>a</li><li>b</li></ul>"
    assert render("1. a\n\n- b").count("<ol>") == 1 and "<ul><li>b</li></ul>" in render("1. a\n\n- b")
    out = render("1. one\n\n2. two", cut=len("1. one\n\n2. t"))          # the mark still lands on "wo"
    assert out.endswith('<li>t<mark class="ps-diff">wo</mark></li></ol>')
