"""Training samples/s and inference answers/s of each method's fine-tuning model at a profile.

For MISS, M2I2, CMDPI and PaliGemma-LoRA, builds the model its chapter fine-tunes at the
profile's sizes and times a few optimizer steps on one batch of synthetic questions (autocast
as the Trainer does it: bf16 on CUDA) and answering questions as the chapter does. On a GPU it
also counts the FLOPs of one training step and prints the model FLOPs utilisation (MFU) against
the GPU's peak dense bf16 rate. The measurement is
:func:`medvqa_lib.papers.comparison.throughput.method_throughput`, which the comparison chapter also runs.

    python benchmarks/method_throughput.py --profile smoke
    python benchmarks/method_throughput.py --profile cpu --steps 5
    python benchmarks/method_throughput.py --profile gpu        # on a CUDA machine

Writes ``benchmarks/results/method_throughput_<profile>.csv`` (one row per method, appended
with date, machine and versions).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

from medvqa_lib.papers.comparison.config import METHODS  # noqa: E402
from medvqa_lib.papers.comparison.throughput import method_throughput  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="smoke", choices=("smoke", "cpu", "gpu"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=None, help="questions per step (default: profile's)")
    parser.add_argument("--answers", type=int, default=64, help="questions answered for answers/s")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--flops", action="store_true", help="count FLOPs on the CPU too (always on CUDA)")
    args = parser.parse_args(argv)
    failed = 0
    for method in args.methods:
        try:
            r = method_throughput(method, args.profile, steps=args.steps, batch_size=args.batch_size,
                                  answers=args.answers, device=args.device, count_flops=True if args.flops else None)
        except Exception as exc:  # noqa: BLE001 - one method failing (e.g. a gated Hub model) is reported
            print(f"{method:<15} FAILED: {type(exc).__name__}: {exc}")
            failed += 1
            continue
        mfu = f" · {r.train_tflops:.2f} TFLOP/s" if r.train_tflops else ""
        mfu += f" · MFU {100 * r.mfu:.1f} %" if r.mfu else ""
        mem = f" · peak {r.peak_memory_mb:,.0f} MB" if r.peak_memory_mb else ""
        print(f"{method:<15} {r.device} {r.precision}: {r.train_samples_per_s:8.1f} samples/s (batch "
              f"{r.batch_size}) · {r.answers_per_s:8.1f} answers/s · {r.n_params / 1e6:.1f} M params "
              f"({r.n_trainable / 1e6:.1f} M trainable){mem}{mfu}")
        path = record(f"method_throughput_{args.profile}", asdict(r))
    if failed < len(args.methods):
        print(f"→ {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
