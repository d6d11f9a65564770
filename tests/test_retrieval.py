"""shnet encode / search: a model trained briefly on a learnable synthetic set, its embeddings as
Parquet shards, text-to-image and image-to-text search, resume after a kill, the FAISS index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image
from vector_stores import write_vector_store

from shnet.cache import Cache
from shnet.fileio import atomic_write_parquet
from shnet.cli import main
from shnet.errors import ShnetError
from shnet.retrieval.encode import EncodeRequest, encode
from shnet.retrieval.search import search_image
from shnet.retrieval.store import EmbeddingStore
from shnet.retrieval.bfloat16 import bfloat16_bits
from shnet.retrieval.topk import Matrix, exact_top_k, rank
from shnet.trainer.synthetic import write_concept_cache
from shnet.trainer.train import TrainOptions, train

TINY = dict(embed_size=32, word_dim=32, batch_size=32, lr=1e-2, workers=0, progress=False)
VAL_IMAGES = 16

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained for 3 epochs on 32 synthetic images; its cache's images get real files."""
    root = tmp_path_factory.mktemp("retrieval")
    captions = write_concept_cache(root / "cache", {"train": 32, "val": VAL_IMAGES}, feature_dim=16, num_boxes=6, shard_size=20)
    captions.to_csv(root / "captions.csv", index=False)
    _give_images_files(root / "cache", root / "images")
    train(TrainOptions(caches=[str(root / "cache")], captions=str(root / "captions.csv"), output=str(root / "run"), epochs=3, **TINY), log=lambda m: None)
    return root


def _give_images_files(cache_root, folder):
    """Write a small picture per image and record its path (what a real extract records)."""
    cache = Cache(cache_root)
    images = cache.images()
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for image_id in images["image_id"]:
        path = folder / f"{image_id}.png"
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    atomic_write_parquet(cache.root / "images.parquet", images.assign(path=paths))


@pytest.fixture(scope="module")
def store(trained):
    result = CliRunner().invoke(
        main,
        ["encode", str(trained / "run"), "--cache", str(trained / "cache"), "--captions", str(trained / "captions.csv"), "-o", str(trained / "emb"), "--shard-size", "10"],
    )
    assert result.exit_code == 0, result.output
    return trained / "emb"


def test_store_layout_and_record(store, trained):
    images = pd.read_parquet(store / "images")
    assert len(images) == 48 and list(images.columns) == ["image_id", "path", "embedding"]
    assert sorted(p.name for p in (store / "images").iterdir()) == [f"{s:05d}.parquet" for s in range(5)]
    matrix = np.stack(images["embedding"])
    assert matrix.shape == (48, 32) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-4)
    record = json.loads((store / "embeddings.json").read_text())
    assert record["run"]["checkpoint"] == str((trained / "run" / "best.pth").resolve())
    assert len(record["run"]["sha256"]) == 64 and record["run"]["epoch"] is not None
    assert record["caches"] == [str((trained / "cache").resolve())] and record["dimension"] == 32
    assert record["images"]["rows"] == 48 and record["captions"]["rows"] == 240
    captions = pd.read_parquet(store / "captions")
    assert (captions["caption_id"].to_numpy() == np.arange(240)).all() and captions["image_id"].notna().all()


def test_text_to_image_finds_the_right_image_far_above_chance(store, trained):
    val = pd.read_csv(trained / "captions.csv").query("split == 'val'")
    result = CliRunner().invoke(main, ["search", str(store), *val["caption"], "-k", "5", "--json"])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["query"] for a in answers] == list(val["caption"])
    found = [[h["image_id"] for h in a["hits"]] for a in answers]
    r1 = np.mean([hits[0] == i for hits, i in zip(found, val["image_id"])])
    r5 = np.mean([i in hits for hits, i in zip(found, val["image_id"])])
    assert r1 >= 0.15 and r5 >= 0.6, (r1, r5)  # chance over the 48 images: 0.02 and 0.10
    # exact search is what brute force over the stored matrix gives
    first = answers[0]["hits"]
    assert [h["rank"] for h in first] == [1, 2, 3, 4, 5]
    assert all(a["score"] >= b["score"] for a, b in zip(first, first[1:]))
    assert first[0]["path"].endswith(f"{first[0]['image_id']}.png")


def test_exact_search_equals_brute_force(store):
    store_ = EmbeddingStore(store)
    matrix = np.concatenate([c.embeddings for c in store_.chunks("images")])
    queries = np.random.default_rng(1).standard_normal((7, 32)).astype(np.float32)
    scores, rows = exact_top_k(queries, store_.matrix("images"), 6, chunk_rows=3)
    expected = np.argsort(-(queries @ matrix.T), axis=1)[:, :6]
    assert (rows == expected).all()
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ matrix.T, expected, 1), rtol=1e-5)


def test_image_to_text_and_html(store, trained, tmp_path):
    page = tmp_path / "hits.html"
    result = CliRunner().invoke(main, ["search", str(store), "--image", "img00040", "-k", "5", "--json", "--html", str(page)])
    assert result.exit_code == 0, result.output
    [answer] = json.loads(result.stdout)
    assert answer["searched"] == "captions" and len(answer["hits"]) == 5
    assert [h["rank"] for h in answer["hits"]] == [1, 2, 3, 4, 5] and {"caption", "caption_id", "image_id"} <= set(answer["hits"][0])
    own = [search_image(store, f"img{i:05d}", k=5).hits for i in range(32, 48)]  # the val images
    r1 = np.mean([hits[0].fields["image_id"] == f"img{i:05d}" for i, hits in zip(range(32, 48), own)])
    r5 = np.mean([any(h.fields["image_id"] == f"img{i:05d}" for h in hits) for i, hits in zip(range(32, 48), own)])
    assert r1 >= 0.25 and r5 >= 0.6, (r1, r5)  # chance (5 of 240 captions): 0.02 and 0.10
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 1 and "img00040" in html
    text_page = tmp_path / "text.html"
    result = CliRunner().invoke(main, ["search", str(store), "a dog", "-k", "4", "--html", str(text_page)])
    assert result.exit_code == 0, result.output
    assert text_page.read_text().count("data:image/jpeg;base64,") == 4
    assert "default-src 'none'" in text_page.read_text()


def test_index_through_the_cli(store, trained):
    pytest.importorskip("faiss")
    result = CliRunner().invoke(main, ["encode", str(trained / "run"), "--cache", str(trained / "cache"), "-o", str(store), "--shard-size", "10", "--index"])
    assert result.exit_code == 0, result.output
    record = json.loads((store / "index" / "index.json").read_text())
    assert record["vectors"] == 48 and record["caption_recall_at_10"] is not None and "recall@10" in result.stdout
    exact, ann = (json.loads(CliRunner().invoke(main, ["search", str(store), "a dog and a cat", "--json", *flag]).stdout) for flag in ([], ["--ann"]))
    assert ann[0]["method"] == "ann" and len(ann[0]["hits"]) == 10
    if record["nprobe"] == record["nlist"]:  # every list scanned: the same hits as exact search
        assert [h["image_id"] for h in ann[0]["hits"]] == [h["image_id"] for h in exact[0]["hits"]]


def test_reencoding_is_a_no_op_and_other_settings_are_refused(store, trained):
    before = {p: p.stat().st_mtime_ns for p in (store / "images").iterdir()}
    report = encode(EncodeRequest(str(trained / "run"), [str(trained / "cache")], str(store), shard_size=10), log=lambda m: None)
    assert report.encoded == {"images": 0} and before == {p: p.stat().st_mtime_ns for p in (store / "images").iterdir()}
    with pytest.raises(ShnetError, match="float16"):
        encode(EncodeRequest(str(trained / "run"), [str(trained / "cache")], str(store), shard_size=10, dtype="float16"), log=lambda m: None)
    with pytest.raises(ShnetError, match="shard_size"):
        encode(EncodeRequest(str(trained / "run"), [str(trained / "cache")], str(store), shard_size=7), log=lambda m: None)


def test_encode_resumes_after_a_kill(trained, tmp_path):
    write_concept_cache(tmp_path / "big", {"test": 400}, feature_dim=16, num_boxes=6, seed=3)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    command = [sys.executable, "-m", "shnet", "encode", str(trained / "run"), "--cache", str(tmp_path / "big"), "-o", str(killed)]
    options = ["--shard-size", "2", "--batch-size", "2", "--device", "cpu"]
    process = subprocess.Popen(command + options, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "done" / "images").is_dir() or not any((killed / "done" / "images").glob("*.done")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = len(list((killed / "done" / "images").glob("*.done")))  # a shard without its done record is redone
    assert 0 < written < 200, f"{written} shards when killed"

    request = dict(run=str(trained / "run"), caches=[str(tmp_path / "big")], shard_size=2, batch_size=2, device="cpu")
    report = encode(EncodeRequest(output=str(killed), **request), log=lambda m: None)
    assert report.encoded["images"] == 400 - 2 * written
    encode(EncodeRequest(output=str(whole), **request), log=lambda m: None)
    resumed, uninterrupted = pd.read_parquet(killed / "images"), pd.read_parquet(whole / "images")
    assert list(resumed["image_id"]) == list(uninterrupted["image_id"]) == [f"img{i:05d}" for i in range(400)]
    np.testing.assert_allclose(np.stack(resumed["embedding"]), np.stack(uninterrupted["embedding"]), atol=1e-6)
    assert not list(killed.rglob("*.tmp-*"))


def structured_unit_vectors(n: int, dim: int, clusters: int, rng: np.random.Generator, subspace: int = 16) -> np.ndarray:
    """As real embeddings are, and as benchmarks/search_speed.py draws them at scale: near a
    low-dimensional subspace, gathered in clusters, a little isotropic noise, unit length."""
    basis = np.linalg.qr(rng.standard_normal((dim, subspace)))[0].T.astype(np.float32)
    centres = rng.standard_normal((clusters, subspace)).astype(np.float32)
    points = (centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, subspace)).astype(np.float32)) @ basis
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    points += 0.3 / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_ann_recall_at_10_vs_exact_on_structured_vectors(tmp_path):
    n = 50_000
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(1)
    from shnet.retrieval.index import ann_top_k, build_index, recall_at

    rng = np.random.default_rng(0)
    vectors = structured_unit_vectors(n + 500, 128, 500, rng)
    store = write_vector_store(tmp_path / "emb", vectors[:n], shard_size=8192)
    record = build_index(store.root, target_recall=0.95, queries=500, log=lambda m: None)
    assert record["recall_at_10"] >= 0.95 and record["nprobe"] < record["nlist"] and ",IVF" in record["type"]
    fresh = vectors[n:]  # queries the tuning never saw
    exact_scores, exact = exact_top_k(fresh, store.matrix("images"), 10)
    scores, approximate = ann_top_k(store, fresh, 10)
    assert recall_at(approximate, exact) >= 0.95
    same = approximate == exact  # a hit the index finds carries its exact score
    assert (scores[same] == exact_scores[same]).all()
    faiss.omp_set_num_threads(2)  # the batch in two pieces, each searched and re-ranked in its own thread
    try:
        pieced_scores, pieced = ann_top_k(store, fresh, 10)
    finally:
        faiss.omp_set_num_threads(1)
    assert (pieced == approximate).all() and (pieced_scores == scores).all()


def test_encode_takes_the_captions_a_cache_holds(trained, tmp_path):
    from shnet.cache.captions import write_cache_captions

    captions = write_concept_cache(tmp_path / "held", {"test": 12}, feature_dim=16, num_boxes=6, seed=5)
    write_cache_captions(Cache(tmp_path / "held"), captions)
    report = encode(EncodeRequest(str(trained / "run"), [str(tmp_path / "held")], str(tmp_path / "emb"), shard_size=10), log=lambda m: None)
    assert report.totals == {"images": 12, "captions": len(captions)} and len(captions) == 60
    stored = pd.read_parquet(tmp_path / "emb" / "captions")
    assert list(stored["caption"]) == list(captions["caption"])


def test_a_run_is_refused_on_layout_arrays_of_another_class_order(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "cache", tmp_path / "cache")
    cache = Cache(tmp_path / "cache")
    cache.record["stages"]["layout"]["config"]["class_order"] = "upsnet"
    cache.save_record()
    with pytest.raises(ShnetError, match="trained on layout arrays in class order 'coco'.*layout.class_order=coco"):
        encode(EncodeRequest(str(trained / "run"), [str(tmp_path / "cache")], str(tmp_path / "emb")), log=lambda m: None)
    result = CliRunner().invoke(main, ["evaluate", str(trained / "run"), "--cache", str(tmp_path / "cache"), "--split", "val"])
    assert result.exit_code == 1 and "class order 'coco'" in result.output


# --- the store's matrices, exact top-k, the import graph ------------------------------------------------


def test_each_shard_has_its_matrix_and_search_reads_it(store):
    store_ = EmbeddingStore(store)
    frame = pd.read_parquet(store / "images")
    for shard in range(5):
        npy = store / "matrices" / "images" / f"{shard:05d}.npy"
        matrix = np.load(npy, allow_pickle=False)
        assert matrix.dtype == np.dtype("<f4") and matrix.shape == (10 if shard < 4 else 8, 32)
        np.testing.assert_array_equal(matrix, np.stack(frame["embedding"].iloc[shard * 10 : shard * 10 + len(matrix)]))
        done = json.loads((store / "done" / "images" / f"{shard:05d}.done").read_text())
        assert set(done["files"]) == {
            f"matrices/images/{shard:05d}.npy", f"screens/images/{shard:05d}.npy", f"projections/images/{shard:05d}.npy", f"images/{shard:05d}.parquet", "bases/images.npy"
        }
        assert done["rows"] == len(matrix)
        screen = np.load(store / "screens" / "images" / f"{shard:05d}.npy")
        assert screen.dtype == np.dtype("<u2") and (screen == bfloat16_bits(matrix)).all()
    matrix = store_.matrix("images")
    assert all(isinstance(block, np.memmap) for block in matrix.blocks + matrix.screens + [p.columns for p in matrix.projected])
    assert store_.matrix("captions").rows == 240


def test_a_damaged_matrix_is_named_by_search_and_redone_by_encode(store, trained, tmp_path):
    import shutil

    emb = tmp_path / "emb"
    shutil.copytree(store, emb)
    npy = emb / "matrices" / "images" / "00002.npy"
    npy.write_bytes(npy.read_bytes()[:-7])
    result = CliRunner().invoke(main, ["search", str(emb), "a dog"])
    assert result.exit_code == 1 and str(npy) in result.output and "re-run the same `shnet encode`" in result.output
    header = bytearray((emb / "matrices" / "images" / "00003.npy").read_bytes())
    (emb / "matrices" / "images" / "00003.npy").write_bytes(bytes(header).replace(b"<f4", b"<i4"))  # same size, other dtype
    assert EmbeddingStore(emb).shard_problem("images", 3).endswith("re-run the same `shnet encode` command to redo it")
    report = encode(EncodeRequest(str(trained / "run"), [str(trained / "cache")], str(emb), str(trained / "captions.csv"), shard_size=10), log=lambda m: None)
    assert report.encoded == {"images": 20, "captions": 0}
    np.testing.assert_array_equal(np.load(npy), np.load(store / "matrices" / "images" / "00002.npy"))


def test_a_store_of_the_old_format_is_refused_with_the_re_encode_command(store, trained, tmp_path):
    import shutil

    emb = tmp_path / "old"
    shutil.copytree(store, emb)
    record = json.loads((emb / "embeddings.json").read_text())
    (emb / "embeddings.json").write_text(json.dumps({**record, "format_version": 1}))
    result = CliRunner().invoke(main, ["search", str(emb), "a dog"])
    assert result.exit_code == 1 and "older shnet (format 1" in result.output and "re-encode it: `shnet encode RUN" in result.output
    with pytest.raises(ShnetError, match="re-encode it"):
        encode(EncodeRequest(str(trained / "run"), [str(trained / "cache")], str(emb), shard_size=10), log=lambda m: None)


def _tied_matrix(rng) -> np.ndarray:
    """fp16 rows with many exact duplicates (ties at every rank) around a few directions."""
    base = rng.standard_normal((40, 24)).astype(np.float32)
    rows = base[rng.integers(0, 40, 300)] + 0.2 * rng.standard_normal((300, 24)).astype(np.float32)
    rows[::3] = rows[1::3][: len(rows[::3])]
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)


def _reference(queries, matrix, k, exclude=()):
    """Full sort in float64: score descending, ties to the lower row."""
    scores = queries.astype(np.float64) @ matrix.astype(np.float64).T
    out = []
    for query in scores:
        rows = [r for r in np.lexsort((np.arange(len(query)), -query)) if r not in set(exclude)][:k]
        out.append(rows)
    return np.array(out)


def test_exact_top_k_is_the_full_sort_whatever_the_chunks_and_the_batch():
    rng = np.random.default_rng(3)
    matrix = _tied_matrix(rng)
    queries = np.concatenate([matrix[:5].astype(np.float32), rng.standard_normal((6, 24)).astype(np.float32)])
    blocks = Matrix([matrix[:130], matrix[130:131], matrix[131:]])
    scores, rows = exact_top_k(queries, blocks, 12, chunk_rows=len(matrix))
    assert (rows == _reference(queries, matrix, 12)).all()
    for chunk_rows in (1, 7, 64):
        other_scores, other_rows = exact_top_k(queries, blocks, 12, chunk_rows=chunk_rows)
        assert (other_rows == rows).all() and (other_scores == scores).all()
    for i in range(len(queries)):  # one query alone: the same bits as in the batch
        alone_scores, alone_rows = exact_top_k(queries[i : i + 1], blocks, 12, chunk_rows=5)
        assert (alone_rows[0] == rows[i]).all() and (alone_scores[0] == scores[i]).all()
    excluded = np.array([0, 1, 2, 150, 299])
    _, kept = exact_top_k(queries, blocks, 12, exclude=excluded, chunk_rows=9)
    assert (kept == _reference(queries, matrix, 12, excluded)).all()
    _, everything = exact_top_k(queries[:2], Matrix([matrix[:4]]), 10)
    assert everything.shape == (2, 4)


def test_rank_matches_a_full_sort_with_ties_to_the_lower_row():
    rng = np.random.default_rng(0)
    query = rng.integers(0, 4, 500)
    scores = rng.integers(0, 6, 500).astype(np.float64)  # many ties
    rows = rng.permutation(500)
    top_scores, top_rows = rank(query, scores, rows, 4, 7)
    for q in range(4):
        mine = np.flatnonzero(query == q)
        order = sorted(mine, key=lambda i: (-scores[i], rows[i]))[:7]
        assert list(top_rows[q]) == [rows[i] for i in order] and list(top_scores[q]) == [scores[i] for i in order]


def test_the_retrieval_modules_import_no_circle():
    """Every import between shnet/retrieval modules, lazy ones included: the graph has no cycle."""
    import ast
    from pathlib import Path

    import shnet.retrieval

    folder = Path(shnet.retrieval.__file__).parent
    graph = {
        path.stem: {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
        for path in folder.glob("*.py")
    }
    assert "search" not in graph["index"] and not graph["topk"] & {"index", "search"}

    def visit(module, path):
        assert module not in path, " -> ".join([*path, module])
        for imported in graph.get(module, ()):
            visit(imported, [*path, module])

    for module in graph:
        visit(module, [])


def test_a_text_query_builds_no_image_encoder(store, monkeypatch):
    from shnet.retrieval.encode import encode_texts
    from shnet.retrieval.query import encode_queries, load_text_side
    from shnet.retrieval.search import search_text
    from shnet.trainer.checkpoint import load_model
    from shnet.trainer.image_encoder import ImageEncoder

    record = EmbeddingStore(store).record()
    import torch

    texts = ["a dog and a cat", "a red square"]
    whole = encode_texts(load_model(record["run"]["checkpoint"]), texts, 256, torch.device("cpu"))

    def refuse(*args, **kwargs):
        raise AssertionError("a text query built the image encoder")

    monkeypatch.setattr(ImageEncoder, "__init__", refuse)
    side = load_text_side(record, torch.device("cpu"))
    np.testing.assert_array_equal(encode_queries(side, texts, torch.device("cpu")), whole)
    [result] = search_text(store, texts[:1], k=3, device="cpu")
    assert len(result.hits) == 3
