"""`shnet evaluate` on trained run directories, checkpoints, ensembles and saved similarity results
(plain matrices, and the published {'npts', 'sims'} files, read here as the published ensemble reads them)."""

from __future__ import annotations

import argparse
import json
import os
import pickletools
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from ranking_reference import sorted_recalls

from shnet.errors import ShnetError
from shnet.trainer.checkpoint import load_model
from shnet.trainer.cli import evaluate_command
from shnet.trainer.image_encoder import ImageEncoder
from shnet.trainer.synthetic import CONCEPT_WORDS, OPENINGS, write_concept_cache
from shnet.trainer.text_encoders import BertTextEncoder, _transformers
from shnet.trainer.train import TrainOptions, train

TEST_IMAGES = 16
TINY = dict(embed_size=32, word_dim=32, batch_size=32, lr=1e-2, epochs=1, workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two one-epoch runs (seeds 0 and 1) on one cache, and a second dataset in Karpathy format."""
    root = tmp_path_factory.mktemp("evaluate")
    captions = write_concept_cache(root / "cache", {"train": 32, "val": 8, "test": TEST_IMAGES}, feature_dim=16, num_boxes=6, shard_size=20)
    captions.to_csv(root / "captions.csv", index=False)
    for seed in (0, 1):
        options = TrainOptions(
            caches=[str(root / "cache")], captions=str(root / "captions.csv"), output=str(root / f"run{seed}"), seed=seed, **TINY
        )
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
    return result.stdout  # progress messages go to stderr


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
    mean = (np.load(tmp_path / "a.npy") + np.load(tmp_path / "b.npy")) / 2
    assert np.array_equal(np.load(tmp_path / "ab.npy"), mean)
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
    frame = pd.read_csv(runs / "captions.csv")
    ghost = pd.DataFrame({"image_id": "ghost", "caption": [f"a ghost {k}" for k in range(5)], "split": "test"})
    pd.concat([frame, ghost]).to_csv(tmp_path / "captions.csv", index=False)
    with pytest.raises(ShnetError, match="(?s)1 of 17 images of split 'test'.*ghost"):
        evaluate(runs / "run0", "--captions", tmp_path / "captions.csv")
    frame[frame["split"] == "test"].iloc[:-1].to_csv(tmp_path / "four.csv", index=False)
    with pytest.raises(ShnetError, match="exactly 5 captions per image"):
        evaluate(runs / "run0", "--captions", tmp_path / "four.csv")


def tiny_bert_folder(folder):
    """A local bert-base-uncased style folder (vocab.txt, config, random weights) covering the captions."""
    transformers = _transformers()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", "and", "with", "next", "to"]
    words += sorted(({w for opening in OPENINGS for w in opening.split()} | set(CONCEPT_WORDS)) - set(words))
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_position_embeddings=40
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


def test_a_reference_checkpoint_evaluates_directly(runs, tmp_path):
    """A file laid out as the reference implementation saves it: [image state, text state] + argparse options."""
    bert_folder = tiny_bert_folder(tmp_path / "bert")
    torch.manual_seed(0)
    image = ImageEncoder(region_dim=16, embed_size=32)
    text = BertTextEncoder(_transformers().BertModel.from_pretrained(str(bert_folder)), 32)
    opt = argparse.Namespace(embed_size=32, img_dim=16, precomp_enc_type="basic", no_imgnorm=False, no_txtnorm=False)
    torch.save(
        {"epoch": 3, "model": [image.state_dict(), text.state_dict()], "best_rsum": 0.0, "opt": opt, "Eiters": 9}, tmp_path / "ref.pth"
    )
    data = ["--captions", runs / "captions.csv", "--cache", runs / "cache"]
    results = json.loads(evaluate(tmp_path / "ref.pth", "--bert-path", bert_folder, *data, "--json", "--save-sims", tmp_path / "ref.npy"))
    assert list(results) == ["full"]
    sims = np.load(tmp_path / "ref.npy")
    assert sims.shape == (TEST_IMAGES, 5 * TEST_IMAGES)
    # the figures are those of the similarities the checkpoint produced, ranked by sorting
    expected = sorted_recalls(sims)
    for direction in ("i2t", "t2i"):
        assert {k: results["full"][direction][k] for k in ("r1", "r5", "r10")} == pytest.approx(expected[direction])
    assert results["full"]["rsum"] == pytest.approx(sum(sum(d.values()) for d in expected.values()))
    with pytest.raises(ShnetError, match="pass --bert-path"):
        evaluate(tmp_path / "ref.pth", *data)
    with pytest.raises(ShnetError, match="pass --captions FILE and --cache"):
        evaluate(tmp_path / "ref.pth", "--bert-path", bert_folder)


def test_a_bert_run_trains_and_evaluates_without_its_folder(runs, tmp_path):
    bert_folder = tiny_bert_folder(tmp_path / "bert")
    run = tmp_path / "bert-run"
    options = TrainOptions(
        caches=[str(runs / "cache")],
        captions=str(runs / "captions.csv"),
        output=str(run),
        text_encoder="bert",
        bert_path=str(bert_folder),
        **TINY,
    )
    train(options, log=lambda message: None)
    groups = load_model(run / "last.pth").extra["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [pytest.approx(1e-2), pytest.approx(1e-3)]
    shutil.rmtree(bert_folder)  # the checkpoint carries the tokenizer and the BERT architecture
    assert list(json.loads(evaluate(run, "--json"))) == ["full"]


def published_ensemble_inputs(paths):
    """What the published eval_ensemble (lib/evaluation_rgn_seg_sp_se.py) does with results files
    before it ranks: its loads, its npts check, its mean."""
    all_sims = []
    all_npts = []
    for sim_path in paths:
        results = np.load(sim_path, allow_pickle=True).tolist()
        npts = results["npts"]
        sims = results["sims"]
        all_npts.append(npts)
        all_sims.append(sims)
    all_npts = np.array(all_npts)
    all_sims = np.array(all_sims)
    assert np.all(all_npts == all_npts[0])
    npts = int(all_npts[0])
    sims = all_sims.mean(axis=0)
    return npts, sims


def pickle_globals(path) -> set[str]:
    with open(path, "rb") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        payload = handle.read()
    ops = list(pickletools.genops(payload))
    assert not [op for op, _, _ in ops if op.name == "STACK_GLOBAL"]
    return {arg for op, arg, _ in ops if op.name == "GLOBAL"}


def test_3shnet_results_read_as_the_published_ensemble_reads_them(runs, tmp_path):
    direct = json.loads(evaluate(runs / "run0", "--json", "--save-sims", tmp_path / "plain0.npy"))
    evaluate(runs / "run0", "--save-sims", tmp_path / "run0_results", "--sims-layout", "3shnet")  # .npy appended, as np.save does
    evaluate(runs / "run1", "--save-sims", tmp_path / "run1_results.npy", "--sims-layout", "3shnet")
    paths = [os.path.join(str(tmp_path), "run0_results.npy"), os.path.join(str(tmp_path), "run1_results.npy")]

    first = np.load(paths[0], allow_pickle=True).tolist()
    assert type(first["npts"]) is int and first["npts"] == TEST_IMAGES
    assert first["sims"].dtype == np.float64 and first["sims"].shape == (TEST_IMAGES, 5 * TEST_IMAGES)  # as the published evalrank saves it
    np.testing.assert_array_equal(first["sims"], np.load(tmp_path / "plain0.npy").astype(np.float64))
    npts, mean = published_ensemble_inputs(paths)
    assert npts == TEST_IMAGES
    # numpy 1.x names only: the published environment (numpy 1.21) has no numpy._core to unpickle from
    assert pickle_globals(paths[0]) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}

    assert json.loads(evaluate("--sims", paths[0], "--json")) == direct
    # a mix: shnet's results file, a plain matrix, and a file as the published code writes it (np.save of the dict)
    np.save(tmp_path / "published.npy", {"npts": TEST_IMAGES, "sims": mean})
    evaluate("--sims", paths[0], tmp_path / "plain0.npy", tmp_path / "published.npy", "--save-sims", tmp_path / "mixed.npy")
    expected = (first["sims"] * 2 + mean) / 3
    np.testing.assert_allclose(np.load(tmp_path / "mixed.npy"), expected, rtol=1e-6, atol=1e-6)
    assert published_ensemble_inputs([tmp_path / "published.npy", paths[1]])[0] == TEST_IMAGES


class RunsAShellCommand:
    """Pickles into a call of os.system: a results file made with it runs the command when np.load
    unpickles it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_results_files_that_are_not_the_published_dict_are_refused_unrun(runs, tmp_path):
    marker = tmp_path / "it-ran"
    np.save(tmp_path / "hostile.npy", {"npts": TEST_IMAGES, "sims": RunsAShellCommand(marker)}, allow_pickle=True)
    with pytest.raises(ShnetError, match=r"hostile\.npy .*asks to load posix\.system.*never runs other pickled code"):
        evaluate("--sims", tmp_path / "hostile.npy")
    assert not marker.exists()
    np.load(tmp_path / "hostile.npy", allow_pickle=True)  # what the file would do if unpickled plainly
    assert marker.exists()

    sims = np.random.default_rng(0).random((TEST_IMAGES, 5 * TEST_IMAGES))
    refusals = {
        "extra.npy": ({"npts": TEST_IMAGES, "sims": sims, "note": "x"}, r"holds \['note', 'npts', 'sims'\]; a published results file holds a dict of exactly"),
        "text-npts.npy": ({"npts": "16", "sims": sims}, r"'npts' is '16'; it is the number of images"),
        "words.npy": ({"npts": 2, "sims": np.array([["a"] * 10] * 2)}, r"'sims' is a <U1 array of shape \(2, 10\)"),
        "inconsistent.npy": ({"npts": TEST_IMAGES - 1, "sims": sims}, rf"'npts' is {TEST_IMAGES - 1} but 'sims' has {TEST_IMAGES} image rows"),
    }
    for name, (results, message) in refusals.items():
        np.save(tmp_path / name, results, allow_pickle=True)
        with pytest.raises(ShnetError, match=rf"{re.escape(name)}.*{message}"):
            evaluate("--sims", tmp_path / name)
    np.save(tmp_path / "list.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    with pytest.raises(ShnetError, match=r"list\.npy holds an object array of shape \(2,\)"):
        evaluate("--sims", tmp_path / "list.npy")
    (tmp_path / "notes.npy").write_text("not an array")
    with pytest.raises(ShnetError, match=r"notes\.npy is not a \.npy similarity matrix or results file"):
        evaluate("--sims", tmp_path / "notes.npy")

    np.save(tmp_path / "a.npy", {"npts": TEST_IMAGES, "sims": sims})
    np.save(tmp_path / "b.npy", {"npts": 8, "sims": sims[:8, :40]})
    with pytest.raises(ShnetError, match=r"b\.npy holds npts 8, .*a\.npy npts 16; ensembled results must be of one split"):
        evaluate("--sims", tmp_path / "a.npy", tmp_path / "b.npy")
    np.save(tmp_path / "small.npy", sims[:8, :40].astype(np.float32))
    with pytest.raises(ShnetError, match=r"small\.npy has shape \(8, 40\), .*a\.npy has \(16, 80\)"):
        evaluate("--sims", tmp_path / "a.npy", tmp_path / "small.npy")
    with pytest.raises(ShnetError, match="--sims-layout 3shnet says how --save-sims writes; add --save-sims FILE"):
        evaluate("--sims", tmp_path / "a.npy", "--sims-layout", "3shnet")
