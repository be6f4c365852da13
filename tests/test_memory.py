"""Memory paths (issue 18): embedding tables merged row by row, task vectors offloaded to CPU memory and streamed,
FSDP2-sharded task vectors on a LLaMA-shaped model, layers merged inside activation checkpoints (``recompute``). Each
one must give the plain path's logits, gradients and trained coefficients."""

from __future__ import annotations

import pytest
import torch
from conftest import WORDS, save_lm_zoo, tiny_llama

from adamerge.core.functional import LookupWeight, merge_dense
from adamerge.engine.model import RECOMPUTE, MergedModel
from adamerge.methods import AdaMerging
from adamerge.methods.base import TaskVectorPrep
from adamerge.objectives import entropy_objective
from adamerge.parametrize import Coefficients
from adamerge.pool import load_pool

VOCAB = len(WORDS) + 5


def llama_zoo(root, tied: bool):
    return save_lm_zoo(root, lambda: tiny_llama(tied), ("chat", "code", "math"))


def lm_batch(T: int, rows: int = 3, length: int = 10):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(5, VOCAB, (T * rows, length), generator=g)
    mask = torch.ones_like(ids)
    ids[::2, -3:], mask[::2, -3:] = 0, 0  # right padding with the pad id (the embedding's padding_idx for BERT)
    return {"input_ids": ids, "attention_mask": mask}


def logits_and_grad(merged: MergedModel, inputs, tasks, sizes):
    merged.coefficients.weight.grad = None
    out = merged(inputs, tasks, sizes)
    loss, _ = entropy_objective(out)
    loss.backward()
    return {t: v.detach() for t, v in out.items()}, merged.coefficients.weight.grad.clone()


@pytest.fixture(scope="module")
def bert(zoo):
    base, paths = zoo
    return load_pool(base, paths)


def test_embedding_rows_merge_like_whole_tables_and_the_by_hand_reference(zoo, bert):
    from conftest import mixed_batch
    from test_core import slow_reference_grad  # a materialised model per task, merged by hand

    b = mixed_batch(zoo[0])
    inputs, tasks, sizes = b["inputs"], b["tasks"], b["sizes"]
    assert (inputs["input_ids"] == 0).any()  # pad tokens: the embedding's padding_idx row gets no gradient
    torch.manual_seed(0)
    lam0 = 0.3 + 0.1 * torch.randn(3, len(bert.param_names))
    merged = MergedModel(bert, Coefficients(3, len(bert.param_names), "layer", lam0))
    assert set(merged.lookup_tables) == {
        f"embeddings.{k}_embeddings.weight" for k in ("word", "position", "token_type")
    }
    params = merged.merged_params(lookup=True)
    assert all(isinstance(params[n], LookupWeight) for n in merged.lookup_tables)
    rows_logits, rows_grad = logits_and_grad(merged, inputs, tasks, sizes)
    merged.row_lookup = False
    assert not any(isinstance(v, LookupWeight) for v in merged.merged_params(lookup=True).values())
    whole_logits, whole_grad = logits_and_grad(merged, inputs, tasks, sizes)
    for t in tasks:
        assert torch.equal(rows_logits[t], whole_logits[t])  # the same merged rows, bit for bit
    emb_cols = [merged.param_names.index(n) for n in merged.lookup_tables]
    assert rows_grad[:, emb_cols].abs().max() > 1e-5  # the embedding columns get a real gradient
    torch.testing.assert_close(rows_grad, whole_grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(rows_grad, slow_reference_grad(bert, lam0, inputs, tasks, sizes), atol=1e-5, rtol=1e-4)


def test_a_lookup_table_used_otherwise_is_merged_whole():
    torch.manual_seed(0)
    base, stack = torch.randn(20, 6), torch.randn(3, 20, 6)
    lam = torch.tensor([0.2, -0.5, 0.7], requires_grad=True)
    w = LookupWeight(base, stack, lam, lambda: merge_dense([base], [stack], lam[:, None])[0])
    assert w.shape == (20, 6) and w.dtype == torch.float32 and w.size(0) == 20
    x = torch.randn(4, 6)
    y = x @ w.T  # e.g. a tied output layer
    ref_lam = lam.detach().clone().requires_grad_(True)
    ref = x @ (base + (ref_lam[:, None, None] * stack).sum(0)).T
    torch.testing.assert_close(y, ref)
    (y**2).sum().backward()
    (ref**2).sum().backward()
    torch.testing.assert_close(lam.grad, ref_lam.grad)
    ids = torch.tensor([[3, 0, 19], [0, 0, 5]])
    lam.grad, ref_lam.grad = None, None
    out = torch.nn.functional.embedding(ids, w, padding_idx=0)
    ref = torch.nn.functional.embedding(ids, base + (ref_lam[:, None, None] * stack).sum(0), padding_idx=0)
    torch.testing.assert_close(out, ref)
    (out.sin()).sum().backward()
    (ref.sin()).sum().backward()
    torch.testing.assert_close(lam.grad, ref_lam.grad)  # padding_idx rows: no gradient, as the stock backward


@pytest.mark.parametrize("tied", [True, False])
def test_llama_lookup_rows_only_where_untied(tmp_path, tied):
    base, paths = llama_zoo(tmp_path, tied)
    pool = load_pool(base, paths, task_type="causal_lm")
    torch.manual_seed(1)
    lam0 = 0.3 + 0.1 * torch.randn(3, len(pool.param_names))
    merged = MergedModel(pool, Coefficients(3, len(pool.param_names), "layer", lam0))
    # a tied table is also the output layer: merged whole (the LookupWeight would merge it anyway on that use)
    assert merged.lookup_tables == ([] if tied else ["model.embed_tokens.weight"])
    inputs, tasks, sizes = lm_batch(3), list(paths), [3, 3, 3]
    rows_logits, rows_grad = logits_and_grad(merged, inputs, tasks, sizes)
    merged.row_lookup = False
    whole_logits, whole_grad = logits_and_grad(merged, inputs, tasks, sizes)
    for t in tasks:
        assert torch.equal(rows_logits[t], whole_logits[t])  # the same merged rows, bit for bit
    assert whole_grad.abs().max() > 1e-5
    torch.testing.assert_close(rows_grad, whole_grad, atol=1e-7, rtol=1e-5)


def test_offloaded_task_vectors_stay_in_cpu_memory_and_train_like_resident_ones(tmp_path, monkeypatch):
    """prep.offload on a LLaMA-shaped model: the stacks ignore device moves, reach the merge in chunks (small chunks
    forced here so that every stack streams in several pieces) and 5 AdaMerging steps equal the resident path, also
    with each layer's merge recomputed in the backward (``recompute: merge``: the stacks stream again there)."""
    import adamerge.core.functional as F

    base, paths = llama_zoo(tmp_path, tied=False)
    inputs, tasks, sizes = lm_batch(3), list(paths), [3, 3, 3]
    batch = {"inputs": inputs, "tasks": tasks, "sizes": sizes}
    ends = []
    for offload, recompute in ((False, None), (True, None), (True, "merge")):
        m = AdaMerging(
            base,
            paths,
            task_type="causal_lm",
            granularity="layer",
            tv_dtype="bfloat16",
            prep=TaskVectorPrep(offload=offload),
            recompute=recompute,
        )
        if offload:
            monkeypatch.setattr(F, "CAST_CHUNK_BYTES", 2048)  # each stack copied in pieces of a few tasks' rows
            assert all(st.offloaded for st in m.merged.stores)
        opt = torch.optim.Adam([m.merged.coefficients.weight], lr=1e-2)
        for _ in range(5):
            loss, _ = m.objective(batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
        ends.append(m.merged.coefficients.weight.detach().clone())
        if offload:
            m.merged.to("meta")  # a device move: the base goes, the offloaded stacks stay in CPU memory
            assert all(p.device.type == "cpu" for st in m.merged.stores for p in st.parameters())
            assert m.merged.backbone.get_parameter("model.norm.weight").device.type == "meta"
    assert (ends[0] - 0.3).abs().max() > 1e-2
    torch.testing.assert_close(ends[1], ends[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ends[2], ends[0], atol=1e-6, rtol=0)


def test_offload_refuses_what_it_cannot_stream(zoo):
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match=r"prep.offload: tensor '.+' has a sparse \(prep.sparse_storage\)"):
        AdaMerging(*zoo, prep=TaskVectorPrep(ties_density=0.2, sparse_storage=True, offload=True))
    module = AdaMerging(*zoo, prep=TaskVectorPrep(offload=True))
    module._device_mesh = object()  # what ModelParallelStrategy sets before configure_model
    with pytest.raises(
        MergeInputError,
        match=r"prep.offload streams task vectors from CPU memory; "
        r"ModelParallelStrategy \(FSDP2\) shards them",
    ):
        module.configure_model()


def saved_shapes_and_merges(merged: MergedModel, inputs, tasks, sizes):
    """Run forward+backward with the entropy objective; return the shapes of the tensors autograd saved outside any
    activation checkpoint during the forward, how many times each layer store merged (forward and backward), the
    logits and the coefficient gradient."""
    from adamerge.engine.stores import TaskVectorStore

    shapes, calls, forward = [], {}, TaskVectorStore.forward

    def counting(store, *a, **kw):
        calls[id(store)] = calls.get(id(store), 0) + 1
        return forward(store, *a, **kw)

    TaskVectorStore.forward = counting
    try:
        merged.coefficients.weight.grad = None
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            out = merged(inputs, tasks, sizes)
            loss, _ = entropy_objective(out)
        loss.backward()
    finally:
        TaskVectorStore.forward = forward
    layer_calls = [calls.get(id(merged.stores[i]), 0) for i, _ in merged.layer_stores]
    return shapes, layer_calls, {t: v.detach() for t, v in out.items()}, merged.coefficients.weight.grad.clone()


def test_recompute_merges_each_layer_again_in_the_backward_and_keeps_no_merged_layer_weight(zoo, bert):
    from conftest import mixed_batch
    from test_core import slow_reference_grad  # a materialised model per task, merged by hand

    b = mixed_batch(zoo[0])
    inputs, tasks, sizes = b["inputs"], b["tasks"], b["sizes"]
    torch.manual_seed(0)
    lam0 = 0.3 + 0.1 * torch.randn(3, len(bert.param_names))
    merged = MergedModel(bert, Coefficients(3, len(bert.param_names), "layer", lam0))
    assert [path for _, path in merged.layer_stores] == ["encoder.layer.0", "encoder.layer.1"]
    runs = {}
    for recompute in RECOMPUTE:
        merged.recompute = recompute
        runs[recompute] = saved_shapes_and_merges(merged, inputs, tasks, sizes)
    ffn = (64, 32)  # the intermediate dense weight [intermediate, hidden]: only inside the layers
    assert ffn in runs[None][0]  # the plain path saves merged layer weights for the backward ...
    assert ffn not in runs["merge"][0]  # ... "merge" keeps none ("activations" keeps them through the checkpoint)
    attention = {r: [s for s in run[0] if len(s) == 4 and s[1] == 2] for r, run in runs.items()}  # 2 heads
    assert attention[None] and not attention["activations"] and not attention["merge"]  # nor layer activations
    assert runs[None][1] == runs["activations"][1] == [1, 1] and runs["merge"][1] == [2, 2]  # again in the backward
    ref = slow_reference_grad(bert, lam0, inputs, tasks, sizes)
    assert ref.abs().max() > 1e-5
    for r in ("activations", "merge"):
        for t in tasks:
            torch.testing.assert_close(runs[r][2][t], runs[None][2][t], atol=0, rtol=0)
        torch.testing.assert_close(runs[r][3], runs[None][3], atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(runs[r][3], ref, atol=1e-5, rtol=1e-4)
    merged.recompute = None


def test_recompute_on_a_llama_gives_the_plain_gradient(tmp_path):
    base, paths = llama_zoo(tmp_path, tied=False)
    pool = load_pool(base, paths, task_type="causal_lm")
    torch.manual_seed(1)
    lam0 = 0.3 + 0.1 * torch.randn(3, len(pool.param_names))
    merged = MergedModel(pool, Coefficients(3, len(pool.param_names), "layer", lam0))
    assert [path for _, path in merged.layer_stores] == ["model.layers.0", "model.layers.1"]
    inputs, tasks, sizes = lm_batch(3), list(paths), [3, 3, 3]
    plain = saved_shapes_and_merges(merged, inputs, tasks, sizes)
    merged.recompute = "merge"
    lean = saved_shapes_and_merges(merged, inputs, tasks, sizes)
    assert (64, 32) in plain[0] and (64, 32) not in lean[0]  # gate/up projections [intermediate, hidden]
    assert lean[1] == [2, 2]
    for t in tasks:
        torch.testing.assert_close(lean[2][t], plain[2][t], atol=0, rtol=0)
    assert plain[3].abs().max() > 1e-5
    torch.testing.assert_close(lean[3], plain[3], atol=1e-7, rtol=1e-5)


def test_recompute_refuses_unknown_values_and_batchnorm_backbones(zoo, tmp_path):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match="recompute: unknown value 'all'; allowed: null, activations, merge"):
        AdaMerging(*zoo, recompute="all")
    assert AdaMerging(*zoo, recompute="activations").merged.recompute == "activations"
    torch.manual_seed(0)
    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3)
    for name in ("base", "a", "b"):
        MobileNetV2ForImageClassification(cfg).save_pretrained(str(tmp_path / name))
    with pytest.raises(MergeInputError, match=r"recompute: merge: base '.+' has BatchNorm layers"):
        AdaMerging(
            str(tmp_path / "base"), {t: str(tmp_path / t) for t in "ab"}, task_type="image_cls", recompute="merge"
        )


@pytest.mark.parametrize("objective", ["entropy", "kl", "pseudo_label"])
def test_micro_batches_give_the_one_batch_gradient(zoo, objective):
    """Each task's rows in pieces (run one at a time, weighted by their share), task groups, with and without
    recompute: the gradient of one batch."""
    from conftest import mixed_batch

    b = mixed_batch(zoo[0])
    b["inputs"] = {k: torch.cat([v, v.flip(0)]) for k, v in b["inputs"].items()}  # 4 rows per task, task-contiguous
    b["inputs"] = {
        k: torch.cat([v[i :: len(b["tasks"])] for i in range(len(b["tasks"]))]) for k, v in b["inputs"].items()
    }
    b["sizes"] = [4] * len(b["tasks"])
    grads = []
    for chunks, pieces, recompute in (
        (1, 1, None),
        (3, 3, None),
        (1, 2, None),
        (1, 1, "merge"),
        (3, 1, "merge"),
        (3, 2, "merge"),
        (3, 1, "activations"),
        (1, 1, "activations"),
    ):
        module = AdaMerging(
            *zoo,
            granularity="layer",
            objective=objective,
            task_chunks=chunks,
            micro_batches=pieces,
            recompute=recompute,
        )
        torch.manual_seed(0)
        module.merged.coefficients.weight.data += 0.1 * torch.randn_like(module.merged.coefficients.weight)
        if (chunks, pieces) == (1, 1):
            loss, per_task = module.objective(b)
        else:
            loss, total, per_task = module.merged.chunked_surrogate(b, module.loss_with, chunks, pieces)
        loss.backward()
        grads.append((module.merged.coefficients.weight.grad.clone(), {t: float(v) for t, v in per_task.items()}))
    assert grads[0][0].abs().max() > 1e-6
    for g, terms in grads[1:]:
        torch.testing.assert_close(g, grads[0][0], atol=1e-6, rtol=1e-5)
        # the logged per-task terms too (KL terms of ~1e-4 between near-equal float32 distributions: absolute error)
        assert terms == pytest.approx(grads[0][1], rel=1e-5, abs=2e-7)


def test_micro_batches_refuse_objectives_that_need_a_tasks_rows_together(zoo, tmp_path):
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match="micro_batches: objective 'infomax' is not a mean of per-row terms"):
        AdaMerging(*zoo, objective="infomax", micro_batches=2)
    with pytest.raises(MergeInputError, match="with a confidence threshold is not a mean"):
        AdaMerging(*zoo, objective={"name": "pseudo_label", "confidence": 0.5}, micro_batches=2)
    with pytest.raises(MergeInputError, match="micro_batches: needs per-row logits"):
        AdaMerging(*llama_zoo(tmp_path, tied=True), task_type="causal_lm", micro_batches=2)
