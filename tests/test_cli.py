"""The CLI: bad arguments give one clear line and exit code 2; a learn run writes its artefacts."""
import json
import subprocess
import sys

import pytest

from proxsparse_core.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["learn", "--lambda1", "-1"], "lambda1 must be ≥ 0"),
    (["learn", "--lambda1", "nan"], "lambda1 must be a finite number"),
    (["learn", "--lr", "0"], "lr must be > 0"),
    (["learn", "--lr", "1e9"], "out of range"),
    (["learn", "--steps", "0"], "steps must be between 1"),
    (["learn", "--preset", "nope"], "unknown preset"),
    (["learn", "--data", "/nonexistent/file.txt", "--out", "OUT"], "does not exist"),
    (["learn", "--model", "/nonexistent/model", "--out", "OUT"], "does not exist"),
    (["learn", "--ctx", "100000", "--out", "OUT"], "longer than the model allows"),
    (["eval", "--masks", "/nonexistent/masks.npz"], "no mask file"),
    (["learn", "--steps", "many"], "invalid int value"),
    (["learn", "--lr-schedule", "linear"], "invalid choice: 'linear' (choose from 'constant', 'cosine')"),
    (["learn", "--lambda-scale", "global"], "invalid choice"),
    (["eval", "--no-repeat-ngram", "-1"], "loop guard (no repeated n-gram) must be a whole number from 0 to 16"),
    (["eval", "--no-repeat-ngram", "four"], "not a whole number: 'four'"),
])
def test_bad_arguments_one_line_exit_2(argv, needle, capsys, tmp_path):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse type errors exit from inside the parser
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_help_lists_every_hyper_parameter():
    out = subprocess.run([sys.executable, "-m", "proxsparse_core", "learn", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ("--lambda1", "--lambda2", "--eps", "--lr", "--steps", "--batch", "--ctx", "--data",
                 "--samples", "--seed", "--preset", "--out", "--model", "--device", "--dtype"):
        assert flag in out


def test_learn_writes_mask_recipe_metrics_and_recipe_reproduces(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["learn", "--steps", "2", "--samples", "2", "--ctx", "32", "--eval-ctx", "64",
                 "--eval-windows", "2", "--lambda1", "0.05", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "step 2/2" in text and "verified" in text
    for f in ("masks.npz", "recipe.json", "metrics.json", "events.jsonl"):
        assert (out / f).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["verified"] and metrics["perplexity"]["proxsparse"] > metrics["perplexity"]["dense"]
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["config"]["lambda1"] == 0.05 and "--lambda1 0.05" in recipe["command"]
    # the same folder is not overwritten silently
    assert main(["learn", "--steps", "1", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    # eval applies the saved masks and reports both perplexities
    assert main(["eval", "--masks", str(out), "--eval-ctx", "64", "--eval-windows", "2", "--json"]) == 0
    ppl = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["perplexity"]
    assert ppl["pruned"] == pytest.approx(metrics["perplexity"]["proxsparse"], rel=1e-6)


def test_recipe_with_an_unknown_choice_is_one_clear_line(tmp_path, capsys):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"config": {"lambda_scale": "global", "steps": 3}}))
    assert main(["learn", "--recipe", str(recipe), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: lambda_scale must be one of none, layer; got 'global'"
    assert not (tmp_path / "out").exists()


def test_every_preset_is_a_valid_config_and_is_listed(capsys):
    from proxsparse_core.config import PRESETS, RunConfig
    assert main(["presets"]) == 0
    listed = capsys.readouterr().out
    for name, preset in PRESETS.items():
        cfg = RunConfig().with_preset(name).validate()
        assert name in listed and cfg.model == preset["settings"].get("model", RunConfig().model)
        # the published settings are the published method: one λ1 and lr, constant after warm-up
        if name.startswith(("llama", "mistral", "qwen", "openllama")):
            assert (cfg.lambda_scale, cfg.lr_schedule, cfg.steps, cfg.ctx in (2048, 4096)) == ("none", "constant", 400, True)
    assert RunConfig().with_preset("bundled-quality").lr_schedule == "cosine"


def test_cli_says_on_stderr_when_a_gpu_measures_the_2to4_kernels_before_an_answer(capsys):
    """On a GPU the first 2:4 answer waits while the 2:4 kernels are measured per layer shape
    (Workspace.decoding); `--prompt` says so on stderr, and stdout keeps the answers alone."""
    import argparse

    from proxsparse_core import cli

    class Workspace:
        def generate(self, name, prompt, settings, measuring=None):
            if name != "dense":
                measuring(1, 2)
                measuring(2, 2)
            return f"{name} says hi"

    cli._print_compare(Workspace(), ["dense", "proxsparse"],
                       argparse.Namespace(prompt="hi", max_new_tokens=4, no_repeat_ngram=0))
    out = capsys.readouterr()
    assert out.out.splitlines() == ["--- dense: 'dense says hi'", "--- proxsparse: 'proxsparse says hi'"]
    assert "measuring the 2:4 kernels on this GPU: 2 of 2 layer shapes" in out.err
