"""Wall time of the whole book: papermill execution of every chapter plus the HTML build.

    python benchmarks/book_walltime.py --profile smoke
    python benchmarks/book_walltime.py --profile cpu --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time

from _record import record

from medvqa_lib.reproduce import REPO_ROOT, reproduce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--data", default="synthetic")
    args = parser.parse_args()
    start = time.perf_counter()
    status = reproduce(args.profile, args.data)
    seconds = time.perf_counter() - start
    report = json.loads((REPO_ROOT / "_build" / "reproduce_report.json").read_text())
    per_chapter = {r["notebook"]: round(r["seconds"], 1) for r in report["runs"]}
    print(f"\nwhole book, profile {args.profile}: {seconds / 60:.1f} min (exit {status})")
    record("book_walltime", {"profile": args.profile, "data": args.data, "seconds": round(seconds, 1),
                             "exit": status, "chapters": json.dumps(per_chapter)})


if __name__ == "__main__":
    main()
