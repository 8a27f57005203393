"""Masks: exact 2:4, survivors equal W0, verification catches violations, packing round-trips."""
import torch

from proxsparse_core.sparsity.masks import (extract_masks, mask_2to4, pack_masks, pruned_weights, snapshot,
                                   swapped, unpack_masks, verify)
from proxsparse_core.sparsity.prunable import find_prunable


def test_mask_keeps_exactly_two_largest_with_deterministic_ties():
    w = torch.tensor([[0.1, -0.5, 0.3, 0.2, 1.0, 1.0, 1.0, 1.0]])
    m = mask_2to4(w)
    assert m.tolist() == [[False, True, True, False, True, True, False, False]]
    assert torch.equal(m, mask_2to4(w.clone()))


def test_tiny_llama_pruned_is_exact_2to4_and_survivors_equal_w0(tiny_llama):
    ps = find_prunable(tiny_llama)
    assert len(ps.names) == 2 * 7  # q k v o gate up down per block
    assert all("embed" not in n and "lm_head" not in n for n in ps.names)
    w0 = snapshot(ps)
    masks = extract_masks(ps)
    for n, m in masks.items():
        assert bool((m.view(-1, 4).sum(1) == 2).all())
    with swapped(ps, pruned_weights(w0, masks), w0):
        v = verify(ps, masks, w0)
        assert v.ok, str(v)
        assert v.groups == sum(w.numel() // 4 for w in w0.values())
    # swapped restores W0 exactly
    for n in ps.names:
        assert torch.equal(ps.modules[n].weight, w0[n])


def test_verify_catches_dense_groups_and_changed_survivors(tiny_llama):
    ps = find_prunable(tiny_llama)
    w0 = snapshot(ps)
    masks = extract_masks(ps)
    bad = pruned_weights(w0, masks)
    name = ps.names[0]
    bad[name] = bad[name].clone()
    bad[name].view(-1, 4)[0] = torch.tensor([1.0, 2.0, 3.0, 0.0])   # 3 non-zeros
    with swapped(ps, bad, w0):
        v = verify(ps, masks, w0)
    assert not v.ok and v.bad_groups == 1
    changed = pruned_weights(w0, masks)
    changed[name] = changed[name] * 1.5
    with swapped(ps, changed, w0):
        assert not verify(ps, masks, w0).ok
        assert verify(ps, masks, w0, updated_ok=True).ok


def test_layers_with_input_not_divisible_by_4_are_skipped_and_listed():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=126, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    ps = find_prunable(LlamaForCausalLM(cfg))
    assert [n for n, _ in ps.skipped] == ["model.layers.0.mlp.down_proj"]
    assert "down_proj" not in " ".join(ps.names)
    assert "skipped 1" in ps.summary()


def test_pack_unpack_round_trip_is_exact_and_small(tiny_llama):
    masks = extract_masks(find_prunable(tiny_llama))
    packed = pack_masks(masks)
    back = unpack_masks(packed, {n: m.shape for n, m in masks.items()})
    assert all(torch.equal(back[n], masks[n]) for n in masks)
    assert sum(p.nbytes for p in packed.values()) * 8 == sum(m.numel() for m in masks.values())


def test_fast_mask_matches_a_stable_sort_with_ties_zeros_and_nan():
    def by_sort(w):
        s = w.abs().float().reshape(-1, 4)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :2]
        return torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True).view(w.shape)
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-2, 3, (64, 32), generator=g).float()      # many ties, many zeros
    w[:8] = torch.randn(8, 32, generator=g)
    assert torch.equal(mask_2to4(w), by_sort(w))
    assert torch.equal(mask_2to4(w.bfloat16()), by_sort(w.bfloat16()))
    w[0, 1] = float("nan")
    assert torch.equal(mask_2to4(w), by_sort(w)) and mask_2to4(w)[0, 1]
