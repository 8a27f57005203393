"""Compile the fma kernel for one config and print registers, spills and its SASS instruction mix."""
import collections, re, sys, torch
sys.path.insert(0, ".")
from proxsparse_core.inference import decode24 as d24, decode24_triton as tri
from proxsparse_core.inference.sparse24 import random_24_weight
o, i = 4096, 4096
w = random_24_weight(o, i, seed=0)
values, meta = d24.pack_24(w)
words = values.view(torch.int32)
for t, bn, warps in [(1, 8, 1), (2, 8, 1)]:
    x = torch.randn(t, i, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(t, o, device="cuda", dtype=torch.bfloat16)
    k = tri.gemv24[(o // bn, 1)](x.view(torch.int64), words, meta, y, y, y, y, t, o, i, words.shape[1], meta.shape[1],
                                 x.stride(0) // 4, y.stride(0), HAS_BIAS=False, BN=bn, BG=128, TP=t, SPLIT=1,
                                 BF16=True, EVEN=True, num_warps=warps, num_stages=2)
    sass = k.asm.get("sass", "")
    print("t", t, "bn", bn, "regs", k.n_regs, "spills", k.n_spills, "sass lines", len(sass.splitlines()), flush=True)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)", line)
        if m:
            ops[m.group(2)] += 1
    print(sorted(ops.items(), key=lambda kv: -kv[1])[:45], flush=True)
    open(f"{sys.argv[1]}/sass_t{t}.txt", "w").write(sass)
    open(f"{sys.argv[1]}/ttgir_t{t}.txt", "w").write(k.asm.get("ttgir", ""))
