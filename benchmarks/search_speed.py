"""Top-10 search speed over an embedding store: exact (memory-mapped matrices) and approximate (FAISS).

Synthetic unit vectors with the structure real embeddings have: near a low-dimensional subspace
(``--subspace``, 64 of the 1024 dimensions), gathered around cluster centres in it (``--per-cluster``
vectors each), plus small isotropic noise; queries drawn the same way. Near-uniform vectors in 1024
dimensions have no neighbourhood for any index to use and measure nothing real.

The store is written once, through the same writer `shnet encode` uses, into ``--dir`` (default
/tmp/shnet-search-speed-N-D) and reused by later runs with the same settings.

Prints, with the machine's load beside them: exact single-query latency after start-up (the store
opened, one query; then the median of five), exact queries/s in a batch of ``--queries`` (first pass
and the median of five passes more), the index's type, build time and tuned nprobe, its recall@10
against exact search on fresh queries, its queries/s in a batch (the same two) and the ratios to
exact batched, and
last ``ann_recall_at_10=<r>``.

    python benchmarks/search_speed.py                  # 1M x 1024 float16 (6 GiB in /tmp)
    python benchmarks/search_speed.py --n 100000       # a quick run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from shnet.cache.store import image_list_digest
from shnet.retrieval import projection
from shnet.retrieval.index import build_index, load_index, recall_at, reranked_search, rescored
from shnet.retrieval.store import FORMAT, FORMAT_VERSION, EmbeddingStore
from shnet.retrieval.topk import exact_top_k

SHARD_ROWS = 100_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="stored vectors")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--subspace", type=int, default=64, help="dimension of the subspace the vectors lie near")
    parser.add_argument("--per-cluster", type=int, default=100, help="vectors per cluster centre")
    parser.add_argument("--spread", type=float, default=0.7, help="spread around a centre (centre coordinates have unit variance)")
    parser.add_argument("--noise", type=float, default=0.3, help="isotropic noise, as a share of a unit vector's length")
    parser.add_argument("--queries", type=int, default=200, help="fresh queries, timed and scored as one batch")
    parser.add_argument("--tune-queries", type=int, default=500, help="held-out vectors the index is tuned on")
    parser.add_argument("--recall", type=float, default=0.95, help="recall@10 target of the tuning")
    parser.add_argument("--dir", help="where the store lives (default /tmp/shnet-search-speed-N-D; reused when its settings match)")
    return parser.parse_args()


class Vectors:
    """Unit vectors near a random ``subspace``-dimensional subspace, around fixed cluster centres."""

    def __init__(self, dim: int, subspace: int, clusters: int, spread: float, noise: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.spread, self.noise = dim, spread, noise
        self.basis = np.linalg.qr(rng.standard_normal((dim, subspace)))[0].T.astype(np.float32)
        self.centres = rng.standard_normal((clusters, subspace)).astype(np.float32)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        near = self.centres[rng.integers(0, len(self.centres), n)] + self.spread * rng.standard_normal((n, self.basis.shape[0]), dtype=np.float32)
        points = near @ self.basis
        points /= np.linalg.norm(points, axis=1, keepdims=True)
        points += self.noise / np.sqrt(self.dim) * rng.standard_normal((n, self.dim), dtype=np.float32)
        return points / np.linalg.norm(points, axis=1, keepdims=True)


def write_store(root: Path, vectors: Vectors, n: int) -> None:
    store = EmbeddingStore(root)
    ids = [f"v{i:07d}" for i in range(n)]
    shards = (n + SHARD_ROWS - 1) // SHARD_ROWS
    store.save_record(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dimension": vectors.dim,
            "dtype": "float16",
            "images": {"rows": n, "shard_size": SHARD_ROWS, "shards": shards, "image_list_sha256": image_list_digest(ids)},
        }
    )
    rng = np.random.default_rng(1)
    for shard in range(shards):
        rows = ids[shard * SHARD_ROWS : (shard + 1) * SHARD_ROWS]
        block = np.concatenate([vectors.draw(len(rows[i : i + 10_000]), rng).astype(np.float16) for i in range(0, len(rows), 10_000)])
        store.write_shard("images", shard, pa.table({"image_id": rows, "path": [""] * len(rows)}), block, "float16")


def batch_rates(search, queries: int, again: int = 5) -> tuple[object, list[float]]:
    """``search``'s answer and its queries/s on a first pass (rows read from the memory maps for the
    first time: page faults) and the median of ``again`` passes more (every page it reads already
    mapped; one pass of tens of milliseconds on a shared machine is too noisy alone)."""
    rates = []
    for _ in range(1 + again):
        started = time.perf_counter()
        answer = search()
        rates.append(queries / (time.perf_counter() - started))
    return answer, [rates[0], statistics.median(rates[1:])]


def load() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    args = parse_args()
    root = Path(args.dir or f"/tmp/shnet-search-speed-{args.n}-{args.dim}")
    settings = {k: getattr(args, k) for k in ("n", "dim", "subspace", "per_cluster", "spread", "noise")}
    settings["projection_columns"] = projection.COLUMNS  # the store's projected screen: rewritten when it changes
    vectors = Vectors(args.dim, args.subspace, max(1, args.n // args.per_cluster), args.spread, args.noise)
    emb = root / "emb"
    if not (root / "settings.json").exists() or json.loads((root / "settings.json").read_text()) != settings or not EmbeddingStore(emb).exists():
        started = time.perf_counter()
        writer = multiprocessing.get_context("fork").Process(target=write_store, args=(emb, vectors, args.n))
        writer.start()
        writer.join()
        (root / "settings.json").write_text(json.dumps(settings))
        print(f"store written in {time.perf_counter() - started:.0f}s")
    print(f"store: {args.n} x {args.dim} float16 near a {args.subspace}-d subspace, {args.n // args.per_cluster} clusters, in {emb}; {load()}")
    queries = vectors.draw(args.queries, np.random.default_rng(2))
    import torch  # loaded by any `shnet search` before it scores (the text encoder): start-up, not search

    torch.ones(1).bfloat16()
    started = time.perf_counter()
    store = EmbeddingStore(emb)
    matrix = store.matrix("images")
    exact_top_k(queries[:1], matrix, 10)
    first = time.perf_counter() - started
    singles = []
    for i in range(1, 6):
        started = time.perf_counter()
        exact_top_k(queries[i : i + 1], matrix, 10)
        singles.append(time.perf_counter() - started)
    counts = {}
    (_, exact), exact_rates = batch_rates(lambda: exact_top_k(queries, matrix, 10, counts=counts), args.queries)
    print(
        f"exact: first query {first:.2f}s (store opened and checked, one query), then {statistics.median(singles):.2f}s per single query "
        f"(median of 5); {exact_rates[0]:.1f} queries/s in a batch of {args.queries}, {exact_rates[1]:.1f} again (median of 5 passes); {load()}\n"
        f"  screens: {counts['projected']} (query, chunk) pairs projected ({projection.COLUMNS} columns), {counts['full']} in full dimension; "
        f"{counts['rescored'] / args.queries:.0f} rows per query rescored in float64"
    )

    record = build_index(emb, args.recall, args.tune_queries, log=lambda m: print(f"  {m}"))
    print(
        f"index {record['type']}: built (k-means, codebooks, add) in {record['build_seconds']:.0f}s; nprobe {record['nprobe']} of {record['nlist']} "
        f"({record['rerank']} x k candidates, {record['rescore'] or record['rerank']} x k of them scored exactly) for recall@10 >= {args.recall} "
        f"on {record['held_out_queries']} held-out vectors (by nprobe: {', '.join(f'{k}: {v:.3f}' for k, v in record['recall_by_nprobe'].items())}; "
        f"by candidates: {', '.join(f'{k}: {v:.3f}' for k, v in record['recall_by_rerank'].items())}; "
        f"by exactly scored: {', '.join(f'{k}: {v:.3f}' for k, v in record['recall_by_rescore'].items())}); {load()}"
    )
    index, rerank, rescore = load_index(store)
    reranked_search(index, matrix, queries[:10], 10, rerank, rescored(rescore, 10))
    (_, approximate), ann_rates = batch_rates(lambda: reranked_search(index, matrix, queries, 10, rerank, rescored(rescore, 10)), args.queries)
    recall = recall_at(approximate, exact)
    print(
        f"approximate: {ann_rates[0]:.0f} queries/s in a batch of {args.queries} ({ann_rates[0] / exact_rates[0]:.1f}x exact batched), "
        f"{ann_rates[1]:.0f} again ({ann_rates[1] / exact_rates[1]:.1f}x exact's again, medians of 5 passes); "
        f"recall@10 against exact on {args.queries} fresh queries {recall:.3f}; {load()}"
    )
    print(f"ann_recall_at_10={recall:.3f}")


if __name__ == "__main__":
    main()
