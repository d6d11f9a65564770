"""Speed of a full COCO-5K-sized evaluation, from embeddings to every metric of both protocols.

5,000 image and 25,000 caption embeddings (1024-d, l2-normalised, each caption near its image) ->
the similarity matrix -> COCO 1K (5 folds and their mean) and COCO 5K: R@1/5/10 both ways, medr,
meanr, rSum. Prints the stages' times and peak memory; the last line is ``eval_seconds=<s>``.

    python benchmarks/eval_speed.py
    python benchmarks/eval_speed.py --images 1000 --protocol f30k
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from shnet.trainer.evaluate import format_table, similarity_matrix
from shnet.trainer.gpo import l2norm
from shnet.trainer.metrics import CAPTIONS_PER_IMAGE, protocol_metrics


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--protocol", default="auto", choices=("auto", "coco", "f30k", "full"))
    parser.add_argument(
        "--noise", type=float, default=9.0, help="caption = its image + noise * N(0, 1/dim); 9 gives a COCO-1K rSum near the paper's"
    )
    return parser.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    args = parse_args()
    generator = torch.Generator().manual_seed(0)
    images = l2norm(torch.randn(args.images, args.dim, generator=generator))
    noise = torch.randn(CAPTIONS_PER_IMAGE * args.images, args.dim, generator=generator) * args.noise / args.dim**0.5
    texts = l2norm(images.repeat_interleave(CAPTIONS_PER_IMAGE, dim=0) + noise)
    before = peak_rss_mib()
    print(f"{args.images} images x {len(texts)} captions, {args.dim}-d; {torch.get_num_threads()} torch threads")

    started = time.perf_counter()
    sims = similarity_matrix(images, texts)
    scored = time.perf_counter()
    results = protocol_metrics(sims, args.protocol)
    finished = time.perf_counter()

    print(format_table(results))
    print(f"similarity matrix: {scored - started:.2f}s ({sims.nbytes / 2**20:.0f} MiB float32)")
    print(f"ranks and metrics of {len(results)} results: {finished - scored:.2f}s")
    print(f"peak memory: {peak_rss_mib():.0f} MiB resident ({before:.0f} MiB before the evaluation, embeddings included)")
    print(f"eval_seconds={finished - started:.2f}")


if __name__ == "__main__":
    main()
