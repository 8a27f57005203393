"""Share of 2:4 groups two saved mask files (bench/split_step.py --masks) choose alike.

    python bench/compare_masks.py a.pt b.pt
"""
import sys

import torch

a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
same = total = 0
for n in a:
    ga, gb = a[n].reshape(-1, 4), b[n].reshape(-1, 4)
    same += int((ga == gb).all(1).sum())
    total += ga.shape[0]
print(f"groups with the same mask: {same:,} of {total:,} ({100 * same / total:.3f}%)")
