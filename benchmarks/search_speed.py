"""Top-10 search speed over an embedding store: exact (streamed, chunked) and approximate (FAISS).

Synthetic 1024-d unit vectors stored as float16 Parquet shards, the layout `shnet encode` writes:
points scattered around random centres (as image embeddings gather around what they show), and
queries drawn the same way (text queries land near the images they describe). Pure isotropic
noise would have no neighbourhood structure for any index to use; `--per-cluster 0` measures that.

Prints: the store's size, exact queries/s (one at a time and in a batch) and the peak memory of
exact search, the index build and tuning times, approximate queries/s, the peak memory with the
index, and, last, ``ann_recall_at_10=<r>``: the index's recall@10 against exact search on fresh
queries (not the ones it was tuned on).

    python benchmarks/search_speed.py                       # 1M x 1024 (2 GB of float16)
    python benchmarks/search_speed.py --vectors 100000      # a quick run
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from shnet.cache.store import image_list_digest
from shnet.retrieval.index import ann_top_k, build_index, load_index, recall_at
from shnet.retrieval.search import CHUNK_ROWS, exact_top_k
from shnet.retrieval.store import EmbeddingStore, embedding_column

SHARD_ROWS = 100_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--per-cluster", type=int, default=100, help="vectors per random centre (0: isotropic noise, no centres)")
    parser.add_argument("--spread", type=float, default=1.5, help="noise per dimension around a centre (whose coordinates have unit variance)")
    parser.add_argument("--queries", type=int, default=200, help="fresh queries timed and scored")
    parser.add_argument("--tune-queries", type=int, default=500, help="held-out vectors the index is tuned on")
    parser.add_argument("--recall", type=float, default=0.95, help="recall@10 target of the tuning")
    parser.add_argument("--dir", help="where to write the store (default: a temporary folder, removed at the end)")
    return parser.parse_args()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Vectors:
    """Unit vectors around fixed random centres, generated chunk by chunk (never all in memory)."""

    def __init__(self, dim: int, clusters: int, spread: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.spread = dim, spread
        self.centres = rng.standard_normal((clusters, dim)).astype(np.float32) if clusters else None

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        noise = rng.standard_normal((n, self.dim), dtype=np.float32)
        points = noise if self.centres is None else self.centres[rng.integers(0, len(self.centres), n)] + self.spread * noise
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def write_store(root: Path, vectors: Vectors, n: int) -> None:
    store = EmbeddingStore(root)
    ids = [f"v{i:07d}" for i in range(n)]
    shards = (n + SHARD_ROWS - 1) // SHARD_ROWS
    store.save_record(
        {
            "format": "shnet-embeddings",
            "format_version": 1,
            "dimension": vectors.dim,
            "dtype": "float16",
            "images": {"rows": n, "shard_size": SHARD_ROWS, "shards": shards, "image_list_sha256": image_list_digest(ids)},
        }
    )
    rng = np.random.default_rng(1)
    for shard in range(shards):
        rows = ids[shard * SHARD_ROWS : (shard + 1) * SHARD_ROWS]
        block = np.concatenate([vectors.draw(len(rows[i : i + 10_000]), rng).astype(np.float16) for i in range(0, len(rows), 10_000)])
        store.write_shard("images", shard, pa.table({"image_id": rows, "path": [""] * len(rows), "embedding": embedding_column(block, "float16")}))


def main() -> None:
    args = parse_args()
    device = torch.device("cpu")
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="shnet-search-speed-"))
    try:
        clusters = args.vectors // args.per_cluster if args.per_cluster else 0
        vectors = Vectors(args.dim, clusters, args.spread)
        started = time.perf_counter()
        writer = multiprocessing.get_context("fork").Process(target=write_store, args=(root / "emb", vectors, args.vectors))
        writer.start()  # in a child process, so that the peak memory below is the search's alone
        writer.join()
        store = EmbeddingStore(root / "emb")
        size = sum(p.stat().st_size for p in (root / "emb" / "images").iterdir())
        print(
            f"store: {args.vectors} x {args.dim} float16 ({size / 2**30:.2f} GiB of Parquet) around {clusters or 'no'} centres, "
            f"written in {time.perf_counter() - started:.0f}s; {torch.get_num_threads()} torch threads"
        )
        queries = vectors.draw(args.queries, np.random.default_rng(2))
        rss_before = peak_rss_mib()

        started = time.perf_counter()
        single = [exact_top_k(queries[i : i + 1], store.chunks("images", CHUNK_ROWS), 10, device) for i in range(3)]
        single_seconds = (time.perf_counter() - started) / len(single)
        started = time.perf_counter()
        _, exact = exact_top_k(queries, store.chunks("images", CHUNK_ROWS), 10, device)
        batch_seconds = time.perf_counter() - started
        print(
            f"exact: {1 / single_seconds:.2f} queries/s one at a time ({single_seconds:.2f}s each), "
            f"{args.queries / batch_seconds:.1f} queries/s in a batch of {args.queries}; "
            f"peak memory {peak_rss_mib():.0f} MiB ({rss_before:.0f} before searching; chunks of {CHUNK_ROWS} rows)"
        )

        record = build_index(store.root, args.recall, args.tune_queries, device=device, log=lambda m: print(f"  {m}"))
        print(
            f"index {record['type']}: built (k-means + add) in {record['build_seconds']:.0f}s; nprobe {record['nprobe']} of {record['nlist']} "
            f"for recall@10 >= {args.recall} on {record['held_out_queries']} held-out vectors (measured {record['recall_at_10']:.3f}; "
            f"by nprobe: {', '.join(f'{k}: {v:.3f}' for k, v in record['recall_by_nprobe'].items())})"
        )
        index = load_index(store)
        started = time.perf_counter()
        for i in range(args.queries):
            index.search(queries[i : i + 1], 10)
        ann_single = (time.perf_counter() - started) / args.queries
        started = time.perf_counter()
        index.search(queries, 10)
        ann_batch = time.perf_counter() - started
        del index
        _, approximate = ann_top_k(store, queries, 10)  # as `shnet search --ann` does: the index read from disk
        recall = recall_at(approximate, exact)
        print(
            f"approximate: {1 / ann_single:.0f} queries/s one at a time, {args.queries / ann_batch:.0f} queries/s in a batch; "
            f"{single_seconds / ann_single:.0f}x the exact single-query rate; "
            f"peak memory {peak_rss_mib():.0f} MiB"
        )
        print(f"recall@10 of the index against exact search on {args.queries} fresh queries: {recall:.3f}")
        print(f"ann_recall_at_10={recall:.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
