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
        "model": {"class_path": "adamerge.methods.AdaMerging",
                  "init_args": {"base": base, "models": paths, "granularity": "layer"}},  # reference lr 1e-3
        "data": {"tasks": {t: {"path": p} for t, p in task_data.items()}, "samples_per_task": 4, "max_length": 16},
        "trainer": {"max_steps": 4, "accelerator": "cpu", "devices": devices, "logger": False,
                    "default_root_dir": str(out) + "_root",  # LightningCLI saves config.yaml there, not in the repo
                    "enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False,
                    **({"strategy": "ddp"} if devices > 1 else {})},
        "export": {"output_dir": str(out), "per_task_models": False},
    }


def _fit(tmp_path, cfg, name):
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    res = subprocess.run([sys.executable, "-m", "adamerge.cli", "fit", "--config", str(p)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return torch.tensor(json.loads((tmp_path / name / "merge_manifest.json").read_text())["coefficients"]["values"])


def test_ddp_two_processes_match_single_process(zoo, task_data, tmp_path):
    single = _fit(tmp_path, _config(zoo, task_data, tmp_path / "single", 1), "single")
    ddp = _fit(tmp_path, _config(zoo, task_data, tmp_path / "ddp", 2), "ddp")
    assert (single - 0.3).abs().max() > 2e-3  # 4 Adam steps of lr 1e-3 moved the coefficients
    assert (single - ddp).abs().max() < TOL, (single - ddp).abs().max()


def test_indivisible_share_is_a_clear_error():
    from adamerge.data import TaskStepDataset
    from adamerge.errors import MergeInputError

    with pytest.raises(MergeInputError, match=r"samples_per_task \(3\) must be divisible by the number of processes \(2\)"):
        TaskStepDataset({"a": [{"input_ids": [1]}]}, 3, 0, 0, 1, rank=0, world_size=2)


def test_model_parallel_fsdp2_shards_task_vectors_and_matches_single_process(zoo, task_data, tmp_path):
    single = _fit(tmp_path, _config(zoo, task_data, tmp_path / "single", 1), "single")
    cfg = _config(zoo, task_data, tmp_path / "fsdp", 2)
    cfg["trainer"]["strategy"] = {"class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
                                  "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
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
    fsdp_cfg["trainer"]["strategy"] = {"class_path": "pytorch_lightning.strategies.ModelParallelStrategy",
                                       "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}}
    fsdp = _fit(tmp_path, fsdp_cfg, "fsdp_sparse")
    assert (single - 0.3).abs().max() > 2e-3
    assert (single - ddp).abs().max() < 1e-6, (single - ddp).abs().max()
    assert (single - fsdp).abs().max() < 1e-6, (single - fsdp).abs().max()


def test_wemoe_ddp_two_processes_match_single_process(zoo, task_data, tmp_path):
    """WEMoE's routers train under DDP like the coefficients: 2 processes equal one with the same global batch."""
    from safetensors.torch import load_file

    def cfg(name, devices):
        c = _config(zoo, task_data, tmp_path / name, devices)
        c["model"] = {"class_path": "adamerge.methods.WEMoE",
                      "init_args": {"base": zoo[0], "models": zoo[1], "lr": 1e-3}}
        return c

    _fit(tmp_path, cfg("wsingle", 1), "wsingle")
    _fit(tmp_path, cfg("wddp", 2), "wddp")
    single, ddp = (load_file(str(tmp_path / n / "wemoe.safetensors")) for n in ("wsingle", "wddp"))
    routers = [k for k in single if k.startswith("routers.")]
    assert routers and max((single[k] - 0.3).abs().max() for k in routers if k.endswith("fc2.bias")) > 2e-3
    assert max((single[k] - ddp[k]).abs().max() for k in routers) < TOL
