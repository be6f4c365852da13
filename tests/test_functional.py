"""Hand-computed checks of the merge math: TIES, DARE, disjoint mean, M3 draws, BatchNorm over summed statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adamerge.core.functional import (
    dare,
    disjoint_mean,
    disjoint_normalize,
    merge_dense,
    merge_tensor,
    summed_batch_norm,
    ties_trim_elect,
    topk_mask,
)
from adamerge.methods.data_free import draw_mixing_weights


def test_merge_tensor_formula():
    base = torch.tensor([1.0, 2.0])
    tv = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert torch.equal(merge_tensor(base, tv, torch.tensor([0.5, 0.25])), torch.tensor([1.5, 3.0]))
    mask = torch.tensor([0.0, 1.0])
    assert torch.equal(merge_tensor(base, tv, torch.tensor([0.5, 0.25]), mask), torch.tensor([1.0, 3.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_bytes", [None, 100])  # 100 bytes: one task per up-cast chunk
def test_merge_tensor_gradient_and_saved_memory(dtype, chunk_bytes, monkeypatch):
    """The merge's values and λ-gradients equal plain autograd on the float32 stack, and its backward keeps no
    up-cast copy: what autograd saves is the stored stack (bfloat16 bytes when stored so) and λ, nothing more."""
    import adamerge.core.functional as F

    if chunk_bytes is not None:
        monkeypatch.setattr(F, "CAST_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    T, shape = 4, (32, 48)
    base = torch.randn(shape, generator=g)
    tv = (0.1 * torch.randn((T, *shape), generator=g)).to(dtype)
    weight = torch.randn(shape, generator=g)
    lam = torch.tensor([0.3, -0.2, 0.7, 0.1], requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = merge_tensor(base, tv, lam)
    (out * weight).sum().backward()
    ref_lam = lam.detach().clone().requires_grad_(True)
    ref = base + torch.tensordot(ref_lam, tv.float(), dims=1)
    (ref * weight).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam.grad, ref_lam.grad, rtol=1e-5, atol=1e-5)
    assert sum(saved) <= tv.numel() * tv.element_size() + lam.numel() * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_dense_group_matches_per_tensor_autograd(dtype):
    """One node for a group of tensors (one output unused by the loss) gives each column of ``∂L/∂λ`` as a
    per-tensor autograd reference does, and zero for the unused one."""
    g = torch.Generator().manual_seed(1)
    T, shapes = 3, [(5, 7), (7,), (4, 3, 2)]
    bases = [torch.randn(s, generator=g) for s in shapes]
    tvs = [torch.randn((T, *s), generator=g).to(dtype) for s in shapes]
    weights = [torch.randn(s, generator=g) for s in shapes]
    lam = torch.randn(T, len(shapes), generator=g, requires_grad=True)
    outs = merge_dense(bases, tvs, lam)
    (outs[0] * weights[0]).sum().add((outs[2] * weights[2]).sum()).backward()  # outs[1] unused
    ref_lam = lam.detach().clone().requires_grad_(True)
    refs = [b + torch.tensordot(ref_lam[:, j], tv.float(), dims=1) for j, (b, tv) in enumerate(zip(bases, tvs))]
    (refs[0] * weights[0]).sum().add((refs[2] * weights[2]).sum()).backward()
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lam.grad, ref_lam.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(lam.grad[:, 1], torch.zeros(T)) and lam.grad[:, 0].abs().min() > 0
    with pytest.raises(ValueError, match="coefficients"):
        merge_dense(bases, tvs, lam[:, :2])


def test_ties_trim_elect_disjoint_mean_by_hand():
    # two tasks, one tensor of 5 elements; density 0.6 keeps the 3 largest magnitudes per task
    tv = {"w": torch.tensor([[0.5, -0.1, 0.3, -0.9, 0.05], [-0.2, 0.4, 0.35, 0.8, 0.01]])}
    out = ties_trim_elect(tv, density=0.6, scope="global")["w"]
    # trimmed: task0 keeps 0.5, 0.3, -0.9 ; task1 keeps 0.4, 0.35, 0.8
    # elected sign per element of the trimmed sum: [+0.5, +0.4, +0.65, -0.1, 0] -> [+, +, +, -, 0]
    expected = torch.tensor([[0.5, 0.0, 0.3, -0.9, 0.0], [0.0, 0.4, 0.35, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)
    # disjoint mean: average over tasks that kept the entry
    torch.testing.assert_close(disjoint_mean(out), torch.tensor([0.5, 0.4, 0.325, -0.9, 0.0]))


def test_ties_global_scope_ranks_across_tensors():
    tv = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0, 4.0]])}
    out = ties_trim_elect(tv, density=0.5, scope="global")
    assert torch.equal(out["a"], torch.zeros(1, 2)) and torch.equal(out["b"], torch.tensor([[3.0, 4.0]]))
    per_tensor = ties_trim_elect(tv, density=0.5, scope="tensor")
    assert torch.equal(per_tensor["a"], torch.tensor([[0.0, 2.0]]))


def test_topk_mask_density_bounds():
    with pytest.raises(ValueError, match="density"):
        topk_mask(torch.ones(1, 4), 0.0)
    assert topk_mask(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), 0.5).tolist() == [[False, True, True, False]]


def test_dare_exact_mask_under_seed_and_rescale():
    tv = torch.ones(2, 1000)
    a = dare(tv, 0.3, torch.Generator().manual_seed(7))
    b = dare(tv, 0.3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    keep = torch.rand(tv.shape, generator=torch.Generator().manual_seed(7)) >= 0.3
    assert torch.equal(a, tv * keep / 0.7)
    torch.testing.assert_close(a.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert not torch.equal(a, dare(tv, 0.3, torch.Generator().manual_seed(8)))


def test_dare_preserves_expectation_over_seeds():
    tv = torch.linspace(-1, 1, 500).expand(2, -1)
    mean = torch.stack([dare(tv, 0.7, torch.Generator().manual_seed(s)) for s in range(400)]).mean(0)
    # E[dare(x)] = x; the sample mean of 400 draws has std sqrt(p/(1-p))|x|/20 <= 0.077
    assert (mean - tv).abs().mean() < 0.03
    assert (mean - tv).abs().max() < 0.35


def test_disjoint_normalize_with_weights_interpolates_shared_and_passes_single():
    tv = torch.tensor([[2.0, 1.0, 0.0], [4.0, 0.0, 0.0]])
    w = torch.tensor([0.25, 0.75])
    merged = (w[:, None] * disjoint_normalize(tv, w)).sum(0)
    # shared entry: 0.25*2 + 0.75*4; single entry passes through; empty stays 0
    torch.testing.assert_close(merged, torch.tensor([3.5, 1.0, 0.0]))


def test_m3_draws_are_seeded_beta_for_two_and_dirichlet_for_more():
    a, b = draw_mixing_weights(2, 0.5, seed=11, k=3), draw_mixing_weights(2, 0.5, seed=11, k=3)
    assert np.array_equal(a, b)
    lam = np.random.default_rng(11).beta(0.5, 0.5, size=3)
    np.testing.assert_allclose(a, np.stack([lam, 1 - lam], 1))
    d = draw_mixing_weights(4, 0.5, seed=2, k=5)
    assert d.shape == (5, 4)
    np.testing.assert_allclose(d.sum(1), 1.0)
    assert not np.array_equal(d, draw_mixing_weights(4, 0.5, seed=3, k=5))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 2, 5)])
def test_summed_batch_norm_is_batch_normalisation_over_all_rows(shape):
    """One process (the sum over ranks is the identity): per channel (axis 1), (x − mean) / sqrt(biased var + eps)
    scaled and shifted, computed in float64 by hand; the gradients (input, weight, bias) equal torch's own
    training-mode batch_norm's. Rows held twice over (a sum that doubles: two ranks with the same rows) give the same
    statistics."""
    torch.manual_seed(0)
    x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).float().requires_grad_(True)
    w = torch.tensor([1.5, -0.5, 2.0], requires_grad=True)
    b = torch.tensor([0.1, 0.2, -0.3], requires_grad=True)
    c = shape[1]
    xd = x.detach().double().transpose(0, 1).reshape(c, -1).numpy()
    mean, var = xd.mean(1), ((xd - xd.mean(1, keepdims=True)) ** 2).mean(1)
    view = (1, c) + (1,) * (len(shape) - 2)
    ref = (x.detach().double() - torch.tensor(mean).view(view)) / torch.sqrt(torch.tensor(var).view(view) + 1e-5)
    ref = ref * w.detach().double().view(view) + b.detach().double().view(view)
    out = summed_batch_norm(x, w, b, 1e-5, lambda t: t)
    assert out.dtype == torch.float32 and torch.allclose(out.double(), ref, atol=1e-5)
    assert torch.allclose(summed_batch_norm(x, w, b, 1e-5, lambda t: 2 * t), out, atol=1e-6)
    g = torch.randn(shape)
    grads = torch.autograd.grad((out * g).sum(), (x, w, b))
    y = torch.nn.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    want = torch.autograd.grad((y * g).sum(), (x, w, b))
    for got, ref_grad in zip(grads, want):
        assert torch.allclose(got, ref_grad, atol=1e-5)
    assert summed_batch_norm(x.bfloat16(), w, b, 1e-5, lambda t: t).dtype == torch.bfloat16
