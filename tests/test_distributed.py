"""Data-parallel coefficient training on CPU (gloo): 2 DDP processes equal one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Some coefficient gradients are ~1e-8, Adam's eps, where the update m/(sqrt(v)+eps) turns float32 differences in the
# order of the gradient all-reduce into coefficient differences of a few 1e-7 after 4 steps (measured 3.3e-7 with
# real-token inputs); 1e-6 is 0.025% of the 4e-3 the coefficients move. A wrong shard or a missing reduction moves
# them by 1e-4 or more.
TOL = 1e-6


def _config(zoo, task_data, out, devices):
    base, paths = zoo
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "adamerge.methods.AdaMerging",
            "init_args": {"base": base, "models": paths, "granularity": "layer"},
        },  # reference lr 1e-3
        "data": {"tasks": {t: {"path": p} for t, p in task_data.items()}, "samples_per_task": 4, "max_length": 16},
        "trainer": {
            "max_steps": 4,
            "accelerator": "cpu",
            "devices": devices,
            "logger": False,
            "default_root_dir": str(out) + "_root",  # LightningCLI saves config.yaml there, not in the repo
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            **({"strategy": "ddp"} if devices > 1 else {}),
        },
        "export": {"output_dir": str(out), "per_task_models": False},
    }


def _cli_fit(tmp_path, cfg, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(29500 + os.getpid() % 1000),
    }
    return subprocess.run(
        [sys.executable, "-m", "adamerge", "fit", "--config", str(p)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _fit(tmp_path, cfg, name):
    res = _cli_fit(tmp_path, cfg, name)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.tensor(json.loads((tmp_path / name / "merge_manifest.json").read_text())["coefficients"]["values"])


@pytest.fixture(scope="module")
def single(zoo, task_data, tmp_path_factory):
    """One process's coefficients under the shared config: the reference of the DDP and FSDP2 runs below (fitted
    once, in a process of its own like theirs)."""
    tmp = tmp_path_factory.mktemp("single")
    return _fit(tmp, _config(zoo, task_data, tmp / "single", 1), "single")


@pytest.mark.parametrize("recompute", [None, "activations"])
def test_ddp_two_processes_match_single_process(zoo, task_data, tmp_path, recompute, single):
    c = _config(zoo, task_data, tmp_path / "ddp", 2)
    c["model"]["init_args"]["recompute"] = recompute  # the same gradient, layers re-run in the backward
    ddp = _fit(tmp_path, c, "ddp")
    assert (single - 0.3).abs().max() > 2e-3  # 4 Adam steps of lr 1e-3 moved the coefficients
    assert (single - ddp).abs().max() < TOL, (single - ddp).abs().max()


def test_indivisible_share_is_a_clear_error():
    from adamerge.errors import MergeInputError
    from adamerge.training.datamodule import TaskStepDataset

    with pytest.raises(
        MergeInputError, match=r"samples_per_task \(3\) must be divisible by the number of processes \(2\)"
    ):
        TaskStepDataset({"a": [{"input_ids": [1]}]}, 3, 0, 0, 1, rank=0, world_size=2)


def test_model_parallel_fsdp2_shards_task_vectors_and_matches_single_process(zoo, task_data, tmp_path, single):
    cfg = _config(zoo, task_data, tmp_path / "fsdp", 2)
    cfg["trainer"]["strategy"] = {
        "class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    cfg["trainer"]["callbacks"] = [{"class_path": "shard_probe.ShardProbe"}]
    cfg["trainer"]["default_root_dir"] = str(tmp_path / "fsdp_root")
    fsdp = _fit(tmp_path, cfg, "fsdp")
    assert (single - fsdp).abs().max() < TOL, (single - fsdp).abs().max()
    probe = json.loads((tmp_path / "fsdp_root" / "shard_probe.json").read_text())
    # each of the 2 ranks holds half of every task-vector tensor's rows
    assert probe["sharded_stores"] == probe["stores"] > 0
    assert probe["local_elements"] * 2 == pytest.approx(probe["global_elements"], rel=0.01)


def test_sparse_storage_under_ddp_and_fsdp2_matches_dense_single_process(zoo, task_data, tmp_path):
    """AdaMerging++ with sparse task vectors: 2 DDP processes, and ModelParallelStrategy (sparse stores stay
    replicated, coefficients sharded), end where one process with dense storage does."""

    def cfg(name, devices, sparse):
        c = _config(zoo, task_data, tmp_path / name, devices)
        c["model"]["init_args"]["prep"] = {"ties_density": 0.2, "sparse_storage": sparse}
        return c

    single = _fit(tmp_path, cfg("dense", 1, False), "dense")
    ddp = _fit(tmp_path, cfg("ddp_sparse", 2, True), "ddp_sparse")
    fsdp_cfg = cfg("fsdp_sparse", 2, True)
    fsdp_cfg["trainer"]["strategy"] = {
        "class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    fsdp = _fit(tmp_path, fsdp_cfg, "fsdp_sparse")
    assert (single - 0.3).abs().max() > 2e-3
    assert (single - ddp).abs().max() < 1e-6, (single - ddp).abs().max()
    assert (single - fsdp).abs().max() < 1e-6, (single - fsdp).abs().max()


@pytest.mark.parametrize("method", ["ConcreteTaskArithmetic", "ConcreteAdaMerging"])
def test_concrete_ddp_two_processes_match_single_process(zoo, task_data, tmp_path, method):
    """Concrete masks under DDP: every rank draws the same relaxed mask (seeded by step), the mask's and the
    coefficients' gradients are averaged; Concrete AdaMerging's inner λ step reads the whole global batch's inner
    half. Coefficients and the exported merged weights (mask folded in) end where one process's do."""
    from safetensors.torch import load_file

    args = (
        {"coefficients": "layer", "scale": 0.3, "export_mask": "expected", "objective": "kl", "lr": 0.05}
        if method == "ConcreteTaskArithmetic"
        else {
            "granularity": "layer",
            "meta_steps": 2,
            "mask_lr": 0.05,
            "lr": 0.01,
            "export_mask": "expected",
            "objective": "kl",
            "inner_lr": 30.0,
        }
    )

    def cfg(name, devices):
        c = _config(zoo, task_data, tmp_path / name, devices)
        init = {k: v for k, v in c["model"]["init_args"].items() if k != "granularity"}
        c["model"] = {"class_path": f"adamerge.methods.{method}", "init_args": {**init, **args}}
        if devices > 1 and method == "ConcreteAdaMerging":  # mask first, then λ: each phase leaves one unused
            c["trainer"]["strategy"] = "ddp_find_unused_parameters_true"
        return c

    single, ddp = _fit(tmp_path, cfg("one", 1), "one"), _fit(tmp_path, cfg("two", 2), "two")
    assert (single - 0.3).abs().max() > 2e-3  # the coefficients trained
    assert (single - ddp).abs().max() < TOL, (single - ddp).abs().max()
    w1, w2 = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < TOL


def test_concrete_adamerging_refuses_plain_ddp_before_training(zoo, task_data, tmp_path):
    """Plain DDP (no search for unused parameters) cannot train Concrete AdaMerging's phases, each of which leaves the
    other's tensors unused; the run stops with the strategy to use before any step and writes nothing."""
    c = _config(zoo, task_data, tmp_path / "out", 2)
    c["model"] = {
        "class_path": "adamerge.methods.ConcreteAdaMerging",
        "init_args": {**c["model"]["init_args"], "meta_steps": 2},
    }
    res = _cli_fit(tmp_path, c, "out")
    assert res.returncode != 0
    assert "ConcreteAdaMerging trains the mask (meta_steps) and then the coefficients" in res.stderr, res.stderr[-4000:]
    assert "--trainer.strategy ddp_find_unused_parameters_true" in res.stderr
    assert "Expected to have finished reduction" not in res.stderr  # torch's own error after a step: not reached
    assert not (tmp_path / "out").exists()


def test_wemoe_ddp_two_processes_match_single_process(zoo, task_data, tmp_path):
    """WEMoE's routers train under DDP like the coefficients: 2 processes equal one with the same global batch."""
    from safetensors.torch import load_file

    def cfg(name, devices):
        c = _config(zoo, task_data, tmp_path / name, devices)
        c["model"] = {
            "class_path": "adamerge.methods.WEMoE",
            "init_args": {"base": zoo[0], "models": zoo[1], "lr": 1e-3},
        }
        return c

    _fit(tmp_path, cfg("wsingle", 1), "wsingle")
    _fit(tmp_path, cfg("wddp", 2), "wddp")
    single, ddp = (load_file(str(tmp_path / n / "wemoe.safetensors")) for n in ("wsingle", "wddp"))
    routers = [k for k in single if k.startswith("routers.")]
    assert routers and max((single[k] - 0.3).abs().max() for k in routers if k.endswith("fc2.bias")) > 2e-3
    assert max((single[k] - ddp[k]).abs().max() for k in routers) < TOL


def test_batchnorm_merge_under_ddp_matches_single_process(tmp_path):
    """A MobileNetV2 merge (BatchNorm backbone) trained on batch statistics — one set for the step, and each task's
    own — under 2 DDP processes, each holding half of every task's rows: the statistics are those of both ranks' rows
    together (a differentiable sum per layer), so the trained coefficients equal one process's; the BatchNorm
    statistics re-estimated before export (one set and each task's own) do too — every rank re-estimates on whole
    steps, not its share. Task-wise coefficients: with layer-wise ones, a projection layer's BatchNorm bias has a
    coefficient the loss does not depend on (the next convolution carries the shift into a BatchNorm that removes
    it), whose rounding-noise gradient Adam turns into steps of ±lr, different in any two runs."""
    from safetensors.torch import load_file
    from test_vision import _mobilenet_zoo

    _, models, data = _mobilenet_zoo(tmp_path)

    def cfg(name, devices, statistics):
        c = {
            "seed_everything": 0,
            "model": {
                "class_path": "adamerge.methods.AdaMerging",
                "init_args": {
                    "base": str(tmp_path / "base"),
                    "models": models,
                    "granularity": "task",
                    "task_type": "image_cls",
                    "lr": 0.01,
                    "batchnorm_statistics": statistics,
                },
            },
            "data": {
                "tasks": {t: {"path": p, "image_column": "image"} for t, p in data.items()},
                "samples_per_task": 8,
            },
            "trainer": {
                "max_steps": 2,
                "accelerator": "cpu",
                "devices": devices,
                "logger": False,
                "default_root_dir": str(tmp_path / f"{name}_root"),
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "enable_checkpointing": False,
                **({"strategy": "ddp"} if devices > 1 else {}),
            },
            "export": {"output_dir": str(tmp_path / name), "per_task_models": False, "bn_batches": 2},
        }
        return c

    for statistics in ("batch", "task"):
        single = _fit(tmp_path, cfg(f"{statistics}_single", 1, statistics), f"{statistics}_single")
        ddp = _fit(tmp_path, cfg(f"{statistics}_ddp", 2, statistics), f"{statistics}_ddp")
        assert (single - 0.3).abs().max() > 2e-3
        assert (single - ddp).abs().max() < TOL, (statistics, (single - ddp).abs().max())
        files = ["model.safetensors"] + (["task_buffers.safetensors"] if statistics == "task" else [])
        for f in files:
            one, two = (load_file(str(tmp_path / f"{statistics}_{n}" / f)) for n in ("single", "ddp"))
            stats = [k for k in one if k.endswith(("running_mean", "running_var"))]
            assert stats and sorted(one) == sorted(two)
            assert f == "model.safetensors" or any(k.startswith("digits/") for k in stats)
            # relative: the coefficients agree to float32 rounding (~1e-7), which ~50 BatchNorm layers turn into
            # ~3e-5 of the last layers' variances; unsynchronised training moves the coefficients by 2e-2
            assert max(((one[k] - two[k]).abs().max() / one[k].abs().max()) for k in stats) < 1e-4, (statistics, f)


@pytest.mark.parametrize("recompute", [None, "merge"])
def test_fsdp2_on_a_llama_shaped_causal_lm_matches_single_process(task_data, tmp_path, recompute):
    """The sharded path on a small random LLaMA (untied embeddings, GQA): 2 FSDP2 ranks, each holding half of every
    task-vector block, end where one process does (which merges the embedding table row by row; the sharded run
    merges it whole)."""
    from test_memory import llama_zoo

    zoo = llama_zoo(tmp_path / "zoo", tied=False)
    data = dict(zip(zoo[1], task_data.values()))

    def cfg(name, devices):
        c = _config(zoo, data, tmp_path / name, devices)
        c["model"]["init_args"]["task_type"] = "causal_lm"
        return c

    single = _fit(tmp_path, cfg("lsingle", 1), "lsingle")
    c = cfg("lfsdp", 2)
    c["model"]["init_args"]["recompute"] = recompute
    c["trainer"]["strategy"] = {
        "class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
    }
    c["trainer"]["callbacks"] = [{"class_path": "shard_probe.ShardProbe"}]
    c["trainer"]["default_root_dir"] = str(tmp_path / "lfsdp_root")
    fsdp = _fit(tmp_path, c, "lfsdp")
    assert (single - 0.3).abs().max() > 2e-3
    assert (single - fsdp).abs().max() < TOL, (single - fsdp).abs().max()
    probe = json.loads((tmp_path / "lfsdp_root" / "shard_probe.json").read_text())
    assert probe["sharded_stores"] == probe["stores"] > 0
    assert probe["local_elements"] * 2 == pytest.approx(probe["global_elements"], rel=0.01)
    # one merge per step; with recompute, each of the 3 task groups merges the layer and again in its backward
    assert probe["first_layer_merges"] == (1 if recompute is None else 6)


def _batch_level_grads(rank, world, port, out_path):
    import torch.distributed as dist

    from adamerge.core.distributed import all_sum
    from adamerge.objectives import entropy_objective, infomax_objective, kl_to_experts, pseudo_label_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    W = torch.randn(5, 3, requires_grad=True)  # a stand-in for the coefficients: logits = x @ W
    x, x3 = torch.randn(8, 5), torch.randn(8, 6, 5)  # rows (classification), and [n, L] tokens (causal LM)
    mask = torch.rand(8, 6) > 0.3  # uneven non-pad tokens per rank
    expert, expert3 = torch.randn(8, 3), torch.randn(8, 6, 3)
    objectives = {
        "infomax": lambda s, r: infomax_objective({"a": x[r] @ W}, None, 1.0, s),
        "infomax_tokens": lambda s, r: infomax_objective({"a": x3[r] @ W}, {"a": mask[r]}, 1.0, s),
        "entropy_tokens": lambda s, r: entropy_objective({"a": x3[r] @ W}, {"a": mask[r]}, s),
        "kl_tokens": lambda s, r: kl_to_experts({"a": x3[r] @ W}, {"a": expert3[r]}, {"a": mask[r]}, 2.0, s),
        "pseudo_label": lambda s, r: pseudo_label_objective({"a": x[r] @ W}, {"a": expert[r]}, None, 0.4, s),
    }
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    result = {}
    for name, f in objectives.items():
        W.grad = None
        f(all_sum, share)[0].backward()
        g = W.grad.clone()
        dist.all_reduce(g)  # what DDP does with the ranks' gradients: their mean
        g /= world
        W.grad = None
        f(None, slice(None))[0].backward()  # one process, the whole batch
        result[name] = [float((g - W.grad).abs().max()), float(W.grad.abs().max())]
    if rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


def test_objectives_average_the_global_batch_under_data_parallelism(tmp_path):
    """Token means (causal LMs), infomax's batch-mean prediction and pseudo-labels' confident rows are means over the
    global batch, not each rank's: 2 gloo ranks, each on half the rows, averaged as DDP does, give the one-process
    gradient (without the sums over ranks they do not: infomax 2.6e-2 off a gradient of 7.9e-2)."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.json"
    mp.spawn(_batch_level_grads, args=(2, 29600 + os.getpid() % 300, str(out)), nprocs=2)
    result = json.loads(out.read_text())
    for name, (diff, scale) in result.items():
        assert scale > 1e-3, name
        assert diff < 1e-6 * max(1.0, scale), (name, diff)
