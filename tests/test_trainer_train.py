"""Short training runs on a small learnable synthetic cache: learning, checkpoints, exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ranking_reference import random_ranking_rsum, sorted_recalls

from shnet.errors import ShnetError
from shnet.trainer.checkpoint import load_model
from shnet.trainer.cli import evaluate_command, train_command
from shnet.trainer.model import ModelConfig, build_model
from shnet.trainer.synthetic import write_concept_cache
from shnet.trainer.train import TrainOptions, parameter_groups, train

VAL_IMAGES = 16
# Small enough for a few seconds per epoch on 2 CPU cores; lr raised so that 4 epochs suffice.
TINY = dict(embed_size=32, word_dim=32, batch_size=32, lr=1e-2, workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("learnable")
    captions = write_concept_cache(
        root / "cache", {"train": 32, "val": VAL_IMAGES}, feature_dim=16, num_boxes=6, grid_size=3, shard_size=20
    )
    captions.to_csv(root / "captions.csv", index=False)
    return root


@pytest.fixture(scope="module")
def four_epoch_run(dataset):
    options = TrainOptions(
        caches=[str(dataset / "cache")], captions=str(dataset / "captions.csv"), output=str(dataset / "run4"), epochs=4, **TINY
    )
    train(options, log=lambda message: None)
    return dataset / "run4"


def read_metrics(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("seconds")  # wall-clock time is the one field that may differ
    return records


def test_training_learns_far_above_chance(four_epoch_run):
    records = read_metrics(four_epoch_run)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["hardest_negative"] for r in records] == [False, True, True, True]
    chance = random_ranking_rsum(VAL_IMAGES)  # ~184 for 16 images x 80 captions
    assert records[-1]["val"]["rsum"] > chance + 200
    assert records[-1]["train_loss"] < records[1]["train_loss"]  # hardest-negative epochs on one scale
    best = max(records, key=lambda r: r["val"]["rsum"])
    assert records[-1]["best_rsum"] == best["val"]["rsum"]
    best_checkpoint = load_model(four_epoch_run / "best.pth")
    assert best_checkpoint.extra["epoch"] == best["epoch"] and best_checkpoint.source == "shnet"
    assert (four_epoch_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    options = json.loads((four_epoch_run / "options.json").read_text())
    assert options["options"]["lr"] == 1e-2 and options["model"]["region_dim"] == 16


def test_resume_reproduces_the_uninterrupted_run(dataset, four_epoch_run):
    run = dataset / "run2+2"
    common = [
        "--cache",
        str(dataset / "cache"),
        "--captions",
        str(dataset / "captions.csv"),
        "-o",
        str(run),
        "--embed-size",
        "32",
        "--word-dim",
        "32",
        "--batch-size",
        "32",
        "--lr",
        "1e-2",
        "--no-progress",
    ]
    first = CliRunner().invoke(train_command, common + ["--epochs", "2", "--workers", "2"], catch_exceptions=False)
    assert "best validation rSum" in first.output
    assert len(read_metrics(run)) == 2
    resumed = CliRunner().invoke(
        train_command, ["-o", str(run), "--resume", "--epochs", "4", "--workers", "0", "--no-progress"], catch_exceptions=False
    )
    assert resumed.exit_code == 0
    assert read_metrics(run) == read_metrics(four_epoch_run)
    ours, theirs = load_model(run / "last.pth"), load_model(four_epoch_run / "last.pth")
    for (name, a), b in zip(ours.model.state_dict().items(), theirs.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(ours.extra["rng"]["torch"], theirs.extra["rng"]["torch"])


def test_resume_keeps_the_recipe_and_fresh_runs_do_not_overwrite(dataset, four_epoch_run):
    with pytest.raises(ShnetError, match="keeps its recipe.*--lr"):
        CliRunner().invoke(train_command, ["-o", str(four_epoch_run), "--resume", "--lr", "0.1"], catch_exceptions=False)
    options = TrainOptions(caches=[str(dataset / "cache")], captions=str(dataset / "captions.csv"), output=str(four_epoch_run), **TINY)
    with pytest.raises(ShnetError, match="already holds a run; pass --resume"):
        train(options)
    with pytest.raises(ShnetError, match="nothing to resume"):
        train(TrainOptions(caches=[], captions="", output=str(dataset / "empty"), **TINY), resume=True)
    with pytest.raises(ShnetError, match="needs --cache"):
        CliRunner().invoke(train_command, ["-o", str(dataset / "x")], catch_exceptions=False)


def test_grid_model_trains_from_memory(dataset):
    run = dataset / "grid"
    options = TrainOptions(
        caches=[str(dataset / "cache")], captions=str(dataset / "captions.csv"), output=str(run), level="grid", epochs=1, **TINY
    )
    options.in_memory = True
    train(options, log=lambda message: None)
    loaded = load_model(run / "last.pth")
    assert loaded.config.level == "grid" and loaded.config.region_dim == 16
    # the logged validation is that of the grid model's own similarities, ranked by sorting
    evaluated = CliRunner().invoke(
        evaluate_command, [str(run), "--split", "val", "--workers", "0", "--save-sims", str(dataset / "grid-val.npy")], catch_exceptions=False
    )
    assert evaluated.exit_code == 0, evaluated.output
    logged = read_metrics(run)[0]["val"]
    expected = sorted_recalls(np.load(dataset / "grid-val.npy"))
    for direction in ("i2t", "t2i"):
        assert {k: logged[direction][k] for k in ("r1", "r5", "r10")} == pytest.approx(expected[direction])
    assert logged["rsum"] > random_ranking_rsum(VAL_IMAGES) + 150  # one epoch learns: ~420 against ~184


def test_recipe_defaults_are_the_papers():
    options = TrainOptions(caches=[], captions="", output="")
    assert (options.lr, options.bert_lr_factor, options.weight_decay, options.epochs, options.lr_update) == (5e-4, 0.1, 1e-4, 25, 15)
    assert (options.batch_size, options.grad_clip, options.margin, options.max_violation_after, options.region_dropout) == (
        256,
        2.0,
        0.2,
        1,
        0.2,
    )


def test_bert_weights_get_a_tenth_of_the_learning_rate():
    architecture = dict(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_act="gelu",
        max_position_embeddings=32,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        pad_token_id=0,
    )
    model = build_model(ModelConfig(embed_size=16, region_dim=8, text_encoder="bert", bert_config=architecture))
    head, bert = parameter_groups(model, 5e-4, 0.1)
    assert head["lr"] == 5e-4 and bert["lr"] == pytest.approx(5e-5)
    assert {id(p) for p in bert["params"]} == {id(p) for p in model.txt_enc.bert.parameters()}
    assert len(head["params"]) + len(bert["params"]) == len(list(model.parameters()))
