"""`shnet evaluate` on trained run directories, checkpoints, ensembles and saved similarity matrices."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from shnet.errors import ShnetError
from shnet.trainer.cli import evaluate_command
from shnet.trainer.synthetic import write_concept_cache
from shnet.trainer.train import TrainOptions, train

TEST_IMAGES = 16
TINY = dict(embed_size=32, word_dim=32, batch_size=32, lr=1e-2, epochs=1, workers=0, progress=False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch runs (seeds 0 and 1) on one cache, and a second dataset in Karpathy format."""
    root = tmp_path_factory.mktemp("evaluate")
    captions = write_concept_cache(root / "cache", {"train": 32, "val": 8, "test": TEST_IMAGES}, feature_dim=16, num_boxes=6, shard_size=20)
    captions.to_csv(root / "captions.csv", index=False)
    for seed in (0, 1):
        options = TrainOptions(caches=[str(root / "cache")], captions=str(root / "captions.csv"), output=str(root / f"run{seed}"), seed=seed, **TINY)
        train(options, log=lambda message: None)

    other = write_concept_cache(root / "other", {"test": 12}, feature_dim=16, num_boxes=6, seed=7)
    images = [
        {"filename": f"{image_id}.jpg", "split": "test", "sentences": [{"raw": c, "tokens": c.split()} for c in group["caption"]]}
        for image_id, group in other.groupby("image_id", sort=True)
    ]
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return root


def evaluate(*args) -> str:
    result = CliRunner().invoke(evaluate_command, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_table_and_json_of_a_run(runs):
    table = evaluate(runs / "run0", "--workers", "0")
    assert "full" in table and "rSum" in table and "i2t R@1" in table
    results = json.loads(evaluate(runs / "run0", "--json", "--workers", "0"))
    assert list(results) == ["full"]
    assert set(results["full"]) == {"i2t", "t2i", "rsum"}
    assert set(results["full"]["i2t"]) == set(results["full"]["t2i"]) == {"r1", "r5", "r10", "medr", "meanr"}
    recalls = [results["full"][d][f"r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert results["full"]["rsum"] == pytest.approx(sum(recalls))


def test_saved_sims_give_the_same_metrics(runs, tmp_path):
    direct = json.loads(evaluate(runs / "run0", "--json", "--save-sims", tmp_path / "a.npy"))
    sims = np.load(tmp_path / "a.npy")
    assert sims.shape == (TEST_IMAGES, 5 * TEST_IMAGES) and sims.dtype == np.float32
    assert json.loads(evaluate("--sims", tmp_path / "a.npy", "--json")) == direct


def test_ensemble_is_the_mean_of_the_runs_similarities(runs, tmp_path):
    evaluate(runs / "run0", "--save-sims", tmp_path / "a.npy", "--workers", "0")
    evaluate(runs / "run1" / "last.pth", "--save-sims", tmp_path / "b.npy", "--workers", "0")
    ensemble = json.loads(evaluate("--ensemble", runs / "run0", runs / "run1", "--json", "--save-sims", tmp_path / "ab.npy"))
    mean = (np.load(tmp_path / "a.npy").astype(np.float64) + np.load(tmp_path / "b.npy")) / 2
    assert np.array_equal(np.load(tmp_path / "ab.npy"), mean.astype(np.float32))
    assert ensemble == json.loads(evaluate("--sims", tmp_path / "a.npy", tmp_path / "b.npy", "--json"))


def test_evaluating_the_val_split_reproduces_validation(runs):
    logged = json.loads((runs / "run0" / "metrics.jsonl").read_text().splitlines()[-1])["val"]
    assert json.loads(evaluate(runs / "run0" / "last.pth", "--split", "val", "--json"))["full"] == logged


def test_cross_dataset_evaluation(runs):
    results = json.loads(evaluate(runs / "run0", "--captions", runs / "dataset_flickr30k.json", "--cache", runs / "other", "--json"))
    assert list(results) == ["full"]  # a 12-image flickr30k split is not the f30k-1k protocol
    with pytest.raises(ShnetError, match="1000-image test set.*--protocol full"):
        evaluate(runs / "run0", "--captions", runs / "dataset_flickr30k.json", "--cache", runs / "other", "--protocol", "f30k")


def test_evaluate_refuses_what_it_cannot_measure(runs, tmp_path):
    with pytest.raises(ShnetError, match="pass --ensemble"):
        evaluate(runs / "run0", runs / "run1")
    with pytest.raises(ShnetError, match="--captions would not be used"):
        evaluate("--sims", tmp_path / "a.npy", "--captions", runs / "captions.csv")
    np.save(tmp_path / "bad.npy", np.zeros((3, 10), np.float32))
    with pytest.raises(ShnetError, match="5 captions per image"):
        evaluate("--sims", tmp_path / "bad.npy")
    with pytest.raises(ShnetError, match="holds no checkpoint"):
        evaluate(tmp_path)
    # An evaluation split with a missing image is refused (the protocol numbers would not be comparable).
    frame = np.genfromtxt(runs / "captions.csv", delimiter=",", dtype=str, skip_header=1)
    lines = ["image_id,caption,split"] + [",".join(row) for row in frame] + [f"ghost,a ghost {k},test" for k in range(5)]
    (tmp_path / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ShnetError, match="1 of 17 images of split 'test'.*ghost"):
        evaluate(runs / "run0", "--captions", tmp_path / "captions.csv")
    four = [row for row in frame if row[2] == "test"][:-1]
    (tmp_path / "four.csv").write_text("\n".join(["image_id,caption,split"] + [",".join(r) for r in four]) + "\n")
    with pytest.raises(ShnetError, match="exactly 5 captions per image"):
        evaluate(runs / "run0", "--captions", tmp_path / "four.csv")
