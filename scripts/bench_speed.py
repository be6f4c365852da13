#!/usr/bin/env python
"""Per-step time and peak memory of layer-wise AdaMerging: adamerge vs FusionBench vs a plain forward+backward.

    python scripts/bench_speed.py                      # T = 2, 4, 8 on a MiniLM-sized BERT (CPU here; GPU if present)
    python scripts/bench_speed.py --tasks 2 4 --steps 4

For each T, fresh processes run the same model (all-MiniLM-L6-v2's architecture, random weights; fine-tunes are the
base plus seeded noise) on the same batch (16 rows per task, 64 tokens):

  a        plain forward+backward of the model over the T*16 rows (all weights require grad), per-task heads
  b        adamerge layer-wise AdaMerging step: merge (one tensordot per tensor), one forward/backward, Adam step
  b-bf16   b with the task vectors stored in bfloat16 (tv_dtype; the merge computes in float32, chunk by chunk)
  b-chunks b with task_chunks = T: one merge, then each task's forward+backward on its own (bounded activations)
  b-lean   bfloat16 task vectors and task_chunks = T together
  b-sparse AdaMerging++ (TIES-trimmed task vectors, density 0.2) kept sparse (prep.sparse_storage), float32, with
           task_chunks = T -- a different (published) variant, shown for what sparse storage saves
  c        FusionBench 0.2.33 LayerWiseMergedModel, driven as its layer-wise AdaMerging does: merge_weights(), then
           per task a forward and backward(retain_graph=True), Adam step -- in its own venv (created on first use)

Reported: the median step time over the measured steps with the ratios b/a and c/b, and two memory figures per
process: its peak during the training steps (CPU: peak RSS after resetting the kernel's high-water mark once
everything is loaded; GPU: torch.cuda.max_memory_allocated over the steps, resident weights included) and its
lifetime peak RSS (loading included). Nothing is hard-coded: every figure is measured in this run.

Without network access, pass --fusionbench-python: an interpreter that imports fusion_bench (with PYTHONPATH set to a
folder holding fusion_bench, omegaconf, antlr4 and dill, say) instead of letting the script create its venv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSIONBENCH = "fusion-bench==0.2.33"
MODES = {"a": "plain", "b": "adamerge", "b-bf16": "adamerge-bf16", "b-chunks": "adamerge-chunked",
         "b-lean": "adamerge-lean", "b-sparse": "adamerge-sparse", "c": "fusionbench"}  # column -> worker mode


def config():
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)


def models(T: int):
    """Yield the base then T fine-tunes (seq-cls BERTs), one at a time to keep memory flat."""
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(config()).eval()
    yield base
    for t in range(T):
        g = torch.Generator().manual_seed(100 + t)
        ft = BertForSequenceClassification(config()).eval()
        ft.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                            for k, v in base.state_dict().items()})
        yield ft


def batch(T: int, rows: int, length: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, 30000, (T * rows, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def entropy(logits):
    import torch

    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1).mean()


def reset_peak(device: str) -> bool:
    """Start a fresh peak-memory window; False where the platform cannot (the step peak is then not reported)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # hand freed heap pages back (glibc keeps them in RSS), then reset VmHWM (the peak RSS) to the current RSS
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0
        return True
    except OSError:
        return False


def step_peak_mib(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(mode: str, T: int, steps: int, rows: int, length: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = {k: v.to(device) for k, v in batch(T, rows, length).items()}
    slices = [slice(t * rows, (t + 1) * rows) for t in range(T)]
    if mode == "plain":
        gen = models(T)
        model = next(gen).to(device).train().requires_grad_(True)
        heads = [torch.nn.Linear(384, 2).to(device).requires_grad_(False) for _ in range(T)]

        def step():
            pooled = model.bert(**inputs).pooler_output
            loss = sum(entropy(h(pooled[s])) for h, s in zip(heads, slices))
            loss.backward()
            model.zero_grad(set_to_none=True)
    elif mode.startswith("adamerge"):
        from adamerge.merged import MergedModel
        from adamerge.objectives import entropy_objective
        from adamerge.parametrize import Coefficients
        from adamerge.pool import load_pool

        tmp = Path(tempfile.mkdtemp(prefix="bench_speed_"))
        paths = []
        for i, m in enumerate(models(T)):
            m.save_pretrained(str(tmp / str(i)))
            paths.append(str(tmp / str(i)))
            del m
        pool = load_pool(paths[0], {f"t{i}": p for i, p in enumerate(paths[1:])},
                         tv_dtype=torch.bfloat16 if mode in ("adamerge-bf16", "adamerge-lean") else None)
        if mode == "adamerge-sparse":
            from adamerge.functional import ties_trim_elect

            pool.task_vectors = ties_trim_elect(pool.task_vectors, 0.2)
        merged = MergedModel(pool, Coefficients(T, len(pool.param_names), "layer", 0.3))
        del pool
        if mode == "adamerge-sparse":
            merged.to_sparse_storage()
        merged = merged.to(device)
        opt = torch.optim.Adam([merged.coefficients.weight], lr=1e-3)
        names = list(merged.task_names)

        def step():
            if mode in ("adamerge-chunked", "adamerge-lean", "adamerge-sparse"):  # one task per group, as FusionBench
                loss, _, _ = merged.chunked_surrogate(
                    {"inputs": inputs, "tasks": names, "sizes": [rows] * T},
                    lambda sub, params: entropy_objective(merged(sub["inputs"], sub["tasks"], sub["sizes"],
                                                                 params=params)), T)
            else:
                loss, _ = entropy_objective(merged(inputs, names, [rows] * T))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:  # fusionbench
        from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

        gen = models(T)
        base = next(gen)
        fts = [m.bert for m in gen]
        heads = [torch.nn.Linear(384, 2).to(device).requires_grad_(False) for _ in range(T)]
        n_layers = len(tuple(base.bert.parameters()))
        module = LayerWiseMergedModel(get_layer_wise_weights(T, n_layers, 0.3), base.bert, fts,
                                      clamp_weights=False, strict=False).to(device)  # transformers 5: non-persistent buffers
        opt = torch.optim.Adam([module.merge_weight], lr=1e-3)
        module.merge_weights()

        def step():
            for h, s in zip(heads, slices):
                out = module(input_ids=inputs["input_ids"][s], attention_mask=inputs["attention_mask"][s])
                entropy(h(out.pooler_output)).backward(retain_graph=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            module.merge_weights()

    import gc

    gc.collect()
    windowed = reset_peak(device)
    times = []
    for _ in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"mode": mode, "T": T, "step_ms": 1000 * statistics.median(times[1:]),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "device": device,
           "step_peak_mib": step_peak_mib(device) if windowed else None,
           "step_peak_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "RSS high-water mark"}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
    return out


def fusionbench_python(venv: Path) -> str:
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", FUSIONBENCH], check=True)
    return str(py)


def run_worker(python: str, mode: str, T: int, args) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([python, __file__, "--worker", mode, "--tasks", str(T), "--steps", str(args.steps),
                          "--rows", str(args.rows), "--length", str(args.length)],
                         env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} T={T} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    p.add_argument("--rows", type=int, default=16, help="rows per task per step")
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--fusionbench-venv", type=Path, default=ROOT / ".cache" / "fusionbench-venv")
    p.add_argument("--fusionbench-python", help="an interpreter that imports fusion_bench (no venv is created)")
    p.add_argument("--worker", choices=list(MODES.values()), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tasks[0], args.steps, args.rows, args.length)))
        return
    fb = args.fusionbench_python or fusionbench_python(args.fusionbench_venv)
    results = []
    for T in args.tasks:
        row = {k: run_worker(fb if k == "c" else sys.executable, mode, T, args) for k, mode in MODES.items()}
        results.append(row)
        print(json.dumps({"T": T, **{k: [round(v["step_ms"], 1), v["step_peak_mib"] and round(v["step_peak_mib"]),
                                         round(v["peak_rss_mib"])] for k, v in row.items()}}), flush=True)
    print()
    print(tables(results, args))
    out = ROOT / "runs" / "bench_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def tables(results: list[dict], args) -> str:
    """Markdown: step times with b/a and c/b; peak memory during the steps against FusionBench; lifetime peak RSS."""
    cols = list(MODES)
    first = results[0]["a"]
    where = first["device"] + (f" ({first['gpu']})" if "gpu" in first else "")
    ours = ["b", "b-bf16", "b-chunks", "b-lean", "b-sparse"]
    out = [f"Step time in ms (median of {args.steps} steps after one warm-up), {where}, {args.rows} rows/task, "
           f"{args.length} tokens:", "",
           "| T | " + " | ".join(cols) + " | b/a | c/b | c/b-lean |", "|" + "---|" * (len(cols) + 4)]
    for row in results:
        ms = {k: row[k]["step_ms"] for k in cols}
        out.append(f"| {row['a']['T']} | " + " | ".join(f"{ms[k]:.1f}" for k in cols)
                   + f" | {ms['b'] / ms['a']:.2f} | {ms['c'] / ms['b']:.2f} | {ms['c'] / ms['b-lean']:.2f} |")
    out += ["", f"Peak memory during the steps, MiB ({first['step_peak_kind']}), and ours relative to FusionBench (c):",
            "", "| T | " + " | ".join(cols) + " | " + " | ".join(f"{k}/c" for k in ours) + " |",
            "|" + "---|" * (len(cols) + len(ours) + 1)]
    for row in results:
        peak = {k: row[k]["step_peak_mib"] for k in cols}
        if None in peak.values():
            out.append(f"| {row['a']['T']} | not measurable on this platform |")
            continue
        out.append(f"| {row['a']['T']} | " + " | ".join(f"{peak[k]:.0f}" for k in cols) + " | "
                   + " | ".join(f"{peak[k] / peak['c']:.2f}" for k in ours) + " |")
    out += ["", "Lifetime peak RSS of each process, MiB (loading included):", "",
            "| T | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for row in results:
        out.append(f"| {row['a']['T']} | " + " | ".join(f"{row[k]['peak_rss_mib']:.0f}" for k in cols) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
