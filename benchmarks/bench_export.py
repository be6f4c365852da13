#!/usr/bin/env python
"""Peak memory and time of writing a merged checkpoint: adamerge's streamed export vs materialising the merge.

    python benchmarks/bench_export.py                        # a 6-layer BERT-base-width encoder, 2 fine-tunes
    python benchmarks/bench_export.py --layers 12 --tasks 4

Each variant runs in a fresh process that builds the same Task Arithmetic merge (random weights; fine-tunes are the
base plus seeded noise), then — after resetting the kernel's peak-RSS mark (VmHWM) — writes the merged weights once:

  stream         adamerge's export (``module.export``): merged one block at a time, written tensor by tensor
  stream-bf16    the same, stored in bfloat16 and sharded at 50MB
  materialise    the merge as one state dict (``final_merged_params``), then ``safetensors.save_file`` of it — what
                 saving a merged model with ``save_pretrained`` costs, and what adamerge's export did before

Reported per variant: the peak RSS above the RSS before writing (MiB), that figure over the merged model's size, and
the wall time. Both variants write ``per_task_models: false`` (tasks/<task>/ copies read the written shards through
mmap, whose pages would count as RSS). Nothing is hard-coded: every figure is measured in this run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def build_zoo(root: Path, layers: int, tasks: int) -> tuple[str, dict[str, str]]:
    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072, vocab_size=30522
    )
    base = BertForSequenceClassification(config)
    base.save_pretrained(str(root / "base"))
    paths = {}
    for t in range(tasks):
        g = torch.Generator().manual_seed(t + 1)
        with torch.no_grad():
            ft = BertForSequenceClassification(config)
            ft.load_state_dict(
                {
                    k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                    for k, v in base.state_dict().items()
                }
            )
        ft.save_pretrained(str(root / f"task{t}"))
        paths[f"task{t}"] = str(root / f"task{t}")
        del ft
    return str(root / "base"), paths


def worker(variant: str, base: str, paths: dict[str, str], out: str) -> dict:
    import torch
    from safetensors.torch import save_file

    from adamerge import METHODS

    module = METHODS["task_arithmetic"](base, paths, scale=0.3)
    size_mib = sum(p.numel() * p.element_size() for p in module.merged.backbone.parameters()) / 2**20
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS (Linux >= 4.0)
    before = _status("VmRSS")
    start = time.perf_counter()
    if variant == "stream":
        module.export(out, per_task_models=False, model_card=False)
    elif variant == "stream-bf16":
        module.export(out, per_task_models=False, model_card=False, dtype="bfloat16", max_shard_size="50MB")
    elif variant == "materialise":
        Path(out).mkdir(parents=True)
        merged = module.final_merged_params()
        state = {**module.merged.backbone.state_dict(), **merged}
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(out) / "model.safetensors"))
    else:
        raise SystemExit(f"unknown variant {variant}")
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    del torch
    return {
        "variant": variant,
        "model_mib": round(size_mib, 1),
        "peak_extra_mib": round(peak, 1),
        "peak_over_model": round(peak / size_mib, 3),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--worker", nargs=3, metavar=("VARIANT", "ZOO", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        variant, zoo, out = args.worker
        spec = json.loads(Path(zoo).read_text())
        print(json.dumps(worker(variant, spec["base"], spec["paths"], out)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base, paths = build_zoo(tmp / "zoo", args.layers, args.tasks)
        (tmp / "zoo.json").write_text(json.dumps({"base": base, "paths": paths}))
        rows = []
        for variant in ("stream", "stream-bf16", "materialise"):
            res = subprocess.run(
                [sys.executable, __file__, "--worker", variant, str(tmp / "zoo.json"), str(tmp / f"out-{variant}")],
                capture_output=True,
                text=True,
                cwd=ROOT,
            )
            if res.returncode:
                raise SystemExit(res.stderr[-3000:])
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(
        f"# export memory, BERT width 768, {args.layers} layers, {args.tasks} fine-tunes, "
        f"merged model {rows[0]['model_mib']} MiB (float32)"
    )
    print("| variant | peak RSS above start (MiB) | / model size | time (s) |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_extra_mib']} | {r['peak_over_model']} | {r['seconds']} |")
    ref = next(r for r in rows if r["variant"] == "materialise")
    ours = next(r for r in rows if r["variant"] == "stream")
    print(f"stream / materialise peak: {ours['peak_extra_mib'] / ref['peak_extra_mib']:.3f}")


if __name__ == "__main__":
    main()
