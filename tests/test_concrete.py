"""Concrete subspace masks: gradients reach the logits, +∞ logits reduce to TA/AdaMerging, seeds and temperature."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quick_fit

from adamerge.io.datasets import TaskData
from adamerge.methods import (
    AdaMerging,
    ConcreteAdaMerging,
    ConcreteTaskArithmetic,
    TaskArithmetic,
)
from adamerge.parametrize import ConcreteMask
from adamerge.training.datamodule import UnlabeledDataModule


@pytest.fixture(scope="module")
def batch(zoo, task_data):
    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, tokenizer=zoo[0], samples_per_task=4, max_length=16
    )
    dm.setup()
    return dm.dataset[0]


def test_gradient_reaches_mask_logits(zoo, batch):
    module = ConcreteTaskArithmetic(*zoo)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = [p.grad for p in module.mask.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(not p.requires_grad for n, p in module.named_parameters() if not n.startswith("mask."))


@pytest.mark.parametrize("sharing", ["shared", "task"])
def test_infinite_logits_reduce_to_task_arithmetic_and_adamerging_exactly(zoo, batch, sharing):
    concrete = ConcreteTaskArithmetic(*zoo, scale=0.3, mask=sharing)
    for p in concrete.mask.parameters():
        p.data.fill_(float("inf"))
    ta = TaskArithmetic(*zoo, scale=0.3)
    relaxed = concrete.mask.sample(torch.Generator().manual_seed(0))
    assert all(torch.equal(m, torch.ones_like(m)) for m in relaxed.values())
    a, b = concrete.merged.merged_params(masks=relaxed), ta.merged.merged_params()
    assert all(torch.equal(a[n], b[n]) for n in a)
    exported, plain = concrete.final_merged_params(), ta.final_merged_params()
    assert all(torch.equal(exported[n], plain[n]) for n in plain)

    cada = ConcreteAdaMerging(*zoo, granularity="layer", meta_steps=0, mask=sharing)
    name = cada.mask.names[0]
    tv_shape = cada.merged.task_vectors()[name].shape  # [T, *shape]: per-task masks have the task axis too
    assert cada.hard_mask()[name].shape == (tv_shape if sharing == "task" else tv_shape[1:])
    ada = AdaMerging(*zoo, granularity="layer")
    for p in cada.mask.parameters():
        p.data.fill_(float("inf"))
    with torch.no_grad():
        x = cada.merged(batch["inputs"], batch["tasks"], batch["sizes"], masks=cada.hard_mask())
        y = ada.merged(batch["inputs"], batch["tasks"], batch["sizes"])
    assert all(torch.equal(x[t], y[t]) for t in x)


def test_seed_and_temperature_control_the_sample():
    shapes = {"w": torch.Size([2000])}
    mask = ConcreteMask(shapes, temperature=0.5)
    s1 = mask.sample(torch.Generator().manual_seed(1))["w"]
    assert torch.equal(s1, mask.sample(torch.Generator().manual_seed(1))["w"])
    assert not torch.equal(s1, mask.sample(torch.Generator().manual_seed(2))["w"])
    # rescaled by the mean: the sample's mean is exactly 1
    assert float(s1.mean()) == pytest.approx(1.0, abs=1e-5)
    sharp = ConcreteMask(shapes, temperature=0.05).sample(torch.Generator().manual_seed(1))["w"]
    soft = ConcreteMask(shapes, temperature=5.0).sample(torch.Generator().manual_seed(1))["w"]
    # lower temperature -> closer to a 0/1 mask (larger spread around the mean)
    assert float(sharp.std()) > float(s1.std()) + 0.1 > float(soft.std()) + 0.2
    # at τ = 0.05 the relaxed sample is nearly binary: almost every entry is ~0 or ~1/mean
    near_binary = (sharp < 0.05) | ((sharp - sharp.max()).abs() < 0.05)
    assert float(near_binary.float().mean()) > 0.9


def test_hard_mask_modes_and_include_filter():
    mask = ConcreteMask({"a.weight": torch.Size([4]), "b.bias": torch.Size([3])}, include=r"weight$")
    assert mask.names == ["a.weight"]
    mask.logit("a.weight").data = torch.tensor([1.0, -1.0, 0.0, -2.0])
    hard = mask.hard("threshold")["a.weight"]
    torch.testing.assert_close(hard, torch.tensor([1.0, 0.0, 1.0, 0.0]) / 0.5)
    d1, d2 = mask.hard("sample", seed=3)["a.weight"], mask.hard("sample", seed=3)["a.weight"]
    assert torch.equal(d1, d2)
    with pytest.raises(ValueError, match="include: pattern 'nothing' matches no tensor"):
        ConcreteMask({"a": torch.Size([1])}, include="nothing")


def test_bf16_logits_halve_mask_memory(zoo):
    m32 = ConcreteTaskArithmetic(*zoo)
    m16 = ConcreteTaskArithmetic(*zoo, mask_dtype="bfloat16", include=r"encoder\.")
    n32 = sum(p.numel() * p.element_size() for p in m32.mask.parameters())
    n16 = sum(p.numel() * p.element_size() for p in m16.mask.parameters())
    assert n16 < n32 / 2


def test_concrete_adamerging_meta_then_adamerging_and_export(zoo, task_data, tmp_path):
    module = ConcreteAdaMerging(*zoo, granularity="layer", meta_steps=2, mask_lr=0.05, lr=0.01)
    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, samples_per_task=4, max_length=16, tokenizer=zoo[0]
    )
    quick_fit(module, dm, 4)
    logits = torch.cat([p.detach().flatten() for p in module.mask.parameters()])
    assert logits.abs().max() > 0  # phase 1 moved the mask
    assert (module.merged.coefficients.weight.detach() - 0.3).abs().max() > 0  # phase 2 moved λ
    module.export(tmp_path / "out", per_task_models=False)
    manifest = json.loads((tmp_path / "out" / "merge_manifest.json").read_text())
    assert manifest["method"] == "concrete_adamerging" and manifest["mask"]["export"] == "threshold"
    assert 0.0 < manifest["mask"]["kept_fraction"] <= 1.0


@pytest.mark.parametrize("sharing", ["shared", "task"])
def test_concrete_with_trained_coefficients_exports_mask_times_coefficients(zoo, task_data, tmp_path, sharing):
    """``coefficients: layer`` trains λ with the mask; the export stock ``transformers`` loads is
    θ0 + Σ_t λ_tp · m_tp · (θ_t − θ0), with m_tp = sigmoid(s_p) / mean(sigmoid(s_p)) computed here from the
    logits (``mask: task``: each task's own logits s_tp and mean) and the task vectors from the checkpoints."""
    from transformers import AutoModel

    base, paths = zoo
    module = ConcreteTaskArithmetic(
        base, paths, scale=0.3, coefficients="layer", export_mask="expected", lr=0.05, mask=sharing
    )
    assert {n for n, p in module.named_parameters() if p.requires_grad} == (
        {"merged.coefficients.weight"} | {f"mask.{n}" for n, _ in module.mask.named_parameters()}
    )
    dm = UnlabeledDataModule(
        {t: TaskData(p) for t, p in task_data.items()}, samples_per_task=4, max_length=16, tokenizer=base
    )
    quick_fit(module, dm, 3)
    lam = module.merged.coefficients.weight.detach()
    names = module.merged.param_names
    # every task's coefficient moved (shared mask); with per-task masks, in 3 steps, at least one task's
    reach = (lambda d: d.min()) if sharing == "shared" else (lambda d: d.max())
    moved = {n for j, n in enumerate(names) if float(reach((lam[:, j] - 0.3).abs())) > 1e-3}
    # λ trained (a key bias shifts every attention score of a query equally: softmax gives it no gradient)
    assert lam.shape == (len(paths), len(names))
    assert {n for n in names if "encoder." in n and "key.bias" not in n} <= moved
    assert max(float(p.detach().abs().max()) for p in module.mask.parameters()) > 1e-3  # so did the mask
    out = module.export(tmp_path / "out", per_task_models=False)
    root = AutoModel.from_pretrained(str(out)).state_dict()
    theta0 = AutoModel.from_pretrained(base).state_dict()
    fts = [AutoModel.from_pretrained(p).state_dict() for p in paths.values()]
    masked = set(module.mask.names)
    if sharing == "task":  # one mask per task, and training moved them apart
        w = module.mask.logit(names[-1]).detach()
        assert w.shape[0] == len(paths) and float((w[0] - w[1]).abs().max()) > 1e-4
    for j, name in enumerate(names):
        ms = [torch.ones(()).double()] * len(fts)
        if name in masked:
            s = module.mask.logit(name).detach().double()
            for i in range(len(fts)):
                e = torch.sigmoid(s[i] if sharing == "task" else s)
                ms[i] = e / e.mean()
        want = theta0[name].double() + sum(
            float(lam[i, j]) * ms[i] * (ft[name].double() - theta0[name].double()) for i, ft in enumerate(fts)
        )
        assert (root[name].double() - want).abs().max() < 1e-5, name
    manifest = json.loads((out / "merge_manifest.json").read_text())
    assert manifest["hparams"]["coefficients"] == "layer" and manifest["coefficients"]["granularity"] == "layer"
    assert manifest["mask"]["sharing"] == sharing


def test_concrete_rejects_unknown_coefficients(zoo):
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match="coefficients: unknown value 'model'; allowed: fixed"):
        ConcreteTaskArithmetic(*zoo, coefficients="model")
    with pytest.raises(MergeInputError, match="mask: unknown value 'layer'; allowed: shared"):
        ConcreteAdaMerging(*zoo, mask="layer")


def test_per_task_mask_rescales_each_task_and_equals_the_shared_mask_when_alike():
    """Per-task logits ``[T, *shape]``: every task's sample and hard mask has mean 1 on its own slice; with the
    same logits in every task the exported masks are the shared mask's, row for row."""
    shapes = {"w": torch.Size([6, 50])}
    per = ConcreteMask(shapes, tasks=3)
    assert per.logit("w").shape == (3, 6, 50)
    s = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    per.logit("w").data = torch.stack([s, s - 1.0, s + 1.0])
    sample = per.sample(torch.Generator().manual_seed(1))["w"]
    for t in range(3):
        assert float(sample[t].mean()) == pytest.approx(1.0, abs=1e-5)
    shared = ConcreteMask(shapes)
    shared.logit("w").data = s.clone()
    for mode in ("threshold", "expected"):
        hard = per.hard(mode)["w"]
        assert [float(hard[t].mean()) for t in range(3)] == pytest.approx([1.0] * 3, abs=1e-5)
        e = torch.sigmoid(s) if mode == "expected" else (s >= 0).float()
        torch.testing.assert_close(hard[0], e / e.mean())  # task 0 has the shared logits
        torch.testing.assert_close(shared.hard(mode)["w"], hard[0])
    e = (s - 1.0 >= 0).float()
    torch.testing.assert_close(per.hard("threshold")["w"][1], e / e.mean())  # each task its own
    with pytest.raises(ValueError, match="tasks must be >= 0"):
        ConcreteMask(shapes, tasks=-1)


def test_concrete_adamerging_halves_alternate_rows_within_each_task():
    """Inner rows 0, 2, ... and outer rows 1, 3, ... of every task (a one-row task: that row in both), written out:
    the split a rank's contiguous share of an even size reproduces under DDP."""
    from adamerge.methods.concrete import _halves

    batch = {"inputs": {"input_ids": torch.arange(7)}, "tasks": ["a", "b", "c"], "sizes": [4, 1, 2]}
    inner, outer = _halves(batch)
    assert inner["inputs"]["input_ids"].tolist() == [0, 2, 4, 5]
    assert outer["inputs"]["input_ids"].tolist() == [1, 3, 4, 6]
    assert (inner["sizes"], outer["sizes"]) == ([2, 1, 1], [2, 1, 1]) and inner["tasks"] == ["a", "b", "c"]
    # two ranks, each holding its contiguous half of a task's 4 rows: together the one-process halves
    ranks = [
        _halves({"inputs": {"input_ids": torch.arange(r * 2, r * 2 + 2)}, "tasks": ["a"], "sizes": [2]}) for r in (0, 1)
    ]
    assert [i for r in ranks for i in r[0]["inputs"]["input_ids"].tolist()] == [0, 2]
    assert [i for r in ranks for i in r[1]["inputs"]["input_ids"].tolist()] == [1, 3]
