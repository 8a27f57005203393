"""A model folder's chat template is untrusted code: it renders within a time and size bound
(proxsparse_core/chat_template.py), Stop ends it, and a failing one is one line, never a hang,
a traceback or a busy app. Offline: the tokenizer is trained in the test (test_ui_tiny_model)."""
import threading
import time

import pytest
import torch

from proxsparse_core.chat import template as chat_template
from proxsparse_core.inference import evaluate
from proxsparse_core.data import selfgen
from proxsparse_core.errors import Stopped, UserError

NESTED = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
          "{% endfor %}{% endfor %}{% endfor %}")
ESCAPES = ["{{ ''.__class__.__mro__[1].__subclasses__() }}",
           "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
           "{{ messages.__class__.__base__.__subclasses__() }}"]
# Jinja's ** groups from the left, so `9**9**9` is (9**9)**9, a 78-digit number; the C-level
# big-number operation that nothing in the process can interrupt is 9**(9**9)
HUGE_POWER = "{{ 9**(9**9) }}"
BENIGN = ("{{ eos_token }}{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
          "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
          "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PROMPTS = ["What is the capital of France?", "  spaces and ünïcödé — ✓  ", "line one\nline two",
           "<|endoftext|> inside"]


@pytest.fixture
def short_deadline(monkeypatch):
    monkeypatch.setattr(chat_template, "DEADLINE_S", 2.0)
    monkeypatch.setattr(chat_template, "_over_bound", {})
    return 2.0


def tokenizer_with(template):
    from test_ui_tiny_model import _tokenizer

    tok = _tokenizer()
    tok.chat_template = template
    return tok


def model_folder(folder, template):
    """A tiny random Llama folder, like a user's model, whose tokenizer carries `template`
    (saved as chat_template.jinja)."""
    from conftest import make_tiny_llama

    tok = tokenizer_with(template)
    model = make_tiny_llama(vocab=len(tok))
    model.config.eos_token_id = model.config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def apply_ids(tok, prompt):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


# ---------------------------------------------------------------------------- the renderer

def test_nested_loops_end_within_the_bound(short_deadline):
    t0 = time.monotonic()
    with pytest.raises(chat_template.TemplateProblem, match="ran past its 2 s limit") as e:
        chat_template.render(NESTED, [[{"role": "user", "content": "hi"}]])
    assert time.monotonic() - t0 < short_deadline + 3
    assert "\n" not in str(e.value) and "chat template" in str(e.value)
    # a template that ran past the bound is answered at once when asked again
    t0 = time.monotonic()
    with pytest.raises(chat_template.TemplateProblem, match="earlier"):
        chat_template.render(NESTED, [[{"role": "user", "content": "other"}]])
    assert time.monotonic() - t0 < 0.5
    # and the next template renders in a fresh worker
    assert chat_template.render("ok {{ messages[0].content }}", [[{"role": "user", "content": "x"}]]) == ["ok x"]


def test_benign_template_gives_the_ids_of_apply_chat_template():
    tok = tokenizer_with(BENIGN)
    want = [apply_ids(tok, p) for p in PROMPTS]
    assert chat_template.encode_user_prompts(tok, PROMPTS) == want
    for p, ids in zip(PROMPTS, want):
        got = evaluate._encode(tok, p, evaluate.GenerationSettings())
        assert got.tolist() == [ids] and got.dtype == torch.long
    # selfgen renders all its instructions in one go, each exactly as apply_chat_template would
    table = selfgen._prompt_ids(tok, selfgen.PROMPTS)
    assert all(table[p] == apply_ids(tok, p) for p in selfgen.PROMPTS)


def test_no_template_keeps_the_plain_prompt(tiny_lm):
    s = evaluate.GenerationSettings()
    assert evaluate._encode(tiny_lm.tokenizer, "hi", s).tolist() == [tiny_lm.tokenizer("hi")["input_ids"]]
    assert s.notes == []


@pytest.mark.parametrize("template", ESCAPES + [HUGE_POWER, '{{ "x" * 10**10 }}',
                                                "{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}",
                                                "{{ raise_exception('no\nsystem role') }}", "{% for %}"])
def test_hostile_templates_are_one_line_user_errors(template, short_deadline):
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        chat_template.render(template, [[{"role": "user", "content": "hi"}]])
    assert time.monotonic() - t0 < short_deadline + 3
    msg = str(e.value)
    assert msg.startswith("the model's chat template") and "\n" not in msg and "Traceback" not in msg
    assert not isinstance(e.value, Stopped)


def test_left_grouped_power_is_harmless():
    assert chat_template.render("{{ 9**9**9 }}", [[]]) == [str((9 ** 9) ** 9)]


def test_stop_ends_a_render_at_once():
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(Stopped):
        chat_template.render(NESTED, [[{"role": "user", "content": "hi"}]], stop=stop)
    assert time.monotonic() - t0 < 2.0 < chat_template.DEADLINE_S
    assert chat_template.render("{{ 1 + 1 }}", [[]]) == ["2"]


def test_selfgen_with_a_hostile_template_is_one_line(short_deadline):
    with pytest.raises(UserError, match="calibration text") as e:
        selfgen._prompt_ids(tokenizer_with(ESCAPES[1]), selfgen.PROMPTS)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("template, why", [(ESCAPES[0], "sandbox"), ("{# nothing #}", "wrote nothing"),
                                           (NESTED, "ran past")])
def test_generation_falls_back_to_the_plain_prompt_and_says_so(template, why, short_deadline):
    tok = tokenizer_with(template)
    s = evaluate.GenerationSettings(max_new_tokens=3)
    for _ in range(2):                   # said once, however often the prompt is encoded
        ids = evaluate._encode(tok, "hello", s)
        assert ids.tolist() == [tok("hello")["input_ids"]]
    assert why in s.notes[0] and "plain prompt" in s.notes[0] and "\n" not in s.notes[0]
    assert len(s.notes) == 1


# ---------------------------------------------------------------------------- the app

@pytest.fixture(scope="module")
def nested_dir(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("models") / "nested", NESTED)


@pytest.fixture(scope="module")
def escape_dir(tmp_path_factory):
    return model_folder(tmp_path_factory.mktemp("models") / "escape", ESCAPES[1])


def loaded_jobs(folder):
    from test_ui_handlers import tiny_cfg
    from ui.jobs import JobManager

    jobs = JobManager()
    with jobs.claim("loading"):
        jobs.ensure_loaded(tiny_cfg(folder))
    assert jobs.ws.lm.tokenizer.chat_template            # the folder's template was loaded
    return jobs


def test_stop_frees_the_app_from_a_hanging_template(nested_dir):
    from ui import compare_tab

    jobs = loaded_jobs(nested_dir)
    frames, done = [], threading.Event()

    def press_generate():
        try:
            frames.extend(compare_tab.generate_pair(jobs, None, "hi", False, 0.7, 0.9, 4, True))
        finally:
            done.set()

    threading.Thread(target=press_generate, daemon=True).start()
    time.sleep(1.5)                                        # rendering the template by now
    assert not done.is_set() and jobs.eval_stop is not None
    jobs.eval_stop.set()                                   # the tab's Stop (on_stop)
    t0 = time.monotonic()
    assert done.wait(5), "the generation did not end within 5 s of Stop"
    assert time.monotonic() - t0 < chat_template.DEADLINE_S
    assert "Stopped" in frames[-1][2]
    # the app answers a normal request at once: not "busy"
    t0 = time.monotonic()
    last = list(compare_tab.generate_pair(jobs, None, "hi", False, 0.7, 0.9, 4, False))[-1]
    assert "Stopped" not in last[2] and "ps-gen" in last[0]
    assert jobs.ws.perplexity("dense") > 0
    assert time.monotonic() - t0 < 10


def test_a_failing_template_generates_from_the_plain_prompt_with_a_note(escape_dir):
    from ui import compare_tab

    jobs = loaded_jobs(escape_dir)
    dense, _, summary = list(compare_tab.generate_pair(jobs, None, "hi", False, 0.7, 0.9, 4, True))[-1]
    assert "sandbox" in summary and "plain prompt" in summary and "ps-gen" in dense


# ---------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("which", ["nested", "escape"])
def test_cli_eval_says_one_line_and_returns(which, nested_dir, escape_dir, short_deadline, capsys):
    from proxsparse_core.cli import main

    folder = {"nested": nested_dir, "escape": escape_dir}[which]
    t0 = time.monotonic()
    code = main(["eval", "--model", str(folder), "--prompt", "hi", "--no-eval", "--device", "cpu",
                 "--max-new-tokens", "4"])
    assert time.monotonic() - t0 < short_deadline + 30
    out, err = capsys.readouterr()
    assert code == 0 and "--- dense:" in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "chat template" in lines[0] and "plain prompt" in lines[0], err
    assert "Traceback" not in err
