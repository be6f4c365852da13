"""Sparse task-vector storage (``prep.sparse_storage``): the same merge and training as dense storage, less memory."""

from __future__ import annotations

import pytest
import torch

from adamerge.errors import MergeInputError
from adamerge.methods import AdaMerging, ConcreteTaskArithmetic, TaskArithmetic
from adamerge.methods.base import TaskVectorPrep


@pytest.fixture(scope="module")
def batch(zoo):
    from conftest import mixed_batch

    return mixed_batch(zoo[0])


@pytest.mark.parametrize("tv_dtype", [None, "bfloat16"])
def test_sparse_adamerging_plusplus_equals_dense_with_less_memory(zoo, batch, tv_dtype):
    modules = {}
    for sparse in (False, True):
        m = AdaMerging(
            *zoo, granularity="layer", tv_dtype=tv_dtype, prep=TaskVectorPrep(ties_density=0.2, sparse_storage=sparse)
        )
        torch.manual_seed(0)
        m.merged.coefficients.weight.data += 0.1 * torch.randn_like(m.merged.coefficients.weight)
        modules[sparse] = m
    dense, sparse = modules[False], modules[True]
    assert not dense.merged.stores[0].sparse_keys and not sparse.merged.stores[0].dense_keys
    # frozen parameters, not buffers (DDP broadcasts buffers at every forward)
    assert not [n for n, _ in sparse.merged.stores.named_buffers()]
    assert not [n for n, p in sparse.merged.stores.named_parameters() if p.requires_grad]
    # storage: TIES keeps <= 20% of each task's entries, at 4 + 4 (float32) or 4 + 2 (bfloat16) bytes per kept entry
    # against 4 (2) per entry dense: at most 0.4 (0.6) of the dense bytes
    bound = 0.2 * (4 + 2) / 2 if tv_dtype else 0.2 * (4 + 4) / 4
    assert sparse.merged.task_vector_bytes() < (bound + 0.02) * dense.merged.task_vector_bytes()
    for n, tv in dense.merged.task_vectors().items():
        assert torch.equal(sparse.merged.task_vector(n), tv), n
    a, b = dense.merged.merged_params(), sparse.merged.merged_params()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-6)
    grads = []
    for m in (dense, sparse):
        loss, _ = m.objective(batch)
        loss.backward()
        grads.append(m.merged.coefficients.weight.grad)
    assert grads[0].abs().max() > 1e-6
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_sparse_storage_trains_like_dense(zoo, task_data):
    from conftest import fit_coefficients

    out = [
        fit_coefficients(
            AdaMerging(*zoo, granularity="layer", lr=0.01, prep=TaskVectorPrep(dare_rate=0.7, sparse_storage=sparse)),
            zoo,
            task_data,
        )
        for sparse in (False, True)
    ]
    assert (out[0] - 0.3).abs().max() > 1e-3
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=0)


def test_sparse_set_task_vectors_round_trip_and_data_free_merge(zoo):
    ta = TaskArithmetic(*zoo, scale=0.3, prep=TaskVectorPrep(dare_rate=0.5, seed=3))
    sp = TaskArithmetic(*zoo, scale=0.3, prep=TaskVectorPrep(dare_rate=0.5, seed=3, sparse_storage=True))
    a, b = ta.final_merged_params(), sp.final_merged_params()
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=1e-6, rtol=1e-6)
    halved = {n: tv / 2 for n, tv in sp.merged.task_vectors().items()}
    sp.merged.set_task_vectors(halved)
    n0 = next(iter(halved))
    assert n0 in sp.merged._store_of[n0].sparse_keys
    assert torch.equal(sp.merged.task_vector(n0), halved[n0])


def test_sparse_storage_refused_where_it_cannot_work(zoo):
    with pytest.raises(MergeInputError, match="sparse_storage"):
        ConcreteTaskArithmetic(*zoo, prep=TaskVectorPrep(ties_density=0.2, sparse_storage=True))
