"""The 2:4 inference path without a GPU: cuSPARSELt's two ops are replaced by an exact emulation
with their calling convention (A [m, k] compressed, B [k, n] dense, A·B written transposed on
request, n a multiple of 8) and CUDA timing by stand-ins, so the module's own logic runs here:
layouts, padding, bias, the algorithm cache, restoring the model, the prefill comparison, the
report, the Compare tab's handler and the bench's tables. The real kernels: tests/test_cuda.py."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_llama
from proxsparse_core.inference import sparse24 as si
from proxsparse_core.sparsity.masks import apply_masks, extract_masks, mask_2to4
from proxsparse_core.sparsity.prunable import find_prunable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGraph:
    def __init__(self, fn):
        self.replay = fn


@pytest.fixture
def emulated(monkeypatch):
    """torch._cslt_* emulated on the CPU; timing stand-ins that run the function and report 1 ms."""
    calls = {"mm": 0, "search": 0, "shapes": []}

    def compress(w):
        assert w.is_contiguous() and w.dim() == 2
        return w.clone()

    def sparse_mm(a, b, bias=None, alpha=None, out_dtype=None, transpose_result=False, alg_id=0,
                  split_k=1, split_k_mode=-1):
        m, k = a.shape
        assert b.shape[0] == k and b.shape[1] % si.TOKEN_MULTIPLE == 0 and b.dtype == a.dtype
        calls["mm"] += 1
        calls["shapes"].append((tuple(b.shape), b.stride()))
        y = a.float() @ b.float()
        if bias is not None:
            y = y + bias.float()[:, None]
        y = y.to(b.dtype)
        return y.t().contiguous() if transpose_result else y

    def search(a, b, bias=None, alpha=None, out_dtype=None, transpose_result=False):
        calls["search"] += 1
        return 1

    def fake_ms(fn, reps=1, warmup=0, **kw):
        fn()
        return 1.0

    monkeypatch.setattr(torch, "_cslt_compress", compress, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", search, raising=False)
    monkeypatch.setattr(si.SparseLinear24, "_algs", {})
    monkeypatch.setattr(si, "convertible", lambda w: w.dtype in si.DTYPES and w.shape[0] % 16 == 0
                        and w.shape[1] % 16 == 0)
    monkeypatch.setattr(si, "median_ms", fake_ms)
    monkeypatch.setattr(si, "loop_ms", fake_ms)
    monkeypatch.setattr(si, "graph_ms", fake_ms)
    monkeypatch.setattr(si, "bench_ms", lambda fn: None)
    monkeypatch.setattr(si, "capture", lambda fn, warmup=2: (FakeGraph(fn), fn()))
    monkeypatch.setattr(si, "_free", lambda: None)

    class DenseSemi(torch.nn.Module):            # the old path: same product, no GPU
        def __init__(self, weight, bias=None):
            super().__init__()
            self.w, self.b = weight, bias

        def forward(self, x):
            return F.linear(x, self.w, self.b)
    monkeypatch.setattr(si, "_SemiStructuredLinear", DenseSemi)
    return calls


def sparse_tiny_llama(hidden=64, inter=128):
    model = make_tiny_llama(hidden=hidden, inter=inter).to(torch.bfloat16)
    prunable = find_prunable(model)
    apply_masks(prunable, extract_masks(prunable))
    return model, prunable


def test_sparse_linear_is_x_times_w_transposed_with_bias_and_padding(emulated):
    w = si.random_24_weight(64, 128, device="cpu")
    b = torch.randn(64).bfloat16()
    x = torch.randn(2, 13, 128).bfloat16()                 # 26 tokens: padded to 32 for the kernel
    layer = si.SparseLinear24(w, b)
    y = layer(x)
    assert y.shape == (2, 13, 64) and y.is_contiguous()
    torch.testing.assert_close(y.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)
    # the input goes in as a transposed view of the [tokens, in] rows: no copy of it
    (shape, stride), = emulated["shapes"][-1:]
    assert shape == (128, 32) and stride == (1, 128)
    # one algorithm search per (shape, token count), shared by every layer of that shape
    si.SparseLinear24(w, b)(x)
    layer(torch.randn(5, 128).bfloat16())
    assert emulated["search"] == 2


def test_sparse_linears_runs_24_layers_sparse_and_restores_the_model(emulated):
    model, prunable = sparse_tiny_llama()
    first = prunable.modules[prunable.names[0]]
    with torch.no_grad():
        first.weight[0, :4] = torch.tensor([1.0, 1.0, 1.0, 0.0])      # one layer that is not 2:4
    hooked = prunable.modules[prunable.names[1]]
    hooked.forward = hooked.forward                                  # as accelerate's hooks do
    weights = {n: prunable.modules[n].weight.clone() for n in prunable.names}
    ids = torch.randint(2, 256, (1, 24))
    with torch.no_grad():
        dense = model(input_ids=ids).logits.float()
        with si.sparse_linears(prunable) as (done, skipped):
            assert skipped == [prunable.names[0]] and len(done) == len(prunable.names) - 1
            sparse = model(input_ids=ids).logits.float()
        assert emulated["mm"] >= len(done)
        after = model(input_ids=ids).logits.float()
    assert float((sparse - dense).norm() / dense.norm()) < 2e-2
    assert torch.equal(after, dense)
    assert all(torch.equal(prunable.modules[n].weight, weights[n]) for n in prunable.names)
    assert "forward" in hooked.__dict__ and "forward" not in prunable.modules[prunable.names[2]].__dict__
    with pytest.raises(ZeroDivisionError):                          # restored after an error too
        with si.sparse_linears(prunable):
            1 / 0
    assert all("forward" not in prunable.modules[n].__dict__ for n in prunable.names[2:])


def test_prefill_speedup_compares_dense_and_24_on_the_same_inputs(emulated, monkeypatch):
    model, prunable = sparse_tiny_llama()
    prompt = torch.randint(2, 256, (1, 40))
    rows, done, skipped = si.prefill_speedup(model, prunable, [16, 40, 16], prompts={40: prompt}, reps=1,
                                             logits=True)
    assert [r.tokens for r in rows] == [16, 40] and len(done) == len(prunable.names) and not skipped
    for r in rows:
        assert r.dense_graph_ms is not None and r.sparse_graph_ms is not None and r.agreement >= 0.9
        assert r.dense_ms == min(r.dense_eager_ms, r.dense_graph_ms)       # each side at its fastest
        assert r.sparse_ms == min(r.sparse_eager_ms, r.sparse_graph_ms)
        assert r.logits_rel_error < 2e-2
    assert all("forward" not in prunable.modules[n].__dict__ for n in prunable.names)

    def no_graph(fn, warmup=2):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(si, "capture", no_graph)
    rows, _, _ = si.prefill_speedup(model, prunable, [16], reps=1)
    assert rows[0].timing == "eager" and "no CUDA graph" in rows[0].note
    # float32 weights cannot go on sparse tensor cores: nothing is timed, and the report says why
    model.float()
    rows, done, skipped = si.prefill_speedup(model, prunable, [16], reps=1)
    assert rows == [] and done == [] and skipped == prunable.names
    assert "Load the model in bfloat16" in si.describe(rows, done, skipped)


def test_next_tokens_equal_the_full_logits_argmax():
    model, _ = sparse_tiny_llama()
    ids = torch.randint(2, 256, (1, 50))
    with torch.no_grad():
        full = model.float()(input_ids=ids).logits.argmax(-1)
    assert torch.equal(si.next_tokens(model, ids, chunk=16), full)


def test_describe_says_plainly_where_24_is_slower():
    rows = [si.PrefillRow(512, 1.0, 2.0, "CUDA graph", 1.0), si.PrefillRow(16384, 130.0, 100.0, "CUDA graph", 0.995)]
    text = si.describe(rows, ["a"], [], device="H200")
    assert "SLOWER at 512 tokens and faster at 16384 tokens" in text
    assert "0.50× (SLOWER" in text and "1.30× (faster" in text and "99.5% of positions" in text
    assert "every length" in si.describe(rows[:1], ["a"], [])
    assert "faster at every length" in si.describe(rows[1:], ["a"], [])
    assert "No prunable layer" in si.describe([], [], ["a", "b"])
    missing = si.describe([si.PrefillRow(8192, note="not enough GPU memory at this length")] + rows, ["a"], [])
    assert "8192 tokens: not measured (not enough GPU memory" in missing


def test_lengths_to_measure_include_the_prompt_and_respect_max_positions():
    assert si.lengths_to_measure(37, 8192) == [37, 2048, 8192]
    assert si.lengths_to_measure(0, None) == [2048, 8192, 16384]
    assert si.lengths_to_measure(20000, 8192) == [2048, 8192]
    assert si.lengths_to_measure(100, 512) == [100]


def test_top2_weights_keep_the_two_largest_of_each_group():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 1.0, 0.0, -2.0, 0.5]])
    out = si.top2_weights({"w": w})["w"]
    assert torch.equal(out, torch.tensor([[0.0, -0.5, 0.3, 0.0, 1.0, 0.0, -2.0, 0.0]]))


def test_speedup_figure_marks_the_dense_line_and_slower_points():
    pytest.importorskip("plotly", exc_type=ImportError)
    from ui.figures import FASTER, SLOWER, speedup_figure
    fig = speedup_figure([512, 2048, 16384], [0.6, 1.0, 1.3], [1.0, 4.0, 130.0], [1.7, 4.0, 100.0])
    assert any(s.y0 == 1.0 and s.y1 == 1.0 for s in fig.layout.shapes)
    assert list(fig.data[0].marker.color) == [SLOWER, FASTER, FASTER]
    assert fig.layout.xaxis.type == "log"


def test_compare_tab_measures_the_loaded_model_and_leaves_it_dense(emulated, monkeypatch, tmp_path):
    pytest.importorskip("gradio", exc_type=ImportError)
    pytest.importorskip("plotly", exc_type=ImportError)
    from proxsparse_core.config import RunConfig
    from proxsparse_core.results import LEARNED, Pruning
    from test_ui_tiny_model import save_tiny_model
    from ui import compare_tab
    from ui.jobs import JobManager

    monkeypatch.setattr(si, "status", lambda: (True, "an emulated GPU"))
    jobs = JobManager()
    cfg = RunConfig(model=str(save_tiny_model(tmp_path / "tiny")), device="cpu", dtype="bfloat16",
                    samples=8, ctx=32, eval_ctx=32, eval_windows=4).validate()
    with jobs.claim("loading"):
        jobs.ensure_loaded(cfg)
    ws = jobs.ws
    before = {n: ws.lm.prunable.modules[n].weight.clone() for n in ws.lm.prunable.names}
    ws.lm.max_positions = 64                          # lengths: the prompt's only
    text, fig = compare_tab.measure_speedup(jobs, "hello world", figure=True)
    assert "top-2 magnitude" in text and "the prompt is" in text and "1.00×" in text and fig is not None
    masks = {n: mask_2to4(torch.randn_like(w, dtype=torch.float32)) for n, w in before.items()}
    ws.add_result(LEARNED, Pruning(LEARNED, masks))
    assert "the learned mask" in compare_tab.measure_speedup(jobs, "")
    for n in ws.lm.prunable.names:                    # the workspace model is dense again
        assert torch.equal(ws.lm.prunable.modules[n].weight, before[n])
        assert "forward" not in ws.lm.prunable.modules[n].__dict__
    assert jobs.activity is None


def test_bench_tables_run_end_to_end(emulated):
    spec = importlib.util.spec_from_file_location("bench_sparse_infer", os.path.join(ROOT, "bench", "sparse_infer.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = {"device": "emulated", "backend": si.backend()}
    out["per_product"] = bench.per_product(shapes=[(32, 64)], tokens=[16, 24], reps=1, device="cpu")
    out["prefill"] = bench.prefill(1, lengths=[16, 32], old_lengths=[16], noise_at=16, reps=1, device="cpu",
                                   hidden=64, inter=128, heads=4, vocab=256, max_positions=64)
    assert [r["tokens"] for r in out["prefill"]["rows"]] == [16, 32]
    assert set(out["prefill"]["noise_floor"]) >= {"dense_vs_fp32", "sparse_vs_fp32", "sparse_vs_dense"}
    text = bench.summary(out)
    assert "TARGET per product" in text and "TARGET prefill" in text and "old path, eager" in text
    import json
    json.dumps(out)                                   # what --json writes
