"""Acceptance of the core: merge identities, gradients vs a slow reference, export round trip, trainable set."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from adamerge.engine.model import MergedModel
from adamerge.methods import AdaMerging
from adamerge.parametrize import Coefficients
from adamerge.pool import load_pool


@pytest.fixture(scope="module")
def pool(zoo):
    base, paths = zoo
    return load_pool(base, paths)


@pytest.fixture(scope="module")
def batch(zoo):
    from conftest import mixed_batch

    b = mixed_batch(zoo[0])
    return b["inputs"], b["tasks"], b["sizes"]


def reference_logits(path, inputs, rows):
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return m(**{k: v[rows] for k, v in inputs.items()}).logits


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_coefficients_give_base_and_one_hot_gives_finetune(zoo, pool, batch, granularity):
    base, paths = zoo
    inputs, tasks, sizes = batch
    merged = MergedModel(pool, Coefficients(3, len(pool.param_names), granularity, 0.0))
    with torch.no_grad():
        out = merged(inputs, tasks, sizes)
        feats = merged.features(inputs)
    # zero coefficients: the backbone is exactly the base backbone
    with torch.no_grad():
        base_feats = pool.backbone(**inputs)
    assert (feats.last_hidden_state - base_feats.last_hidden_state).abs().max() < 1e-6
    for i, task in enumerate(tasks):
        onehot = torch.zeros(3) if granularity == "task" else torch.zeros(3, len(pool.param_names))
        onehot[i] = 1.0
        merged.coefficients.weight.data.copy_(onehot)
        with torch.no_grad():
            logits = merged(inputs, tasks, sizes)[task]
        ref = reference_logits(paths[task], inputs, slice(2 * i, 2 * i + 2))
        assert (logits - ref).abs().max() < 1e-6, task
    assert out["topic"].shape == (2, 3)


def slow_reference_grad(pool, lam, inputs, tasks, sizes):
    """Per-task, per-parameter loop: T separate forward/backward passes through a materialised model."""
    from torch.func import functional_call

    from adamerge.core.functional import entropy

    grad = torch.zeros_like(lam)
    base = {n: p.detach() for n, p in pool.backbone.named_parameters()}
    start = 0
    for _t, (task, n) in enumerate(zip(tasks, sizes)):
        lam_t = lam.clone().requires_grad_(True)
        params = {}
        for p, name in enumerate(pool.param_names):
            w = base[name].clone()
            for s in range(lam.shape[0]):
                w = w + lam_t[s, p] * pool.task_vectors[name][s]
            params[name] = w
        rows = {k: v[start : start + n] for k, v in inputs.items()}
        feats = functional_call(pool.backbone, params, args=(), kwargs=rows)
        head = pool.heads[task]
        head.bert.features = feats
        loss = entropy(head(**rows).logits).mean()
        head.bert.features = None
        (g,) = torch.autograd.grad(loss, lam_t)
        grad += g
        start += n
    return grad


def test_coefficient_gradients_match_slow_reference(pool, batch):
    inputs, tasks, sizes = batch
    torch.manual_seed(0)
    lam0 = 0.3 + 0.1 * torch.randn(3, len(pool.param_names))
    merged = MergedModel(pool, Coefficients(3, len(pool.param_names), "layer", lam0))
    from adamerge.objectives import entropy_objective

    loss, _ = entropy_objective(merged(inputs, tasks, sizes))
    loss.backward()
    ref = slow_reference_grad(pool, lam0, inputs, tasks, sizes)
    assert merged.coefficients.weight.grad.abs().max() > 1e-6  # the test can fail: gradients are non-trivial
    torch.testing.assert_close(merged.coefficients.weight.grad, ref, atol=1e-5, rtol=1e-4)


def test_only_coefficients_require_grad(zoo):
    base, paths = zoo
    module = AdaMerging(base, paths, granularity="layer")
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable == ["merged.coefficients.weight"]
    assert module.merged.coefficients.weight.shape == (3, len(module.merged.param_names))
    assert all(not b.requires_grad for b in module.merged.task_vectors().values())
    # checkpoints carry only the trainable state, not the frozen model
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    assert list(ckpt["state_dict"]) == ["merged.coefficients.weight"]


def test_bf16_task_vector_storage_halves_memory_and_stays_close(zoo, pool, batch):
    base, paths = zoo
    inputs, tasks, sizes = batch
    pool16 = load_pool(base, paths, tv_dtype=torch.bfloat16)
    bytes32 = sum(t.numel() * t.element_size() for t in pool.task_vectors.values())
    bytes16 = sum(t.numel() * t.element_size() for t in pool16.task_vectors.values())
    assert bytes16 * 2 == bytes32
    m32 = MergedModel(pool, Coefficients(3, len(pool.param_names), "task", 0.3))
    m16 = MergedModel(pool16, Coefficients(3, len(pool.param_names), "task", 0.3))
    with torch.no_grad():
        a, b = m32(inputs, tasks, sizes), m16(inputs, tasks, sizes)
    assert all((a[t] - b[t]).abs().max() < 1e-2 for t in tasks)


def test_export_loads_in_fresh_process_with_only_transformers(zoo, batch, tmp_path):
    base, paths = zoo
    inputs, tasks, sizes = batch
    module = AdaMerging(base, paths, granularity="layer", init=0.3)
    torch.manual_seed(1)
    module.merged.coefficients.weight.data += 0.2 * torch.randn_like(module.merged.coefficients.weight)
    with torch.no_grad():
        expected = module.merged(inputs, tasks, sizes)
    out = tmp_path / "merged"
    module.export(out)
    torch.save({"inputs": inputs, "expected": expected}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForSequenceClassification, AutoModel
        d = torch.load({str(tmp_path / "expected.pt")!r})
        inputs, expected = d["inputs"], d["expected"]
        worst = 0.0
        for i, task in enumerate({tasks!r}):
            m = AutoModelForSequenceClassification.from_pretrained({str(out)!r} + "/tasks/" + task).eval()
            with torch.no_grad():
                logits = m(**{{k: v[2 * i:2 * i + 2] for k, v in inputs.items()}}).logits
            worst = max(worst, (logits - expected[task]).abs().max().item())
        enc = AutoModel.from_pretrained({str(out)!r})
        assert type(enc).__name__ == "BertModel"
        assert "adamerge" not in sys.modules
        print(worst)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(res.stdout.strip().splitlines()[-1]) < 1e-5
    # the loader that reads heads.safetensors (no tasks/ needed) gives the same numbers
    from adamerge import load_task_model, read_manifest

    m = load_task_model(out, "topic")
    with torch.no_grad():
        got = m(**{k: v[2:4] for k, v in inputs.items()}).logits
    assert (got - expected["topic"]).abs().max() < 1e-5
    manifest = read_manifest(out)
    assert manifest["method"] == "adamerging"
    assert [s["task"] for s in manifest["sources"]] == tasks
    assert all(len(s["sha256"]) == 64 for s in manifest["sources"])
    assert len(manifest["coefficients"]["values"]) == 3
    assert len(manifest["coefficients"]["values"][0]) == len(module.merged.param_names)
    assert {"adamerge", "torch", "transformers"} <= set(manifest["versions"])


@pytest.mark.parametrize("objective", ["entropy", "kl"])
def test_task_chunks_give_the_same_gradient(zoo, batch, objective):
    inputs, tasks, sizes = batch
    b = {"inputs": inputs, "tasks": tasks, "sizes": sizes}
    grads = []
    for chunks in (1, 3):
        module = AdaMerging(*zoo, granularity="layer", objective=objective, task_chunks=chunks)
        torch.manual_seed(0)
        module.merged.coefficients.weight.data += 0.1 * torch.randn_like(module.merged.coefficients.weight)
        if chunks == 1:
            loss, _ = module.objective(b)
        else:
            loss, _, _ = module.merged.chunked_surrogate(b, module.loss_with, chunks)
        loss.backward()
        grads.append(module.merged.coefficients.weight.grad.clone())
    assert grads[0].abs().max() > 1e-6
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_task_chunks_train_like_one_batch(zoo, task_data):
    from conftest import fit_coefficients

    results = [
        fit_coefficients(AdaMerging(*zoo, granularity="layer", lr=0.01, task_chunks=chunks), zoo, task_data)
        for chunks in (1, 3)
    ]
    assert (results[0] - 0.3).abs().max() > 1e-3
    torch.testing.assert_close(results[1], results[0], atol=1e-6, rtol=0)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_pool_keeps_no_fine_tune_file_mapped(zoo):
    """The kept heads own their tensors: no fine-tune's safetensors file stays memory-mapped (its pages, read once for
    the task vector, would otherwise stay resident: T checkpoints of RSS)."""
    import gc
    from pathlib import Path

    base, paths = zoo
    pool = load_pool(base, paths)
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert pool.heads and not [p for p in paths.values() if str(Path(p).resolve()) in maps]
