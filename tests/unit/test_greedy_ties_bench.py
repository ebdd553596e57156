"""The control perturbation of bench/greedy_ties.py: one ulp, never a NaN or an inf."""

import torch

from bench.greedy_ties import _flip_last_bits


def test_flips_only_the_last_mantissa_bit_of_about_the_asked_fraction():
    values = torch.randn(200_000).to(torch.bfloat16)
    flipped = _flip_last_bits(values, 0.01, seed=3)
    assert torch.isfinite(flipped.float()).all()
    before, after = values.view(torch.int16), flipped.view(torch.int16)
    changed = before != after
    assert torch.equal((before ^ after)[changed], torch.ones(int(changed.sum()), dtype=torch.int16))
    assert 0.008 < changed.float().mean().item() < 0.012
    assert torch.equal(_flip_last_bits(values, 0.0, seed=3).view(torch.int16), before)


def test_edge_values_stay_finite():
    # What an add-one-to-the-bits version got wrong: -0.0 became NaN, the largest finite
    # value became inf.
    biggest = torch.finfo(torch.bfloat16).max
    edges = torch.tensor([0.0, -0.0, biggest, -biggest], dtype=torch.bfloat16)
    flipped = _flip_last_bits(edges, 1.0, seed=0)
    assert torch.isfinite(flipped.float()).all()
    assert (flipped.view(torch.int16) != edges.view(torch.int16)).all()
