"""How accuracy grows with fine-tuning epochs: MISS (cpu preset) on one real dataset.

The `cpu` profile of the MISS chapter fine-tunes for a few epochs only. This script fine-tunes
the same model (no pre-training) for more epochs, selects the epoch on validation accuracy,
answers the test split once, and compares with the question-type prior (paired bootstrap).

    python benchmarks/miss_epochs.py --data ../shared/data --dataset vqa-rad --epochs 15
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

from medvqa_lib.config import get_profile  # noqa: E402
from medvqa_lib.data.registry import load_vqa  # noqa: E402
from medvqa_lib.evaluation import QuestionOnlyPrior, score_predictions, summarize  # noqa: E402
from medvqa_lib.experiments.images import ImageCache  # noqa: E402
from medvqa_lib.experiments.runs import finetune_and_test  # noqa: E402
from medvqa_lib.experiments.tables import compare_to_prior  # noqa: E402
from medvqa_lib.papers.miss.config import study_plan  # noqa: E402
from medvqa_lib.papers.miss.pipeline import finetune_factory  # noqa: E402
from medvqa_lib.text import select_text_backbone  # noqa: E402
from medvqa_lib.training import keep_freed_memory  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", default="vqa-rad")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/miss_epochs")
    args = ap.parse_args()
    keep_freed_memory()
    torch.set_num_threads(2)
    transformers.logging.set_verbosity_error()
    study = study_plan(get_profile("cpu"), args.out, finetune={"lr": args.lr} if args.lr else {},
                       finetune_epochs={args.dataset: args.epochs})
    splits = {s: load_vqa(args.dataset, s, root=args.data) for s in ("train", "val", "test")}
    backbone = select_text_backbone(study.model.text_backbone, verbose=False)
    t0 = time.perf_counter()
    rec = finetune_and_test("MISS", finetune_factory(study.model, None, backbone), {args.dataset: splits},
                            [args.seed], backbone.tokenizer, study.finetune_settings(args.dataset),
                            args.out, ImageCache(study.model.image_size))[0]
    wall = time.perf_counter() - t0
    prior = QuestionOnlyPrior().fit(splits["train"])
    prior_scored = score_predictions(splits["test"], prior.predict(splits["test"]))
    vs = compare_to_prior({args.dataset: rec.scored}, {args.dataset: prior_scored})
    for h in rec.train.history:
        print(f"epoch {h['epoch']:>2}: val closed {h['val_closed']:.1f} · open {h['val_open']:.1f}")
    s = summarize(rec.scored).iloc[0]
    print(f"test (best epoch {rec.train.best_epoch}): closed {s['closed_acc']:.1f} · open {s['open_acc']:.1f}")
    print(vs.to_string())
    record("miss_epochs", {
        "dataset": args.dataset, "epochs": args.epochs, "lr": study.finetune.lr, "seed": args.seed,
        "best_epoch": rec.train.best_epoch, "test_closed": round(float(s["closed_acc"]), 1),
        "test_open": round(float(s["open_acc"]), 1),
        "closed_minus_prior": float(vs.loc[(args.dataset, "closed"), "MISS − prior (pp)"]),
        "closed_ci": vs.loc[(args.dataset, "closed"), "95% CI"],
        "open_minus_prior": float(vs.loc[(args.dataset, "open"), "MISS − prior (pp)"]),
        "open_ci": vs.loc[(args.dataset, "open"), "95% CI"],
        "samples_per_s": round(rec.train.samples_per_s, 1), "wall_s": round(wall),
    })


if __name__ == "__main__":
    main()
