"""Checkpoints: reference-implementation files (built from the official key listing) and shnet's own."""

from __future__ import annotations

import argparse
import gc
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trainer_model import (
    BERT_WORDS,
    image_batch,
    make_bert_folder,
    randomise_batchnorm,
)

from shnet.errors import CheckpointMismatchError, ShnetError
from shnet.trainer import ModelConfig, build_model, load_model, save_checkpoint
from shnet.trainer.gpo import GPO
from shnet.trainer.image_encoder import ImageEncoder
from shnet.trainer.text_encoders import (
    BertTextEncoder,
    BertTokenizerAdapter,
    VocabularyTokenizer,
    _transformers,
)

TSV = Path("/work/shared/reference/3shnet-official-checkpoint-keys.tsv")
SMALL_REGION_DIM, SMALL_EMBED = 48, 64


def listed_shapes(prefix: str) -> dict[str, tuple[int, ...]]:
    """``{key without prefix: shape}`` for the .tsv rows under ``prefix`` (the BERT row excluded)."""
    out = {}
    for line in TSV.read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        if key.startswith(prefix) and "<" not in key:
            out[key[len(prefix) :]] = tuple(int(n) for n in shape.strip("()").split(",") if n.strip())
    return out


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(int(torch.randint(1, 10**6, (), generator=gen)))
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            state[key] = torch.randn(shape, generator=gen) * 0.05
    return state


def save_reference(path: Path, image_state, text_state, **opt_overrides) -> Path:
    """A file laid out as the reference implementation's ``torch.save`` writes it."""
    fc = next(v for k, v in image_state.items() if k.removeprefix("module.") == "fc.weight")
    opt = argparse.Namespace(
        data_name="coco_precomp", embed_size=fc.shape[0], img_dim=fc.shape[1], precomp_enc_type="basic", margin=0.2,
        max_violation=True, no_imgnorm=False, no_txtnorm=False, learning_rate=5e-4,
    )
    vars(opt).update(opt_overrides)
    torch.save({"epoch": 24, "model": [image_state, text_state], "best_rsum": 538.0, "opt": opt, "Eiters": 123456}, path)
    return path


def with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------- full-size reference checkpoint


def test_full_size_reference_checkpoint_loads_strictly(tmp_path):
    """Every image key and shape of the official listing, a bert-base text encoder as saved by
    transformers 4.24 (with its position_ids buffer), DataParallel ``module.`` prefixes."""
    transformers = _transformers()
    image_state = random_state(listed_shapes("img_enc."), seed=0)
    torch.manual_seed(0)
    bert_state = transformers.BertModel(transformers.BertConfig()).state_dict()
    bert_state["embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    text_state = random_state(listed_shapes("txt_enc."), seed=1) | with_prefix(bert_state, "bert.")
    path = save_reference(tmp_path / "model_best.pth", with_prefix(image_state, "module."), with_prefix(text_state, "module."))
    del bert_state

    loaded = load_model(path)
    assert loaded.source == "reference" and loaded.tokenizer is None
    cfg = loaded.config
    assert (cfg.embed_size, cfg.region_dim, cfg.num_classes, cfg.text_encoder) == (1024, 2048, 133, "bert")
    assert {k: cfg.bert_config[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")} == {
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    }
    assert loaded.extra["epoch"] == 24 and loaded.extra["best_rsum"] == 538.0 and loaded.extra["Eiters"] == 123456
    assert loaded.extra["opt"]["data_name"] == "coco_precomp"
    model_state = loaded.model.state_dict()
    for key, value in image_state.items():
        assert torch.equal(model_state[f"img_enc.{key}"], value), key
    assert torch.equal(model_state["txt_enc.linear.weight"], text_state["linear.weight"])
    assert not loaded.model.training

    with torch.no_grad():
        images = loaded.model.encode_images(image_batch([36, 20], num_regions=36, region_dim=2048))
        texts = loaded.model.encode_texts(torch.tensor([[101, 1037, 3899, 102, 0], [101, 2417, 102, 0, 0]]), torch.tensor([4, 3]))
    for emb in (images, texts):
        assert emb.shape == (2, 1024) and torch.isfinite(emb).all()
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    del loaded, image_state, text_state, model_state
    gc.collect()


# ---------------------------------------------------------------- small reference checkpoints


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("ckpt-bert") / "tiny-bert")


@pytest.fixture(scope="module")
def small_reference_states(bert_folder):
    """(image state, text state) of a small reference model: tiny BERT, embed 64, region dim 48."""
    torch.manual_seed(3)
    image = ImageEncoder(region_dim=SMALL_REGION_DIM, embed_size=SMALL_EMBED)
    randomise_batchnorm(image, seed=3)
    bert = _transformers().BertModel.from_pretrained(str(bert_folder), local_files_only=True)
    text = {"linear.weight": torch.randn(SMALL_EMBED, 32) * 0.1, "linear.bias": torch.randn(SMALL_EMBED) * 0.1}
    text |= with_prefix(GPO().state_dict(), "gpool.") | with_prefix(bert.state_dict(), "bert.")
    return image.state_dict(), text


def test_small_reference_checkpoint_with_tokenizer(tmp_path, bert_folder, small_reference_states):
    image_state, text_state = small_reference_states
    path = save_reference(tmp_path / "checkpoint.pth.tar", image_state, text_state)
    loaded = load_model(path, bert_path=str(bert_folder), seg_map_mode="normalised")
    assert loaded.config.seg_map_mode == "normalised" and loaded.config.bert_config["num_attention_heads"] == 2
    assert isinstance(loaded.tokenizer, BertTokenizerAdapter)

    direct = ImageEncoder(SMALL_REGION_DIM, SMALL_EMBED, seg_map_mode="normalised").eval()
    direct.load_state_dict(image_state)
    batch = image_batch([4, 2, 3], num_regions=4, region_dim=SMALL_REGION_DIM)
    ids = [loaded.tokenizer.encode(c) for c in ("a red ball on the grass", "dogs playing")]
    tokens = torch.zeros(2, max(map(len, ids)), dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(batch), direct(**batch))
        texts = loaded.model.encode_texts(tokens, torch.tensor([len(r) for r in ids]))
    torch.testing.assert_close(texts.norm(dim=1), torch.ones(2))
    bert = _transformers().BertModel.from_pretrained(str(bert_folder), local_files_only=True).eval()
    direct_text = BertTextEncoder(bert, SMALL_EMBED).eval()
    direct_text.load_state_dict(text_state)
    with torch.no_grad():
        torch.testing.assert_close(texts, direct_text(tokens, torch.tensor([len(r) for r in ids])), atol=1e-6, rtol=0)

    without_folder = load_model(path)
    assert without_folder.tokenizer is None and without_folder.config.bert_config["num_attention_heads"] == 1


def test_renamed_key_fails_naming_the_key_and_the_file(tmp_path, small_reference_states):
    image_state, text_state = small_reference_states
    image_state = dict(image_state)
    image_state["crossmodalfusion_sp.embedding_Seg.1.running_mu"] = image_state.pop("crossmodalfusion_sp.embedding_Seg.1.running_mean")
    path = save_reference(tmp_path / "renamed.pth", with_prefix(image_state, "module."), text_state)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message
    assert "img_enc.crossmodalfusion_sp.embedding_Seg.1.running_mean" in message
    assert "img_enc.crossmodalfusion_sp.embedding_Seg.1.running_mu" in message


def test_wrong_shape_fails_naming_the_key_and_both_shapes(tmp_path, small_reference_states):
    image_state, text_state = small_reference_states
    image_state = dict(image_state, **{"seg_mlp.layers.0.weight": torch.zeros(SMALL_EMBED // 2, SMALL_EMBED + 1)})
    path = save_reference(tmp_path / "shape.pth", image_state, text_state)
    with pytest.raises(CheckpointMismatchError, match=r"img_enc\.seg_mlp\.layers\.0\.weight: model \(32, 64\) vs file \(32, 65\)") as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_missing_text_key_is_reported(tmp_path, small_reference_states):
    image_state, text_state = small_reference_states
    text_state = {k: v for k, v in text_state.items() if k != "gpool.linear.weight"}
    path = save_reference(tmp_path / "missing.pth", image_state, text_state)
    with pytest.raises(CheckpointMismatchError, match=r"missing from the file \(1\):\n  txt_enc\.gpool\.linear\.weight"):
        load_model(path)


class _Payload:
    """A custom class instance whose unpickling would create a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_arbitrary_pickled_objects_are_refused_and_never_run(tmp_path, small_reference_states):
    image_state, text_state = small_reference_states
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pth"
    torch.save({"epoch": 1, "model": [image_state, text_state], "opt": _Payload(marker)}, path)
    with pytest.raises(ShnetError, match="never runs code from weights files"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "overrides, message",
    [({"precomp_enc_type": "backbone"}, "backbone variant"), ({"no_txtnorm": True}, "no_txtnorm"), ({"embed_size": 1024}, "opt.embed_size")],
)
def test_reference_options_shnet_cannot_honour_are_refused(tmp_path, small_reference_states, overrides, message):
    path = save_reference(tmp_path / "opt.pth", *small_reference_states, **overrides)
    with pytest.raises(ShnetError, match=message):
        load_model(path)


def test_tokenizer_folder_must_match_the_checkpoint_vocabulary(tmp_path, small_reference_states):
    path = save_reference(tmp_path / "ref.pth", *small_reference_states)
    other = tmp_path / "bigger-vocab"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(BERT_WORDS + ["extra"]) + "\n")
    with pytest.raises(ShnetError, match="vocabulary has 21 tokens"):
        load_model(path, bert_path=str(other))


def test_unrecognised_files_are_refused(tmp_path):
    plain = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, plain)
    with pytest.raises(ShnetError, match="neither a shnet checkpoint nor a 3SHNet reference checkpoint"):
        load_model(plain)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(plain.read_bytes()[:100])
    with pytest.raises(ShnetError, match="truncated.pth"):
        load_model(truncated)


# ---------------------------------------------------------------- shnet checkpoints


def adamw_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.zeros_like(p) + 1e-3
    optimizer.step()
    for p in params:
        p.grad = None
    return optimizer.state_dict()


def test_shnet_round_trip_with_a_vocabulary_tokenizer(tmp_path):
    captions = ["a dog runs on the grass", "a red ball", "two cats play"]
    tokenizer = VocabularyTokenizer.build(captions)
    cfg = ModelConfig(level="grid", embed_size=SMALL_EMBED, region_dim=SMALL_REGION_DIM, vocab_size=tokenizer.vocab_size, word_dim=16)
    torch.manual_seed(4)
    model = build_model(cfg)
    randomise_batchnorm(model, seed=4)
    extra = {
        "epoch": 3,
        "optimizer": adamw_state(model),
        "scheduler": {"milestones": __import__("collections").Counter({15: 1}), "last_epoch": 3},
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.default_rng(0).bit_generator.state, "python": random.getstate()},
        "metrics": {"rsum": 123.4, "r1": [1.0, 2.0]},
    }
    path = tmp_path / "run" / "last.pth"
    save_checkpoint(path, model, cfg, tokenizer, extra)
    assert [p.name for p in path.parent.iterdir()] == ["last.pth"]
    assert torch.load(path, weights_only=True)["format"] == "shnet-model"

    loaded = load_model(path)
    assert loaded.source == "shnet" and loaded.config == cfg
    assert loaded.tokenizer.encode("a dog plays") == tokenizer.encode("a dog plays")
    assert loaded.extra["epoch"] == 3 and loaded.extra["metrics"] == extra["metrics"]
    assert loaded.extra["rng"]["python"] == extra["rng"]["python"]
    assert loaded.extra["rng"]["numpy"] == extra["rng"]["numpy"]
    assert torch.equal(loaded.extra["optimizer"]["state"][0]["exp_avg"], extra["optimizer"]["state"][0]["exp_avg"])
    model.eval()
    batch = image_batch([3, 1], num_regions=3, region_dim=SMALL_REGION_DIM)
    ids = [tokenizer.encode(c) for c in captions[:2]]
    tokens = torch.zeros(2, 8, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_images(batch), model.encode_images(batch))
        assert torch.equal(loaded.model.encode_texts(tokens, lengths), model.encode_texts(tokens, lengths))

    with pytest.raises(ShnetError, match="seg_map_mode='raw'"):
        load_model(path, seg_map_mode="normalised")


def test_shnet_round_trip_with_bert_needs_no_folder(tmp_path, bert_folder):
    folder = shutil.copytree(bert_folder, tmp_path / "bert-copy")
    cfg = ModelConfig(embed_size=SMALL_EMBED, region_dim=SMALL_REGION_DIM, text_encoder="bert", bert_path=str(folder))
    model = build_model(cfg).eval()
    tokenizer = BertTokenizerAdapter.from_folder(folder)
    path = tmp_path / "bert.pth"
    save_checkpoint(path, model, cfg, tokenizer, {"epoch": 0})
    shutil.rmtree(folder)

    loaded = load_model(path)
    assert loaded.config.bert_config["hidden_size"] == 32
    ids = loaded.tokenizer.encode("a dog playing with a red ball")
    assert ids == tokenizer.encode("a dog playing with a red ball")
    tokens, lengths = torch.tensor([ids]), torch.tensor([len(ids)])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_texts(tokens, lengths), model.encode_texts(tokens, lengths))


class _Opaque:
    pass


@pytest.mark.parametrize("bad, where", [(np.zeros(3), "numpy.ndarray"), (_Opaque(), "_Opaque")])
def test_save_refuses_what_weights_only_loading_cannot_read(tmp_path, bad, where):
    tokenizer = VocabularyTokenizer.build(["a b"])
    cfg = ModelConfig(embed_size=SMALL_EMBED, region_dim=SMALL_REGION_DIM, vocab_size=tokenizer.vocab_size, word_dim=8)
    model = build_model(cfg)
    path = tmp_path / "ck.pth"
    save_checkpoint(path, model, cfg, tokenizer, {"epoch": 1})
    before = path.read_bytes()
    with pytest.raises(ShnetError, match=rf"extra\['metrics'\]\['curve'\].*{where}"):
        save_checkpoint(path, model, cfg, tokenizer, {"epoch": 2, "metrics": {"curve": bad}})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pth"]


def test_damaged_shnet_checkpoint_is_reported(tmp_path):
    tokenizer = VocabularyTokenizer.build(["a b"])
    cfg = ModelConfig(embed_size=SMALL_EMBED, region_dim=SMALL_REGION_DIM, vocab_size=tokenizer.vocab_size, word_dim=8)
    path = tmp_path / "ck.pth"
    save_checkpoint(path, build_model(cfg), cfg, tokenizer, {})
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["img_enc.fc.bias"]
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)ck\.pth.*img_enc\.fc\.bias"):
        load_model(path)
