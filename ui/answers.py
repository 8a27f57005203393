"""What the Compare tab and its lecture mode show of results and answers, in one place: the checked
generation settings, an answer panel (safe Markdown, the part after the first divergence from the
dense answer highlighted), the perplexity table's rows and the message for an unknown result name.
No Gradio layout here: compare_tab.py and lecture.py build their widgets on these."""
from __future__ import annotations

import re

import pandas as pd

from proxsparse_core.baselines.oneshot import METHODS
from proxsparse_core.inference.evaluate import GenerationSettings
from proxsparse_core.results import DENSE, LEARNED, RECOVERED, is_recovered, method_of, title

from . import inputs, markdown
from .feedback import esc
from .jobs import JobManager

MAX_PROMPT = 4000            # characters; a page or API request with more is refused at once


COLUMNS = ["method", "held-out perplexity", "× dense", "same top-1 as dense", "weights", "2:4 verified"]


def measuring_note(done: int, total: int) -> str:
    """Said while a GPU measures the 2:4 kernels for a 2:4 model's layer shapes before its first
    answer (Workspace.decoding): the pause has a reason and an end."""
    return (f"⏱ Measuring the 2:4 kernels on this GPU before the 2:4 model answers: {done} of {total} layer "
            "shapes (once per shape and GPU; later answers start at once).")


def baseline_methods() -> list[str]:
    """The one-shot methods of the registry (proxsparse_core.baselines.oneshot.METHODS)."""
    return list(METHODS)


def variant_choices(jobs: JobManager) -> list[tuple[str, str]]:
    return [(title(n), n) for n in jobs.ws.results]


def unknown_result(jobs: JobManager, name: str) -> str:
    """The message for a result name that is not one of the workspace's results."""
    names = list(jobs.ws.results)
    have = (f"the results are: {', '.join(names)}" if names else
            "there is no 2:4 result yet: learn a mask in the Learn tab (or compute a baseline) first")
    return f"no result named {inputs.shown(name)}; {have}"


LOOP_GUARD = 4                # "Block repeats": no 4 tokens in a row twice in one answer


def settings_from_form(sample, temperature, top_p, max_new_tokens, chat, block_repeats=False) -> GenerationSettings:
    sample = inputs.flag("Sample (off = greedy)", sample)
    guard = LOOP_GUARD if inputs.flag("Block repeats", block_repeats) else 0
    limits = GenerationSettings.LIMITS
    t = inputs.number("Temperature", temperature, *limits["temperature"])
    p = inputs.number("Top-p", top_p, *limits["top_p"])
    n = inputs.whole("Max new tokens", max_new_tokens, *limits["max_new_tokens"])
    chat = inputs.flag("Use the model's chat template", chat)
    return GenerationSettings(max_new_tokens=n, do_sample=sample, temperature=t, top_p=p, chat=chat,
                              no_repeat_ngram=guard).validate()


def answer_panel(text: str, cut: int | None, streaming: bool, empty: str = "…") -> str:
    """Generated text rendered as (safe) Markdown, the part after the first divergence highlighted
    (`empty` stands in for no text)."""
    body = markdown.render(text, cut if cut is not None and cut < len(text) else None)
    cursor = '<span class="ps-cursor">▍</span>' if streaming else ""
    return f'<div class="ps-gen">{body or f"<span class=ps-muted>{empty}</span>"}{cursor}</div>'


def _plain_md(text: str) -> str:
    """`text` shown literally in Markdown (it may quote a model's chat template)."""
    return esc(re.sub(r"([][\\`*_{}()#+!|~-])", r"\\\1", text))


def perplexity_table(jobs: JobManager) -> pd.DataFrame:
    """Rows for every result with a known perplexity: dense first, then learned, then baselines."""
    ws = jobs.ws
    rank = {m: i for i, m in enumerate([DENSE, LEARNED] + baseline_methods())}
    made = list(ws.results)

    def place(n):      # by method, each result (in the order made) followed by its recoveries
        root = n.split(RECOVERED)[0]
        order = made.index(root) if root in made else len(made)
        return rank.get(method_of(root), len(rank)), order, n.count(RECOVERED), n
    names = sorted(ws.ppl, key=place)
    rows = []
    dense = ws.ppl.get(DENSE)
    for n in names:
        r = ws.results.get(n)
        weights = "original" if n == DENSE else ("updated by recovery" if is_recovered(n) else
                                                 "updated" if r is not None and r.weights is not None
                                                 else "original × mask")
        same = (f"{100 * ws.agreement(n):.1f}%" if n in ws.top1 and DENSE in ws.top1 else
                f"{100 * ws.agreed[n]:.1f}%" if n in ws.agreed else "")     # as a saved run recorded it
        rows.append([title(n), round(ws.ppl[n], 3),
                     f"{ws.ppl[n] / dense:.2f}×" if dense else "", same, weights,
                     "—" if n == DENSE else {True: "✓", False: "✗"}.get(jobs.verified.get(n), "?")])
    return pd.DataFrame(rows, columns=COLUMNS)


def like_with_like(jobs: JobManager) -> str:
    """A line under the perplexity table when it sets a recovered row beside results that were not
    recovered: recovery changes the surviving weights, so a recovered row is fairly compared only with
    other recovered rows (SparseGPT's one-shot update is not a recovery). Empty when nothing needs saying."""
    ws = jobs.ws
    scored = [n for n in ws.ppl if n != DENSE]
    recovered = [n for n in scored if is_recovered(n)]
    roots = {n.split(RECOVERED)[0] for n in recovered}
    alone = [n for n in scored if not is_recovered(n) and n not in roots and method_of(n) != "sparsegpt-maskonly"]
    if not recovered or not alone:
        return ""
    names = ", ".join(f"**{esc(title(n))}**" for n in alone)
    return (f"⚖ Compare recovered rows only with recovered rows: {names} "
            f"{'was' if len(alone) == 1 else 'were'} not recovered. To compare like with like, recover "
            f"{'it' if len(alone) == 1 else 'each'} with the same settings (Recover, below).")
