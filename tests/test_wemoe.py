"""WEMoE (issue 19): routers start as Task Arithmetic exactly, only the routers train, the export served by
load_merged equals the wrapper, the low-rank option at full rank equals dense routing."""

from __future__ import annotations

import pytest
import torch
from conftest import fit_coefficients, mixed_batch

from adamerge.methods import TaskArithmetic, WEMoE


@pytest.fixture(scope="module")
def batch(zoo):
    return mixed_batch(zoo[0])


def logits_of(module, batch):
    """Every task's logits on its rows, flattened into one vector."""
    with torch.no_grad():
        out = module(batch["inputs"], batch["tasks"], batch["sizes"])
    return torch.cat([out[t].flatten() for t in batch["tasks"]])


def test_router_initialisation_is_task_arithmetic(zoo, batch):
    ta = TaskArithmetic(*zoo, scale=0.3)
    wemoe = WEMoE(*zoo, scale=0.3)
    assert len(wemoe.routing.names) == 4  # intermediate.dense and output.dense of 2 layers, not attention's
    assert all("attention" not in n for n in wemoe.routing.names)
    diff = (logits_of(wemoe, batch) - logits_of(ta, batch)).abs().max()
    assert diff < 1e-5, diff
    # and the routed path is really used: routers that give 0 to every task are the base MLPs with TA elsewhere
    with torch.no_grad():
        for r in wemoe.routing.routers.values():
            r.fc2.bias.zero_()
    assert (logits_of(wemoe, batch) - logits_of(ta, batch)).abs().max() > 1e-4


def test_only_the_routers_get_gradients_and_they_train(zoo, batch, task_data):
    wemoe = WEMoE(*zoo, lr=1e-2)
    trainable = {n for n, p in wemoe.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("routing.routers.") for n in trainable)
    loss, _ = wemoe.loss_fn(wemoe.step_outputs(batch, wemoe.loss_fn))
    loss.backward()
    with_grad = {n for n, p in wemoe.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad and with_grad <= trainable
    assert any(n.endswith("fc2.weight") for n in with_grad)
    before = {n: p.detach().clone() for n, p in wemoe.named_parameters()}
    for p in wemoe.parameters():
        p.grad = None
    fit_coefficients(wemoe, zoo, task_data, steps=3)
    moved = {n for n, p in wemoe.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable


def test_export_served_by_load_merged_equals_the_wrapper(zoo, batch, task_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    from adamerge import load_merged

    wemoe = WEMoE(*zoo, lr=1e-2)
    fit_coefficients(wemoe, zoo, task_data, steps=3)
    out = wemoe.export(tmp_path / "m")
    assert not (out / "tasks").exists()  # not flattenable into per-task checkpoints
    served = load_merged(out)
    start = 0
    for task, n in zip(batch["tasks"], batch["sizes"]):
        rows = {k: v[start : start + n] for k, v in batch["inputs"].items()}
        with torch.no_grad():
            want = wemoe.predict(task, rows)
        assert (served.predict(task, **rows) - want).abs().max() < 1e-5, task
        start += n
    # the root holds the pretrained MLPs and Task Arithmetic elsewhere (read back with safetensors, not adamerge)
    root = load_file(str(out / "model.safetensors"))
    base = AutoModel.from_pretrained(zoo[0]).state_dict()
    fts = [AutoModel.from_pretrained(p).state_dict() for p in zoo[1].values()]
    for name in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.1.output.dense.bias"):
        assert torch.equal(root[name], base[name])
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(root[name], base[name] + 0.3 * sum(f[name] - base[name] for f in fts), atol=1e-6)
    assert "load_merged" in (out / "README.md").read_text()


def test_full_rank_factors_route_like_dense_and_low_rank_is_smaller(zoo, batch):
    dense = WEMoE(*zoo)
    full = WEMoE(*zoo, rank=32)  # hidden 32 / intermediate 64: rank 32 is every singular value
    small = WEMoE(*zoo, rank=2)
    with torch.no_grad():  # non-trivial routers, the same in all three
        for r in dense.routing.routers.values():
            r.fc2.weight.normal_(0, 0.5)
    for m in (full, small):
        m.routing.routers.load_state_dict(dense.routing.routers.state_dict())
    assert (logits_of(full, batch) - logits_of(dense, batch)).abs().max() < 1e-4
    assert (logits_of(small, batch) - logits_of(dense, batch)).abs().max() > 1e-4
    assert small.routing.info()["bytes"] < dense.routing.info()["bytes"]


def test_bad_options_are_named():
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match="rank must be >= 1"):
        WEMoE("b", {"a": "x"}, rank=0)
    with pytest.raises(MergeInputError, match="'features' is not supported by wemoe"):
        WEMoE("b", {"a": "x"}, objective="features")
