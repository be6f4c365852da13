"""TSV-M and Iso-C (issue 19): the per-task pieces sum to the published merges (slow float64 references written
from the papers' algorithms, and closed forms), the modules merge that, and AdaMerging learns coefficients over them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_coefficients

from adamerge.core.functional import iso_c_pieces, subspace_pieces, tsv_pieces
from adamerge.methods import TSVM, AdaMerging, IsoC, TaskVectorPrep


def tsv_reference(tvs: list[np.ndarray]) -> np.ndarray:
    """TSV-M of one matrix, float64, written from the paper: per task keep the top k = min(m, n) // T singular
    triplets, stack the kept left and right singular vectors, orthogonalise each stack (U = P Qᵀ from its SVD), and
    recombine with the kept singular values. (A matrix with k = 0 takes the mean of the task vectors: see the module
    test.)"""
    T = len(tvs)
    k = min(tvs[0].shape) // T
    U, S, Vt = [], [], []
    for tv in tvs:
        u, s, vt = np.linalg.svd(tv, full_matrices=False)
        U.append(u[:, :k])
        S.append(s[:k])
        Vt.append(vt[:k])
    U, S, Vt = np.concatenate(U, 1), np.concatenate(S), np.concatenate(Vt, 0)
    pu, _, qu = np.linalg.svd(U, full_matrices=False)
    pv, _, qv = np.linalg.svd(Vt, full_matrices=False)
    return (pu @ qu) @ np.diag(S) @ (pv @ qv)


def iso_c_reference(tvs: list[np.ndarray]) -> np.ndarray:
    """Iso-C of one matrix, float64: the SVD of the sum with every singular value replaced by their mean — over
    the sum's nonzero singular values (its numerical rank at float32's precision), the null space left out."""
    u, s, vt = np.linalg.svd(sum(tvs), full_matrices=False)
    if s.max() == 0:
        return np.zeros_like(sum(tvs))
    keep = s > s.max() * max(tvs[0].shape) * np.finfo(np.float32).eps
    return s[keep].mean() * (u[:, keep] @ vt[keep])


def random_stack(T=3, m=12, n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, m, n, generator=g, dtype=torch.float64).float()


@pytest.mark.parametrize("shape", [(3, 12, 9), (4, 8, 16), (2, 5, 5)])
def test_tsv_pieces_sum_to_the_reference(shape):
    tv = random_stack(*shape)
    got = tsv_pieces(tv).double().sum(0).numpy()
    ref = tsv_reference([t.double().numpy() for t in tv])
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_tsv_of_tasks_in_orthogonal_subspaces_is_task_arithmetic():
    """Closed form: task vectors of rank k = n/T whose singular vectors are already mutually orthogonal are kept
    whole and not rotated, so TSV-M equals their plain sum."""
    T, n, k = 3, 9, 3
    q_left, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    q_right, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    tvs = torch.stack(
        [
            q_left[:, t * k : (t + 1) * k]
            @ torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * (t + 1))
            @ q_right[:, t * k : (t + 1) * k].T
            for t in range(T)
        ]
    ).float()
    assert torch.allclose(tsv_pieces(tvs).sum(0), tvs.sum(0), atol=1e-5)
    assert torch.allclose(tsv_pieces(tvs), tvs, atol=1e-5)  # each piece is its own task vector


def test_tsv_of_low_rank_task_vectors_ignores_directions_at_numerical_zero():
    """A rank-2 task vector beside one that leaves the matrix unchanged (a LoRA adapter that does not target it):
    TSV-M keeps the first exactly (its top-k truncation is itself, already orthonormal), whatever noise at 1e-9
    the second carries; without dropping those directions they rotate the first's."""
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g)
    for noise in (0.0, 1e-9):
        zero = noise * torch.randn(12, 10, generator=g)
        pieces = tsv_pieces(torch.stack([low, zero]))
        torch.testing.assert_close(pieces[0], low, atol=1e-5, rtol=1e-5)
        assert pieces[1].abs().max() < 1e-6


@pytest.mark.parametrize("shape", [(3, 12, 9), (4, 8, 16)])
def test_iso_c_pieces_sum_to_the_reference(shape):
    tv = random_stack(*shape, seed=3)
    got = iso_c_pieces(tv).double().sum(0).numpy()
    ref = iso_c_reference([t.double().numpy() for t in tv])
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_iso_c_closed_forms():
    # sum diag(3, 1): the flat spectrum is diag(2, 2)
    tv = torch.stack([torch.diag(torch.tensor([2.0, 0.0])), torch.diag(torch.tensor([1.0, 1.0]))])
    assert torch.allclose(iso_c_pieces(tv).sum(0), torch.diag(torch.tensor([2.0, 2.0])), atol=1e-6)
    # a rank-deficient sum diag(3, 1, 0): the flat spectrum over its rank, diag(2, 2, 0) — not the published
    # formula's 4/3 on all three directions, the third an arbitrary null one; each task keeps its own direction
    tv = torch.stack([torch.diag(torch.tensor([3.0, 0.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0, 0.0]))])
    pieces = iso_c_pieces(tv)
    assert torch.allclose(pieces.sum(0), torch.diag(torch.tensor([2.0, 2.0, 0.0])), atol=1e-6)
    assert torch.allclose(
        pieces,
        torch.stack([torch.diag(torch.tensor([2.0, 0.0, 0.0])), torch.diag(torch.tensor([0.0, 2.0, 0.0]))]),
        atol=1e-6,
    )
    # low-rank task vectors (LoRA products B A, rank 2 each) in a 12 × 10 matrix: the merge lies in their span
    g = torch.Generator().manual_seed(0)
    lows = torch.stack([torch.randn(12, 2, generator=g) @ torch.randn(2, 10, generator=g) for _ in range(2)])
    merged = iso_c_pieces(lows).sum(0)
    u, s, vh = torch.linalg.svd(lows.sum(0))
    torch.testing.assert_close(merged, s[:4].mean() * u[:, :4] @ vh[:4], atol=1e-5, rtol=1e-5)
    assert torch.linalg.matrix_rank(merged) == 4
    # nothing changed: nothing merged
    assert torch.equal(iso_c_pieces(torch.zeros(2, 3, 4)), torch.zeros(2, 3, 4))


def test_non_matrices_and_skipped_names_take_the_mean():
    tvs = {
        "encoder.layer.0.dense.bias": torch.randn(3, 7),
        "embeddings.word_embeddings.weight": torch.randn(3, 20, 8),
        "encoder.layer.0.dense.weight": torch.randn(3, 8, 8),
    }
    for kind in ("tsv", "iso_c"):
        out = subspace_pieces(tvs, kind, skip=("word_embeddings",))
        for name in ("encoder.layer.0.dense.bias", "embeddings.word_embeddings.weight"):
            assert torch.allclose(out[name], tvs[name] / 3)
        assert not torch.allclose(out["encoder.layer.0.dense.weight"], tvs["encoder.layer.0.dense.weight"] / 3)


@pytest.mark.parametrize("cls,reference", [(TSVM, tsv_reference), (IsoC, iso_c_reference)])
def test_modules_merge_base_plus_scale_times_the_reference(zoo, cls, reference):
    from transformers import AutoModel

    base, paths = zoo
    module = cls(base, paths, scale=0.8)
    merged = module.final_merged_params()
    theta0 = AutoModel.from_pretrained(base).state_dict()
    fts = {t: AutoModel.from_pretrained(p).state_dict() for t, p in paths.items()}
    checked = 0
    for name, got in merged.items():
        tvs = [(fts[t][name] - theta0[name]).double().numpy() for t in paths]
        if (
            got.ndim == 2
            and "word_embeddings" not in name
            and (reference is iso_c_reference or min(got.shape) >= len(paths))
        ):
            delta = reference(tvs)
            checked += 1
        else:
            delta = sum(tvs) / len(tvs)
        expected = theta0[name].double().numpy() + 0.8 * delta
        assert np.abs(got.double().numpy() - expected).max() < 1e-4, name
    assert checked >= 10


def test_adamerging_over_tsv_starts_at_tsv_m_and_trains_only_coefficients(zoo, task_data):
    base, paths = zoo
    reference = TSVM(base, paths).final_merged_params()
    module = AdaMerging(base, paths, granularity="layer", init=1.0, prep=TaskVectorPrep(subspace="tsv"))
    start = module.final_merged_params()
    assert all(torch.allclose(start[n], reference[n], atol=1e-6) for n in reference)
    assert [n for n, p in module.named_parameters() if p.requires_grad] == ["merged.coefficients.weight"]
    coef = fit_coefficients(module, zoo, task_data, steps=3)
    assert (coef - 1.0).abs().max() > 1e-4


def test_subspace_prep_errors():
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match="prep.subspace: unknown value 'svd'"):
        TaskVectorPrep(subspace="svd")


def test_prep_from_python_may_be_a_dict_of_its_fields(zoo):
    """``prep={"ties_density": 0.2}`` (a config's mapping, written in Python) merges as ``TaskVectorPrep(...)`` does,
    and is recorded the same; an unknown field or a wrong type is refused, naming it."""
    from adamerge.errors import MergeInputError

    base, paths = zoo
    as_dict = AdaMerging(base, paths, granularity="layer", prep={"ties_density": 0.2, "subspace": "tsv"})
    as_prep = AdaMerging(base, paths, granularity="layer", prep=TaskVectorPrep(ties_density=0.2, subspace="tsv"))
    assert as_dict.prep == as_prep.prep and as_dict.prep.ties_density == 0.2
    a, b = as_dict.merged.merged_params(), as_prep.merged.merged_params()
    plain = AdaMerging(base, paths, granularity="layer").merged.merged_params()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # the prep changed the merge
    with pytest.raises(MergeInputError, match="prep: unknown field 'ties_k'"):
        AdaMerging(base, paths, prep={"ties_k": 0.2})
    with pytest.raises(MergeInputError, match="prep: expected a mapping"):
        AdaMerging(base, paths, prep=0.2)
