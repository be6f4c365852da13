#!/usr/bin/env python
"""Per-step time and peak memory of layer-wise AdaMerging: adamerge vs FusionBench vs a plain forward+backward.

    python benchmarks/bench_speed.py                      # T = 2, 4, 8 on a MiniLM-sized BERT (CPU here; GPU if
    present)
    python benchmarks/bench_speed.py --tasks 2 4 --steps 4
    python benchmarks/bench_speed.py --tasks 2 4 8 16 32 --columns a b b-lean c --plot   # the scaling curve
    python benchmarks/bench_speed.py --shape bert-base --tasks 8 --steps 2                # model size

For each T, fresh processes run the same model (``--shape``: ``minilm`` = all-MiniLM-L6-v2's architecture, 22.7M
parameters; ``bert-base`` = BERT-base's, 109M; random weights; fine-tunes are the base plus seeded noise, saved once
under .cache/bench_speed/<shape>/ and loaded from disk by every process) on the same batch (16 rows per task, 64
tokens):

  a        plain forward+backward of the model over the T*16 rows (all weights require grad), per-task heads
  b        adamerge layer-wise AdaMerging step: merge (one tensordot per tensor), one forward/backward, Adam step
  b-bf16   b with the task vectors stored in bfloat16 (tv_dtype; the merge computes in float32, chunk by chunk)
  b-chunks b with task_chunks = T: one merge, then each task's forward+backward on its own (bounded activations)
  b-lean   bfloat16 task vectors and task_chunks = T together
  b-micro  b-lean with each task's rows in --micro-batches pieces (default 2) run one at a time (micro_batches: same
           gradient, that fraction of the activations)
  b-ckpt   b-lean with recompute = activations: each layer under an activation checkpoint, re-run in the backward
           (no layer activations kept; the merged weights and dL/dW are), one group per task
  b-rc     b-lean with recompute = merge: each layer also merged inside its checkpoint, again in the backward (no
           merged weights, no dL/dW, no layer activations kept), one group per task
  b-rc1    bfloat16 task vectors and recompute = merge, one forward over all tasks (task_chunks = 1)
  b-sparse AdaMerging++ (TIES-trimmed task vectors, density 0.2) kept sparse (prep.sparse_storage), float32, with
           task_chunks = T -- a different (published) variant, shown for what sparse storage saves
  c        FusionBench 0.2.33 LayerWiseMergedModel, driven as its layer-wise AdaMerging does: merge_weights(), then
           per task a forward and backward(retain_graph=True), Adam step -- in its own venv (created on first use)

  act      (not a column) plain forward+backward over one task's rows: the activations of one task's batch

Reported: the median step time over the measured steps with the ratios b/a and c/b, and two memory figures per
process: its peak during the training steps (CPU: peak RSS after resetting the kernel's high-water mark once
everything is loaded; GPU: torch.cuda.max_memory_allocated over the steps, resident weights included) and its
lifetime peak RSS (loading included); and the floor of layer-wise merging, base + T task vectors + one task's
activations, each measured here: process baseline (RSS after the imports; 0 on the GPU) + the base's bytes + T times
the base's bytes at the task vectors' storage width + (the act process's step peak - its baseline - 2 x the base's
bytes, its weights and their gradients). Nothing is hard-coded: every figure is measured in this run.

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

ROOT = Path(__file__).resolve().parents[1]
FUSIONBENCH = "fusion-bench==0.2.33"
MODES = {
    "a": "plain",
    "b": "adamerge",
    "b-bf16": "adamerge-bf16",
    "b-chunks": "adamerge-chunked",
    "b-lean": "adamerge-lean",
    "b-micro": "adamerge-micro",
    "b-ckpt": "adamerge-checkpoint",
    "b-rc": "adamerge-recompute",
    "b-rc1": "adamerge-recompute1",
    "b-sparse": "adamerge-sparse",
    "c": "fusionbench",
}  # column -> worker mode
BF16_MODES = (
    "adamerge-bf16",
    "adamerge-lean",
    "adamerge-micro",
    "adamerge-checkpoint",
    "adamerge-recompute",
    "adamerge-recompute1",
)
CHUNKED_MODES = (
    "adamerge-chunked",
    "adamerge-lean",
    "adamerge-micro",
    "adamerge-checkpoint",
    "adamerge-recompute",
    "adamerge-sparse",
)
SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}
SHAPE = os.environ.get("BENCH_SHAPE", "minilm")  # set by --shape for the workers
MICRO_BATCHES = int(os.environ.get("BENCH_MICRO_BATCHES", "2"))  # set by --micro-batches for the workers


def config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=30522,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        **SHAPES[SHAPE],
    )


def zoo_dir() -> Path:
    return ROOT / ".cache" / "bench_speed" / SHAPE


def build_zoo(T: int) -> None:
    """Save the base and T fine-tunes under :func:`zoo_dir` (kept between runs), in this process, so that every
    measured process loads them from disk as a user would and none carries the heap of building them."""
    root = zoo_dir()
    for i, m in enumerate(models(T)):
        if not (root / str(i) / "model.safetensors").exists():
            m.save_pretrained(str(root / str(i)))
        del m


def load(i: int):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(str(zoo_dir() / str(i))).eval()


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
        ft.load_state_dict(
            {
                k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                for k, v in base.state_dict().items()
            }
        )
        yield ft


def weights_mib() -> float:
    """The backbone's float32 bytes (built on the meta device: nothing allocated)."""
    import torch
    from transformers import BertModel

    with torch.device("meta"):
        return sum(p.numel() * 4 for p in BertModel(config(), add_pooling_layer=True).parameters()) / 2**20


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


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(mode: str, T: int, steps: int, rows: int, length: int) -> dict:
    import torch
    import transformers  # noqa: F401  (in the baseline, as every mode imports it)

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = 0.0 if device == "cuda" else current_rss_mib()
    if mode == "act":  # one task's rows through the plain model
        mode, T = "plain", 1
    inputs = {k: v.to(device) for k, v in batch(T, rows, length).items()}
    slices = [slice(t * rows, (t + 1) * rows) for t in range(T)]
    hidden = SHAPES[SHAPE]["hidden_size"]
    if mode == "plain":
        model = load(0).to(device).train().requires_grad_(True)
        heads = [torch.nn.Linear(hidden, 2).to(device).requires_grad_(False) for _ in range(T)]

        def step():
            pooled = model.bert(**inputs).pooler_output
            loss = sum(entropy(h(pooled[s])) for h, s in zip(heads, slices))
            loss.backward()
            model.zero_grad(set_to_none=True)
    elif mode.startswith("adamerge"):
        from adamerge import Coefficients, MergedModel, entropy_objective, load_pool

        paths = [str(zoo_dir() / str(i)) for i in range(T + 1)]
        pool = load_pool(
            paths[0],
            {f"t{i}": p for i, p in enumerate(paths[1:])},
            tv_dtype=torch.bfloat16 if mode in BF16_MODES else None,
        )
        if mode == "adamerge-sparse":
            from adamerge import ties_trim_elect

            pool.task_vectors = ties_trim_elect(pool.task_vectors, 0.2)
        merged = MergedModel(pool, Coefficients(T, len(pool.param_names), "layer", 0.3))
        del pool
        if mode == "adamerge-sparse":
            merged.to_sparse_storage()
        merged = merged.to(device)
        merged.recompute = {
            "adamerge-checkpoint": "activations",
            "adamerge-recompute": "merge",
            "adamerge-recompute1": "merge",
        }.get(mode)
        opt = torch.optim.Adam([merged.coefficients.weight], lr=1e-3)
        names = list(merged.task_names)

        def step():
            if mode in CHUNKED_MODES:  # one task per group
                loss, _, _ = merged.chunked_surrogate(
                    {"inputs": inputs, "tasks": names, "sizes": [rows] * T},
                    lambda sub, **kw: entropy_objective(merged(sub["inputs"], sub["tasks"], sub["sizes"], **kw)),
                    T,
                    MICRO_BATCHES if mode == "adamerge-micro" else 1,
                )
            else:
                loss, _ = entropy_objective(merged(inputs, names, [rows] * T))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:  # fusionbench
        from fusion_bench.models.wrappers.layer_wise_fusion import LayerWiseMergedModel, get_layer_wise_weights

        base = load(0)
        fts = [load(i).bert for i in range(1, T + 1)]
        heads = [torch.nn.Linear(hidden, 2).to(device).requires_grad_(False) for _ in range(T)]
        n_layers = len(tuple(base.bert.parameters()))
        module = LayerWiseMergedModel(
            get_layer_wise_weights(T, n_layers, 0.3), base.bert, fts, clamp_weights=False, strict=False
        ).to(device)  # transformers 5: non-persistent buffers
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
    weights = weights_mib()
    out = {
        "mode": mode,
        "T": T,
        "step_ms": 1000 * statistics.median(times[1:]),
        "baseline_mib": baseline,
        "weights_mib": weights,
        "shape": SHAPE,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": device,
        "step_peak_mib": step_peak_mib(device) if windowed else None,
        "step_peak_kind": "torch.cuda.max_memory_allocated" if device == "cuda" else "RSS high-water mark",
    }
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
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "TOKENIZERS_PARALLELISM": "false",
        "BENCH_SHAPE": args.shape,
        "BENCH_MICRO_BATCHES": str(args.micro_batches),
    }
    res = subprocess.run(
        [
            python,
            __file__,
            "--worker",
            mode,
            "--tasks",
            str(T),
            "--steps",
            str(args.steps),
            "--rows",
            str(args.rows),
            "--length",
            str(args.length),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"{mode} T={T} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--steps", type=int, default=5, help="measured steps (after one warm-up step)")
    p.add_argument("--rows", type=int, default=16, help="rows per task per step")
    p.add_argument("--length", type=int, default=64, help="tokens per row")
    p.add_argument("--shape", choices=list(SHAPES), default="minilm", help="model size")
    p.add_argument("--columns", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--micro-batches", type=int, default=2, help="pieces per task of the b-micro column")
    p.add_argument("--plot", action="store_true", help="also write runs/bench_speed_<shape>.png (time, memory vs T)")
    p.add_argument("--fusionbench-venv", type=Path, default=ROOT / ".cache" / "fusionbench-venv")
    p.add_argument("--fusionbench-python", help="an interpreter that imports fusion_bench (no venv is created)")
    p.add_argument("--worker", choices=[*MODES.values(), "act"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tasks[0], args.steps, args.rows, args.length)))
        return
    cols = [c for c in MODES if c in args.columns]
    fb = (args.fusionbench_python or fusionbench_python(args.fusionbench_venv)) if "c" in cols else None
    os.environ["BENCH_SHAPE"] = args.shape
    global SHAPE
    SHAPE = args.shape
    build_zoo(max(args.tasks))
    act = run_worker(sys.executable, "act", 1, args)
    results = []
    for T in args.tasks:
        row = {k: run_worker(fb if k == "c" else sys.executable, MODES[k], T, args) for k in cols}
        results.append(row)
        print(
            json.dumps(
                {
                    "T": T,
                    **{
                        k: [
                            round(v["step_ms"], 1),
                            v["step_peak_mib"] and round(v["step_peak_mib"]),
                            round(v["peak_rss_mib"]),
                        ]
                        for k, v in row.items()
                    },
                }
            ),
            flush=True,
        )
    print()
    print(tables(results, act, args))
    out = ROOT / "runs" / f"bench_speed{'' if args.shape == 'minilm' else '_' + args.shape}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.run import provenance

    call = provenance(sys.argv[1:], script="benchmarks/bench_speed.py")
    if os.environ.get("BENCH_THREADS"):  # part of the command: it sets every process's thread count
        call["command"] = f"BENCH_THREADS={os.environ['BENCH_THREADS']} {call['command']}"
    record = {"shape": args.shape, "micro_batches": args.micro_batches, "act": act, "rows": results, "runs": [call]}
    out.write_text(json.dumps(record, indent=2) + "\n")
    if args.plot:
        print(f"plot: {plot(results, act, args)}")


def floor_mib(act: dict, T: int, tv_bytes: int) -> float:
    """Base + T task vectors (``tv_bytes`` per element) + one task's activations, plus the process baseline."""
    w = act["weights_mib"]
    activations = act["step_peak_mib"] - act["baseline_mib"] - 2 * w
    return act["baseline_mib"] + w + T * w * tv_bytes / 4 + activations


def tables(results: list[dict], act: dict, args) -> str:
    """Markdown: step times with b/a and c/b; peak memory during the steps against FusionBench and the floor;
    lifetime peak RSS."""
    cols = list(results[0])
    first = results[0][cols[0]]
    where = first["device"] + (f" ({first['gpu']})" if "gpu" in first else "")
    ours = [k for k in cols if k.startswith("b")]
    ratios = [f"{k}/a" for k in ("b", "b-lean", "b-micro", "b-ckpt", "b-rc", "b-rc1") if k in cols and "a" in cols]
    ratios += [f"c/{k}" for k in ("b", "b-lean", "b-micro", "b-ckpt", "b-rc", "b-rc1") if k in cols and "c" in cols]
    out = [
        f"Step time in ms (median of {args.steps} steps after one warm-up), {where}, shape {args.shape} "
        f"({act['weights_mib']:.0f} MiB of float32 weights), {args.rows} rows/task, {args.length} tokens"
        f"{f', b-micro in {args.micro_batches} pieces per task' if 'b-micro' in cols else ''}:",
        "",
        "| T | " + " | ".join(cols + ratios) + " |",
        "|" + "---|" * (len(cols) + len(ratios) + 1),
    ]
    for row in results:
        ms = {k: row[k]["step_ms"] for k in cols}
        vals = [f"{ms[k]:.1f}" for k in cols] + [f"{ms[r.split('/')[0]] / ms[r.split('/')[1]]:.2f}" for r in ratios]
        out.append(f"| {row[cols[0]]['T']} | " + " | ".join(vals) + " |")
    fl = ["floor32", "floor16"]
    rel = [f"{k}/c" for k in ours if "c" in cols] + [f"{k}/floor" for k in ours]
    activations = act["step_peak_mib"] - act["baseline_mib"] - 2 * act["weights_mib"]
    baseline = "" if first["device"] == "cuda" else f", process baseline {act['baseline_mib']:.0f} MiB included"
    out += [
        "",
        f"Peak memory during the steps, MiB ({first['step_peak_kind']}); floor32/floor16 = base + T task "
        f"vectors in float32/bfloat16 + one task's activations ({activations:.0f} MiB{baseline}); "
        "x/floor against the floor of its own storage width:",
        "",
        "| T | " + " | ".join(cols + fl + rel) + " |",
        "|" + "---|" * (len(cols) + len(fl) + len(rel) + 1),
    ]
    half = {k for k, mode in MODES.items() if mode in BF16_MODES}
    for row in results:
        peak = {k: row[k]["step_peak_mib"] for k in cols}
        T = row[cols[0]]["T"]
        if None in peak.values():
            out.append(f"| {T} | not measurable on this platform |")
            continue
        f32, f16 = floor_mib(act, T, 4), floor_mib(act, T, 2)
        vals = [f"{peak[k]:.0f}" for k in cols] + [f"{f32:.0f}", f"{f16:.0f}"]
        vals += [f"{peak[k] / peak['c']:.2f}" for k in ours if "c" in cols]
        vals += [f"{peak[k] / (f16 if k in half else f32):.2f}" for k in ours]
        out.append(f"| {T} | " + " | ".join(vals) + " |")
    out += [
        "",
        "Lifetime peak RSS of each process, MiB (loading included):",
        "",
        "| T | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for row in results:
        out.append(f"| {row[cols[0]]['T']} | " + " | ".join(f"{row[k]['peak_rss_mib']:.0f}" for k in cols) + " |")
    return "\n".join(out)


def plot(results: list[dict], act: dict, args) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(results[0])
    Ts = [row[cols[0]]["T"] for row in results]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in cols:
        ax1.plot(Ts, [row[k]["step_ms"] for row in results], marker="o", label=k)
        ax2.plot(Ts, [row[k]["step_peak_mib"] for row in results], marker="o", label=k)
    ax2.plot(Ts, [floor_mib(act, T, 2) for T in Ts], "k--", label="floor (bf16 task vectors)")
    ax2.plot(Ts, [floor_mib(act, T, 4) for T in Ts], "k:", label="floor (fp32 task vectors)")
    for ax, title in ((ax1, "step time, ms"), (ax2, "peak memory during the steps, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.set_xlabel("T (task vectors)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    first = results[0][cols[0]]
    fig.suptitle(
        f"layer-wise AdaMerging step, shape {args.shape}, {first['device']}"
        f"{' (' + first['gpu'] + ')' if 'gpu' in first else ''}, {args.rows} rows/task x {args.length} tokens"
    )
    fig.tight_layout()
    path = ROOT / "runs" / f"bench_speed_{args.shape}.png"
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
