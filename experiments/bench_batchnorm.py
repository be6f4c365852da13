#!/usr/bin/env python
"""Question: what does summed_batch_norm (data-parallel BatchNorm) cost against torch's fused kernel? Answer: 1.3–2.5×
per layer forward+backward on 2 CPU cores (64 rows of 96×16×16 or 32×8×8).

Forward+backward time of one BatchNorm layer in training mode: torch's fused kernel (what one process trains with)
against ``adamerge.core.functional.summed_batch_norm`` (what data-parallel BatchNorm training uses), side by side in one
run, on the current device. In one process the sum over ranks is the identity, so this is the function's own cost
without the all-reduces.

    python experiments/bench_batchnorm.py
    python experiments/bench_batchnorm.py --shapes 64,96,16,16 64,32,8,8 --repeats 50
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repo root first

from adamerge.core.functional import summed_batch_norm


def _time(fn, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--shapes", nargs="+", default=["64,96,16,16", "64,32,8,8"], help="input shapes, rows,channels,height,width"
    )
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| input shape | torch batch_norm ms | summed_batch_norm ms | ratio |")
    print("|---|---|---|---|")
    for spec in args.shapes:
        shape = tuple(int(n) for n in spec.split(","))
        x = torch.randn(shape, device=device, requires_grad=True)
        w = torch.randn(shape[1], device=device, requires_grad=True)
        b = torch.randn(shape[1], device=device, requires_grad=True)
        g = torch.randn(shape, device=device)

        def fused():
            y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-3)
            return torch.autograd.grad((y * g).sum(), (x, w, b))

        def summed():
            return torch.autograd.grad((summed_batch_norm(x, w, b, 1e-3, lambda t: t) * g).sum(), (x, w, b))

        a, c = _time(fused, args.repeats, device), _time(summed, args.repeats, device)
        print(f"| {'×'.join(map(str, shape))} | {a * 1e3:.2f} | {c * 1e3:.2f} | {c / a:.2f} |")


if __name__ == "__main__":
    main()
