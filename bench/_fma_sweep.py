"""Temporary: sweep the fma kernel's configurations (graph timing as bench/decode24.py)."""
import sys, json, torch
import torch.nn.functional as F
sys.path.insert(0, ".")
sys.path.insert(0, "bench")
from decode24 import graph_call_ms
from proxsparse_core.inference import decode24 as d24, decode24_triton as tri
from proxsparse_core.inference.sparse24 import random_24_weight
out = []
shapes = [(4096, 4096), (11008, 4096), (4096, 11008)]
cfgs = []
for bn, bk, w in [(4, 512, 1), (8, 512, 1), (8, 512, 2), (16, 512, 2), (16, 512, 4), (32, 512, 4), (8, 1024, 1), (16, 1024, 2)]:
    for sp in (1, 2, 4):
        cfgs.append(d24.Config(bn=bn, bk=bk, split=sp, warps=w, stages=1, kind="fma"))
        if (bn, w) in ((8, 1), (16, 2)):
            cfgs.append(d24.Config(bn=bn, bk=bk, split=sp, warps=w, stages=2, kind="fma"))
# registers of a few
w0 = random_24_weight(4096, 4096, seed=0); v, m = d24.pack_24(w0); words = v.view(torch.int32)
for t in (1, 2, 4):
    for bn, bg, wp, st in [(8, 128, 1, 1), (8, 128, 1, 2), (16, 128, 2, 1), (4, 128, 1, 1)]:
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16); y = torch.empty(t, 4096, device="cuda", dtype=torch.bfloat16)
        k = tri.gemv24[(4096 // bn, 1)](x.view(torch.int64), words, m, y, y, y, y, t, 4096, 4096, words.shape[1], m.shape[1],
                                        x.stride(0) // 4, y.stride(0), HAS_BIAS=False, BN=bn, BG=bg, TP=d24.bucket(t), SPLIT=1,
                                        BF16=True, EVEN=True, num_warps=wp, num_stages=st)
        print(f"t={t} bn={bn} bg={bg} warps={wp} stages={st}: regs {k.n_regs} spills {k.n_spills}", flush=True)
for (o, i) in shapes:
    ws = [random_24_weight(o, i, seed=s) for s in range(6)]
    packed = [d24.pack_24(w) for w in ws]
    sem = torch.zeros(o // 4 + 1, dtype=torch.int32, device="cuda")
    for t in (1, 2, 4):
        x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
        dense_ms = graph_call_ms([lambda w=w: F.linear(x, w) for w in ws])
        ref = F.linear(x, ws[0]).float()
        res = []
        for cfg in cfgs:
            try:
                y = d24.mm24(x, *packed[0], i, None, cfg, sem)
                err = float((y.float() - ref).norm() / ref.norm())
                ms = graph_call_ms([lambda p=p: d24.mm24(x, *p, i, None, cfg, sem) for p in packed])
            except Exception as e:
                print("  fail", cfg, type(e).__name__, str(e)[:100]); continue
            res.append((ms, str(cfg), err))
        res.sort()
        print(f"{o}x{i} t={t} dense {1e3*dense_ms:.1f} µs | " + " ".join(f"{c[4:]}={1e3*ms:.1f}" for ms, c, e in res[:6])
              + f" | best {dense_ms/res[0][0]:.2f}x err {res[0][2]:.1e}", flush=True)
        out.append(dict(shape=(o, i), t=t, dense=dense_ms, res=res))
json.dump(out, open(sys.argv[1] + "/sweep.json", "w"))
