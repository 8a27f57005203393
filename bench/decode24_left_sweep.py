"""Diagnosis, not part of the product: up to 36 program shapes of the 2-16-token kernel with the weight as the
product's left operand (decode24.Config(left=True)), at 2 and 16 tokens on the three 7B shapes, timed like
bench/decode24.py (CUDA graphs cycling through 6 weight copies, median of replays); prints the five best per
cell and writes left_sweep.json under $OUT (default .). What it found is in bench/RESULTS.md 2a⁵.

    OUT=/some/dir python3 bench/decode24_left_sweep.py      # CUDA only
"""
import os, sys, json
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, torch.nn.functional as F
from proxsparse_core.inference import decode24 as d24
from proxsparse_core.inference.sparse24 import random_24_weight
from decode24 import graph_call_ms
C = d24.Config
cfgs = [C(bn=64, bk=128, split=4, warps=4, left=True), C(bn=64, bk=128, split=8, warps=4, left=True)]
for bn, w in ((16, 1), (32, 1), (32, 2), (64, 2), (64, 4)):
    for sp in (4, 8, 16):
        for st in (2, 4):
            cfgs.append(C(bn=bn, bk=128, split=sp, warps=w, stages=st, left=True))
for bn, w in ((32, 2), (64, 4)):
    for sp in (4, 8):
        cfgs.append(C(bn=bn, bk=256, split=sp, warps=w, left=True))
cfgs = list(dict.fromkeys(cfgs))
res = []
for (o, i) in [(4096, 4096), (11008, 4096), (4096, 11008)]:
    ws = [random_24_weight(o, i, seed=s) for s in range(6)]
    packed = [d24.pack_24(w) for w in ws]
    sem = torch.zeros(o, dtype=torch.int32, device="cuda")
    for t in (2, 16):
        x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
        row = dict(shape=f"{o}x{i}", tokens=t, dense=1e3 * graph_call_ms([lambda w=w: F.linear(x, w) for w in ws]))
        for c in cfgs:
            if c.split * 512 > i: continue
            try:
                row[str(c)] = 1e3 * graph_call_ms([lambda p=p: d24.mm24(x, *p, i, None, c, sem) for p in packed])
            except Exception as e:
                row[str(c)] = type(e).__name__
        best = sorted((v, k) for k, v in row.items() if isinstance(v, float) and k != "dense")[:5]
        print(row["shape"], t, f"dense {row['dense']:.1f}", [(k, round(v, 1), round(row['dense'] / v, 2)) for v, k in best], flush=True)
        res.append(row)
json.dump(res, open(os.path.join(os.environ.get("OUT", "."), "left_sweep.json"), "w"), indent=1)
