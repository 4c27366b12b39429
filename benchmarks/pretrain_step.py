"""Samples/s of one MISS pre-training step on the CPU (target: >= 8 samples/s on 2 cores).

The step is the full one the book runs: ITC with momentum encoders and queues, ITM with hard
negatives, the decoder's masked-token loss, backward, AdamW. Sizes: 128 px images, a 384-d
6-layer ViT (patch 16), the 6-layer MiniLM text stack with cross-attention in every layer and
its weight-shared decoder, batch 16, captions of 10-30 tokens padded to 30 (``--full-length``:
all 30 tokens). ``--precision``: autocast as the Trainer does it (default ``auto``: bf16
on a CPU with native bf16 instructions; weights and AdamW stay fp32).

glibc is asked to keep freed memory (``--default-malloc`` turns this off): otherwise every
step page-faults its large tensors in afresh, which costs 5-20 % here. The CSV row also holds
the GEMM speed measured next to the run, since this shared machine's speed varies over time.

    python benchmarks/pretrain_step.py            # prints samples/s, appends to the CSV
    python benchmarks/pretrain_step.py --profile  # also prints the slowest operators
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

from medvqa_lib.papers.miss.model import MISSConfig, build_miss  # noqa: E402
from medvqa_lib.training import autocast_context, keep_freed_memory, resolve_precision  # noqa: E402

QUIET_CORES = 0.15


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), Linux only."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _foreign_cores(t0: float, start: tuple[float, float] | None) -> float | None:
    """Cores that other processes kept busy since ``t0`` (None where unknown)."""
    end = _cpu_seconds()
    if start is None or end is None:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / (time.perf_counter() - t0)


def gemm_gflops(reps: int = 20) -> float:
    """Median GFLOP/s of a (1440 x 384) @ (384 x 1536) fp32 product, the step's typical GEMM."""
    a, b = torch.randn(1440, 384), torch.randn(384, 1536)
    times = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 1440 * 384 * 1536 / sorted(times[3:])[reps // 2] / 1e9


def make_batch(model, batch_size: int, seq_len: int, image_size: int, seed: int = 0,
               full_length: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = model.ids
    lengths = torch.randint(10, seq_len + 1, (batch_size,), generator=g)
    if full_length:
        lengths.fill_(seq_len)
    input_ids = torch.randint(1000, ids.vocab_size, (batch_size, seq_len), generator=g)
    mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
    input_ids[:, 0] = ids.cls
    input_ids[torch.arange(batch_size), lengths - 1] = ids.sep
    input_ids = input_ids.masked_fill(mask == 0, ids.pad)
    return {"images": torch.randn(batch_size, 3, image_size, image_size, generator=g),
            "input_ids": input_ids, "attention_mask": mask,
            "image_ids": torch.arange(batch_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=30)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timing blocks at most; stops at the first one without foreign CPU load")
    ap.add_argument("--objective", choices=("mlm", "lm"), default="mlm")
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                    help="autocast dtype as the Trainer picks it ('auto': bf16 where the CPU has "
                         "native bf16 instructions, else fp32)")
    ap.add_argument("--full-length", action="store_true", help="captions of seq-len tokens, no padding")
    ap.add_argument("--default-malloc", action="store_true", help="leave glibc malloc as it is")
    ap.add_argument("--profile", action="store_true", help="print the slowest operators")
    ap.add_argument("--no-record", action="store_true", help="do not write the CSV")
    args = ap.parse_args()

    malloc_tuned = not args.default_malloc and keep_freed_memory()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = MISSConfig.from_profile("cpu", image_size=128, vision_depth=6, text_backbone="minilm",
                                     decoder_objective=args.objective)
    model = build_miss(config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5,
                            weight_decay=0.05, fused=True)
    batches = [make_batch(model, args.batch_size, args.seq_len, config.image_size, seed=i,
                          full_length=args.full_length) for i in range(4)]

    dtype = resolve_precision(torch.device("cpu"), args.precision)

    def step(i: int) -> float:
        with autocast_context(torch.device("cpu"), args.precision):
            out = model(batches[i % len(batches)])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        return out["loss"].item()

    for i in range(args.warmup):
        step(i)
    gflops = gemm_gflops()
    blocks = []
    for _ in range(args.repeats):  # repeat when other processes took CPU time during the block
        t0, busy0 = time.perf_counter(), _cpu_seconds()
        times = []
        for i in range(args.steps):
            t = time.perf_counter()
            step(i)
            times.append(time.perf_counter() - t)
        blocks.append((times, _foreign_cores(t0, busy0)))
        if blocks[-1][1] is not None and blocks[-1][1] < QUIET_CORES:
            break
    times, foreign = min(blocks, key=lambda b: (b[1] or 0.0, sum(b[0])))
    median = sorted(times)[len(times) // 2]
    sps = args.batch_size * len(times) / sum(times)
    for i, (ts, fc) in enumerate(blocks):
        print(f"block {i}: {args.batch_size * len(ts) / sum(ts):.2f} samples/s, other processes used "
              f"{'?' if fc is None else f'{fc:.2f}'} cores")
    gflops = (gflops + gemm_gflops()) / 2
    print(f"MISS pre-training step: {sps:.2f} samples/s (mean {sum(times) / len(times) * 1e3:.0f} ms, "
          f"median {median * 1e3:.0f} ms per step of {args.batch_size}; {args.threads} threads; "
          f"{str(dtype).removeprefix('torch.')}; "
          f"GEMM reference {gflops:.0f} GFLOP/s; malloc tuned: {malloc_tuned})")
    if foreign is not None and foreign >= QUIET_CORES:
        print(f"warning: other processes used {foreign:.2f} cores during the measurement; repeat it")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(3):
                step(i)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))

    if not args.no_record:
        path = record("pretrain_step", {
            "samples_per_s": round(sps, 3), "median_step_ms": round(median * 1e3, 1),
            "batch_size": args.batch_size, "seq_len": args.seq_len, "image_size": config.image_size,
            "threads": args.threads, "objective": args.objective, "steps": len(times),
            "precision": str(dtype).removeprefix("torch."),
            "full_length": args.full_length, "malloc_tuned": malloc_tuned,
            "gemm_gflops": round(gflops, 1),
            "foreign_cores": None if foreign is None else round(foreign, 2),
        })
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
