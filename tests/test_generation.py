"""The Compare tab's loop guard ("Block repeats", CLI --no-repeat-ngram): greedy decoding that never
repeats the same n tokens in a row, shown on a tiny random model, which loops under plain greedy."""
import pytest
import torch

from proxsparse_core.errors import UserError
from proxsparse_core.inference.evaluate import GenerationSettings, _gen_kwargs
from ui import compare_tab


def _ngrams(ids, n):
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def _greedy(lm, prompt_ids, settings):
    ids = torch.tensor([prompt_ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), **_gen_kwargs(lm.tokenizer, settings))
    return out[0].tolist()


def test_the_loop_guard_leaves_no_repeated_ngram_where_plain_greedy_loops(tiny_lm):
    prompt = [5, 6, 7, 8]
    plain = _greedy(tiny_lm, prompt, GenerationSettings(max_new_tokens=60))
    looped = _ngrams(plain, 4)
    assert len(set(looped)) < len(looped)                     # plain greedy goes round in a loop
    guarded = _greedy(tiny_lm, prompt, GenerationSettings(max_new_tokens=60, no_repeat_ngram=4))
    assert guarded[:4] == prompt and len(guarded) > 24
    grams = _ngrams(guarded, 4)
    assert len(set(grams)) == len(grams)                      # not one 4-gram twice, prompt included
    # until the loop would have closed, the guard changes nothing: greedy is still greedy
    first_repeat = next(i for i, g in enumerate(looped) if g in looped[:i])
    assert guarded[:first_repeat + 3] == plain[:first_repeat + 3]


def test_the_tabs_block_repeats_box_sets_the_guard_and_bad_values_are_refused():
    assert compare_tab.settings_from_form(False, 0.7, 0.9, 12, True, True).no_repeat_ngram == compare_tab.LOOP_GUARD
    assert compare_tab.settings_from_form(False, 0.7, 0.9, 12, True).no_repeat_ngram == 0
    with pytest.raises(UserError, match="Block repeats must be true or false"):
        compare_tab.settings_from_form(False, 0.7, 0.9, 12, True, "yes")
    for bad in (-1, 17, True, 2.5):
        with pytest.raises(UserError, match="loop guard"):
            GenerationSettings(no_repeat_ngram=bad).validate()
