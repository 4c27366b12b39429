"""Images per second of the synthetic radiology generator (2 cores, 128 px).

    python benchmarks/synthetic_throughput.py --images 3000
"""

from __future__ import annotations

import argparse
import time

from _record import record

from medvqa_lib.data.synthetic import SyntheticConfig, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    config = SyntheticConfig(n_images=args.images, n_labelled=500,
                             image_size=args.image_size)
    start = time.perf_counter()
    data = generate(config)
    seconds = time.perf_counter() - start
    n = config.n_images + config.n_labelled
    print(f"{n} images ({len(data.vqa)} questions, {len(data.captions)} captions) in {seconds:.1f} s"
          f" → {n / seconds:.0f} images/s")
    record("synthetic_throughput", {"images": n, "image_size": args.image_size,
                                    "seconds": round(seconds, 2), "images_per_s": round(n / seconds, 1)})


if __name__ == "__main__":
    main()
