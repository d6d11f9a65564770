"""The 3SHNet model against an independent per-sample reimplementation of the reference forward."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shnet.errors import ShnetError
from shnet.trainer import ModelConfig, build_model
from shnet.trainer.gpo import GPO
from shnet.trainer.image_encoder import ImageEncoder, pack_tokens
from shnet.trainer.text_encoders import (
    BertTextEncoder,
    BertTokenizerAdapter,
    VocabularyTokenizer,
    _transformers,
    tokenizer_from_state,
)

TSV = Path("/work/shared/reference/3shnet-official-checkpoint-keys.tsv")
REGION_DIM, EMBED = 48, 64


# ---------------------------------------------------------------- independent reference forward


@functools.cache
def ref_positional_codes(dim: int, length: int) -> torch.Tensor:
    """Sinusoidal codes computed element by element in float32, the precision the reference uses."""
    step = np.float32(-(math.log(10000.0) / dim))
    codes = np.zeros((length, dim), dtype=np.float32)
    for t in range(length):
        for k in range(0, dim, 2):
            angle = np.float32(t) * np.exp(np.float32(k) * step, dtype=np.float32)
            codes[t, k], codes[t, k + 1] = np.sin(angle), np.cos(angle)
    return torch.from_numpy(codes)


def ref_linear(x, p, name):
    return x @ p[f"{name}.weight"].t() + p.get(f"{name}.bias", 0)


def ref_batchnorm(x, p, name):
    """Eval-mode BatchNorm over the last dim (x [N, C]) or the channel dim (x [C, H, W])."""
    shape = (-1, 1, 1) if x.dim() == 3 else (1, -1)
    mean, var = p[f"{name}.running_mean"].view(shape), p[f"{name}.running_var"].view(shape)
    return (x - mean) / torch.sqrt(var + 1e-5) * p[f"{name}.weight"].view(shape) + p[f"{name}.bias"].view(shape)


def ref_mlp(x, p, name):
    """The reference MLP: BatchNorm after the hidden layer only; ``bns.1`` is in the state dict but
    the published forward never applies it."""
    hidden = torch.relu(ref_batchnorm(ref_linear(x, p, f"{name}.layers.0"), p, f"{name}.bns.0"))
    return ref_linear(hidden, p, f"{name}.layers.1")


def ref_class_embedding(x, p, linear, norm):
    h = torch.relu(ref_linear(x, p, linear))
    return F.layer_norm(h, h.shape[-1:], p[f"{norm}.weight"], p[f"{norm}.bias"], eps=1e-5)


def ref_gru_direction(inputs, p, suffix):
    hidden = torch.zeros(p[f"gru.weight_hh_l0{suffix}"].shape[1])
    w_ih, w_hh = p[f"gru.weight_ih_l0{suffix}"], p[f"gru.weight_hh_l0{suffix}"]
    b_ih, b_hh = p[f"gru.bias_ih_l0{suffix}"], p[f"gru.bias_hh_l0{suffix}"]
    outputs = []
    for x in inputs:
        gi, gh = w_ih @ x + b_ih, w_hh @ hidden + b_hh
        r = torch.sigmoid(gi[: len(hidden)] + gh[: len(hidden)])
        z = torch.sigmoid(gi[len(hidden) : 2 * len(hidden)] + gh[len(hidden) : 2 * len(hidden)])
        n = torch.tanh(gi[2 * len(hidden) :] + r * gh[2 * len(hidden) :])
        hidden = (1 - z) * n + z * hidden
        outputs.append(hidden)
    return torch.stack(outputs)


def ref_gpo(tokens, p):
    """GPO of one sample's valid tokens [n, D] (no padding at all)."""
    codes = ref_positional_codes(32, tokens.shape[0])
    forward = ref_gru_direction(codes, p, "")
    backward = ref_gru_direction(codes.flip(0), p, "_reverse").flip(0)
    scores = ((forward + backward) / 2) @ p["linear.weight"].t()
    weights = torch.softmax(scores / 0.1, dim=0)
    return (tokens.sort(dim=0, descending=True)[0] * weights).sum(0)


def ref_image_embedding(p, regions, seg_map, cat_onehot, seg_feat):
    """One image, its valid regions only, following reference/3shnet-region-model.md step by step."""
    n, d = regions.shape[0], p["fc.weight"].shape[0]
    f = ref_linear(regions, p, "fc")
    cat = ref_class_embedding(cat_onehot, p, "embed_category.0", "embed_category.3")
    segtok = ref_class_embedding(seg_feat.reshape(seg_feat.shape[0], 49).t(), p, "embed_seg_C.1", "embed_seg_C.4")
    # semantic highlighting
    sm = "crossmodalfusion_sm"
    r = ref_mlp(f, p, f"{sm}.MLP_image") + f
    q = ref_class_embedding(seg_feat.mean(dim=(1, 2)), p, f"{sm}.embed_seg_HW.2", f"{sm}.embed_seg_HW.5")
    q = ref_mlp(q[None], p, f"{sm}.MLP_seg")[0] + q
    a = torch.sigmoid((r @ q) / math.sqrt(d))
    w = a[:, None] * r
    sm_out = torch.relu(ref_linear(w * torch.tanh(ref_linear(w, p, f"{sm}.fc_scale")) + q, p, f"{sm}.fc_1"))
    # spatial highlighting
    sp = "crossmodalfusion_sp"
    r = ref_mlp(f, p, f"{sp}.MLP_image")
    keys = torch.cat([seg_map.reshape(4096, 1), ref_positional_codes(8, 4096)], dim=1)
    keys = keys.reshape(64, 64, 9).permute(2, 0, 1)
    keys = F.conv2d(keys[None], p[f"{sp}.embedding_Seg.0.weight"], p[f"{sp}.embedding_Seg.0.bias"], padding=1)[0]
    keys = torch.relu(ref_batchnorm(keys, p, f"{sp}.embedding_Seg.1")).reshape(128, 4096)
    att = torch.softmax(4 * (r @ keys) / math.sqrt(128), dim=-1)
    sp_out = ref_mlp(att @ keys.t() + r, p, f"{sp}.embed_fusion")
    # fusion, tokens, pooling
    f2 = ref_mlp(regions, p, "mlp") + f
    segtok = ref_mlp(segtok, p, "seg_mlp") + segtok
    fused = ref_mlp(sm_out + sp_out + f2, p, "fusion_mlp")
    tokens = torch.cat([cat[None], f2, fused, segtok])
    assert tokens.shape[0] == 2 * n + 50
    pooled = ref_gpo(tokens, {k[len("gpool.") :]: v for k, v in p.items() if k.startswith("gpool.")})
    return pooled / (pooled.norm() + 1e-8)


# ---------------------------------------------------------------- helpers


def randomise_batchnorm(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BatchNorm matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def image_batch(lengths, num_regions, region_dim=REGION_DIM, seed=0, pad_value=0.0):
    gen = torch.Generator().manual_seed(seed)
    b = len(lengths)
    regions = torch.randn(b, num_regions, region_dim, generator=gen)
    lengths = torch.tensor(lengths)
    regions[torch.arange(num_regions)[None, :] >= lengths[:, None]] = pad_value
    return {
        "regions": regions,
        "lengths": lengths,
        "seg_map": torch.randint(0, 133, (b, 64, 64), generator=gen).float(),
        "cat_onehot": (torch.rand(b, 133, generator=gen) > 0.8).float(),
        "seg_feat": torch.rand(b, 133, 7, 7, generator=gen),
    }


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    enc = ImageEncoder(region_dim=REGION_DIM, embed_size=EMBED)
    randomise_batchnorm(enc)
    return enc.eval()


# ---------------------------------------------------------------- image encoder


def test_image_encoder_matches_per_sample_reference(encoder):
    batch = image_batch([7, 1, 4, 6], num_regions=7)
    with torch.no_grad():
        out = encoder(**batch)
        p = encoder.state_dict()
        for i, n in enumerate(batch["lengths"].tolist()):
            expected = ref_image_embedding(
                p, batch["regions"][i, :n], batch["seg_map"][i], batch["cat_onehot"][i], batch["seg_feat"][i]
            )
            torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=0)
        float_lengths = encoder(**dict(batch, lengths=batch["lengths"].float()))  # the reference's dtype
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    assert torch.equal(float_lengths, out)


def test_normalised_seg_map_mode_feeds_the_reference_normalisation(encoder):
    normalised = ImageEncoder(region_dim=REGION_DIM, embed_size=EMBED, seg_map_mode="normalised").eval()
    normalised.load_state_dict(encoder.state_dict())
    batch = image_batch([3, 5], num_regions=5, seed=3)
    pre = dict(batch, seg_map=(batch["seg_map"] / 133 - 0.3342) / 0.0621)
    with torch.no_grad():
        torch.testing.assert_close(normalised(**batch), encoder(**pre), atol=1e-6, rtol=0)


def test_padding_beyond_lengths_never_changes_an_embedding(encoder):
    batch = image_batch([5, 2, 3], num_regions=5, seed=1)
    garbage = dict(batch, regions=torch.cat([batch["regions"], torch.zeros(3, 6, REGION_DIM)], dim=1))
    garbage["regions"][torch.arange(11)[None, :] >= batch["lengths"][:, None]] = 1e3 * torch.randn(1).item() + 7.0
    with torch.no_grad():
        torch.testing.assert_close(encoder(**garbage), encoder(**batch), atol=1e-6, rtol=0)


def test_padding_invariance_holds_in_train_mode_too():
    torch.manual_seed(1)
    enc = ImageEncoder(region_dim=REGION_DIM, embed_size=EMBED).train()
    batch = image_batch([5, 2, 3], num_regions=5, seed=2)
    garbage = dict(batch, regions=torch.cat([batch["regions"], 50 * torch.randn(3, 4, REGION_DIM)], dim=1))
    garbage["regions"][torch.arange(9)[None, :] >= batch["lengths"][:, None]] = 33.0
    torch.manual_seed(5)
    plain = enc(**batch)
    stats_plain = enc.mlp.bns[0].running_mean.clone()
    torch.manual_seed(5)
    padded = enc(**garbage)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=0)
    assert enc.mlp.bns[0].num_batches_tracked.item() == 2
    assert not torch.equal(stats_plain, torch.zeros_like(stats_plain))


def test_permuting_the_batch_permutes_the_output(encoder):
    batch = image_batch([6, 1, 3, 4, 2], num_regions=6, seed=4)
    order = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        out = encoder(**batch)
        permuted = encoder(**{k: v[order] for k, v in batch.items()})
    torch.testing.assert_close(permuted, out[order], atol=1e-6, rtol=0)


def test_token_packing_equals_the_reference_token_order():
    b, r, d = 4, 6, 5
    lengths = torch.tensor([6, 1, 3, 4])
    category, regions, fused, seg = torch.randn(b, d), torch.randn(b, r, d), torch.randn(b, r, d), torch.randn(b, 49, d)
    packed = pack_tokens(category, regions, fused, seg, lengths)
    assert packed.shape == (b, 2 * 6 + 50, d)
    for i, n in enumerate(lengths.tolist()):
        expected = torch.cat([category[i : i + 1], regions[i, :n], fused[i, :n], seg[i]])
        assert torch.equal(packed[i, : 2 * n + 50], expected)


def test_image_encoder_rejects_inputs_of_the_wrong_shape(encoder):
    batch = image_batch([2, 3], num_regions=3)
    with pytest.raises(ShnetError, match="regions"):
        encoder(**dict(batch, regions=torch.zeros(2, 3, REGION_DIM + 1)))
    with pytest.raises(ShnetError, match="seg_map"):
        encoder(**dict(batch, seg_map=torch.zeros(2, 32, 32)))
    with pytest.raises(ShnetError, match="lengths"):
        encoder(**dict(batch, lengths=torch.tensor([0, 3])))


def test_state_dict_matches_the_reference_checkpoint_listing():
    """Full reference size: every img_enc key and shape of the .tsv, nothing else; txt_enc heads too."""
    rows = [line.split("\t") for line in TSV.read_text().splitlines()[1:] if line.strip()]
    listed = {key: (shape, dtype) for key, shape, dtype in rows}
    image = {f"img_enc.{k}": (str(tuple(v.shape)), str(v.dtype)) for k, v in ImageEncoder().state_dict().items()}
    assert image == {k: v for k, v in listed.items() if k.startswith("img_enc.")}

    transformers = _transformers()
    with torch.device("meta"):
        text = BertTextEncoder(transformers.BertModel(transformers.BertConfig()), 1024)
    text_keys = {f"txt_enc.{k}": (str(tuple(v.shape)), str(v.dtype)) for k, v in text.state_dict().items()}
    heads = {k: v for k, v in text_keys.items() if not k.startswith("txt_enc.bert.")}
    assert heads == {k: v for k, v in listed.items() if k.startswith("txt_enc.") and not k.startswith("txt_enc.bert.")}
    with torch.device("meta"):
        bert_keys = set(transformers.BertModel(transformers.BertConfig()).state_dict())
    assert {k[len("txt_enc.bert.") :] for k in text_keys if k.startswith("txt_enc.bert.")} == bert_keys


# ---------------------------------------------------------------- GPO


def test_gpo_matches_a_direct_per_sample_implementation():
    torch.manual_seed(2)
    gpo = GPO(32, 32)
    lengths = torch.tensor([9, 1, 4, 130])
    features = torch.randn(4, 130, 16)
    with torch.no_grad():
        pooled = gpo(features, lengths)
        p = gpo.state_dict()
        for i, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(pooled[i], ref_gpo(features[i, :n], p), atol=1e-5, rtol=0)
    table = gpo._code_table
    with torch.no_grad():
        gpo(features[:2, :9], lengths[:2])
    assert gpo._code_table is table and table.shape[0] >= 130
    assert set(gpo.state_dict()) == {f"gru.{n}" for n, _ in gpo.gru.named_parameters()} | {"linear.weight"}


def test_gpo_weights_vanish_beyond_lengths():
    gpo = GPO(32, 32)
    weights = gpo.pool_weights(torch.tensor([3, 5]))
    assert weights.shape == (2, 5, 1)
    assert torch.all(weights[0, 3:] == 0)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 1))


# ---------------------------------------------------------------- text encoders and tokenizers


def test_bigru_text_encoder_ignores_padding_and_normalises():
    model = build_model(ModelConfig(embed_size=EMBED, region_dim=REGION_DIM, vocab_size=30, word_dim=12)).eval()
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]])
    lengths = torch.tensor([5, 3])
    with torch.no_grad():
        out = model.encode_texts(tokens, lengths)
        wider = model.encode_texts(torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], 1), lengths)
        alone = model.encode_texts(tokens[1:, :3], lengths[1:])
    assert out.shape == (2, EMBED)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(wider, out, atol=1e-6, rtol=0)
    torch.testing.assert_close(alone[0], out[1], atol=1e-6, rtol=0)


def test_bigru_needs_a_vocabulary():
    with pytest.raises(ShnetError, match="vocab_size"):
        build_model(ModelConfig(embed_size=EMBED, region_dim=REGION_DIM))


BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "on", "the", "grass"]
BERT_WORDS += ["##s", "play", "##ing", ".", ",", "red", "ball", "with"]


def make_bert_folder(folder: Path, words=BERT_WORDS) -> Path:
    transformers = _transformers()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, max_position_embeddings=40,
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    return make_bert_folder(tmp_path_factory.mktemp("bert") / "tiny-bert")


def test_bert_text_encoder_from_a_local_folder(bert_folder):
    model = build_model(ModelConfig(embed_size=EMBED, region_dim=REGION_DIM, text_encoder="bert", bert_path=str(bert_folder))).eval()
    tokenizer = BertTokenizerAdapter.from_folder(bert_folder)
    ids = [tokenizer.encode(c) for c in ("a dog playing on the grass.", "red balls")]
    tokens = torch.zeros(2, 10, dtype=torch.long)
    for i, row in enumerate(ids):
        tokens[i, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in ids])
    with torch.no_grad():
        out = model.encode_texts(tokens, lengths)
        alone = model.encode_texts(tokens[1:, : len(ids[1])], lengths[1:])
    assert out.shape == (2, EMBED)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(alone[0], out[1], atol=1e-5, rtol=0)


def test_bert_needs_a_folder(tmp_path):
    with pytest.raises(ShnetError, match="bert_path"):
        build_model(ModelConfig(embed_size=EMBED, text_encoder="bert"))
    with pytest.raises(ShnetError, match="not found"):
        build_model(ModelConfig(embed_size=EMBED, text_encoder="bert", bert_path=str(tmp_path / "nope")))


def test_bert_tokenizer_round_trip(bert_folder):
    tokenizer = BertTokenizerAdapter.from_folder(bert_folder)
    ids = tokenizer.encode("A dog playing on the grass, cats!")
    index = {w: i for i, w in enumerate(BERT_WORDS)}
    expected = ["[CLS]", "a", "dog", "play", "##ing", "on", "the", "grass", ",", "cat", "##s", "[UNK]", "[SEP]"]
    assert ids == [index[w] for w in expected]
    assert tokenizer.pad_id == 0 and tokenizer.vocab_size == len(BERT_WORDS) and tokenizer.max_length == 40
    rebuilt = tokenizer_from_state(tokenizer.state())
    assert rebuilt.encode("A dog playing on the grass, cats!") == ids
    assert len(tokenizer.encode("dog " * 100)) == 40
    assert tokenizer_from_state(tokenizer.state(), bert_path=str(bert_folder)).encode("red ball") == tokenizer.encode("red ball")


def test_bert_tokenizer_state_refuses_a_different_vocabulary(bert_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(BERT_WORDS[:-1] + ["blue"]) + "\n")
    state = BertTokenizerAdapter.from_folder(bert_folder).state()
    with pytest.raises(ShnetError, match="vocabulary differs"):
        tokenizer_from_state(state, bert_path=str(other))


def test_vocabulary_tokenizer_round_trip():
    tokenizer = VocabularyTokenizer.build(["A dog runs.", "a cat, a dog", "Zebra"], min_count=2)
    assert tokenizer.words == ["a", "dog"]
    ids = tokenizer.encode("A DOG jumps")
    assert tokenizer.decode(ids) == ["<start>", "a", "dog", "<unk>", "<end>"]
    assert tokenizer.pad_id == 0 and tokenizer.vocab_size == 7
    rebuilt = tokenizer_from_state(tokenizer.state())
    assert rebuilt.encode("A DOG jumps") == ids and rebuilt.vocab_size == 7
    full = VocabularyTokenizer.build(["A dog runs.", "a cat, a dog"])
    assert full.decode(full.encode("a cat runs.")) == ["<start>", "a", "cat", "runs", ".", "<end>"]


def test_augmentation_statistics_per_word():
    tokenizer = VocabularyTokenizer([f"w{i}" for i in range(1000)])
    ids = tokenizer.encode(" ".join(["w0"] * 200))
    word = ids[1]
    rng = np.random.default_rng(0)
    counts = {"kept": 0, "masked": 0, "random": 0, "deleted": 0}
    for _ in range(200):
        out = tokenizer.augment(ids, rng)
        assert out[0] == tokenizer.start_id and out[-1] == tokenizer.end_id
        body = out[1:-1]
        counts["kept"] += sum(t == word for t in body)
        counts["masked"] += sum(t == tokenizer.mask_id for t in body)
        counts["random"] += sum(t not in (word, tokenizer.mask_id) and 5 <= t < tokenizer.vocab_size for t in body)
        counts["deleted"] += 200 - len(body)
    total = 200 * 200
    assert sum(counts.values()) == total
    for name, share, tolerance in (("kept", 0.80, 0.01), ("masked", 0.10, 0.01), ("random", 0.02, 0.005), ("deleted", 0.08, 0.01)):
        assert abs(counts[name] / total - share) < tolerance, (name, counts[name] / total)


def test_bert_augmentation_treats_word_pieces_of_a_word_together(tmp_path):
    folder = tmp_path / "vocab-only"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS + [f"filler{i}" for i in range(3000)]) + "\n")
    tokenizer = BertTokenizerAdapter.from_folder(folder)
    play, ing = tokenizer.encode("playing")[1:-1]
    ids = [tokenizer.cls_id] + [play, ing] * 300 + [tokenizer.sep_id]
    rng = np.random.default_rng(1)
    counts = {"kept": 0, "masked": 0, "random": 0, "deleted": 0}
    for _ in range(40):
        out = tokenizer.augment(ids, rng)
        assert out[0] == tokenizer.cls_id and out[-1] == tokenizer.sep_id
        body = out[1:-1]
        assert len(body) % 2 == 0
        pairs = list(zip(body[0::2], body[1::2]))
        assert (play, tokenizer.mask_id) not in pairs and (tokenizer.mask_id, ing) not in pairs
        assert tokenizer.pad_id not in body
        counts["kept"] += pairs.count((play, ing))
        counts["masked"] += pairs.count((tokenizer.mask_id, tokenizer.mask_id))
        counts["random"] += sum(pair not in ((play, ing), (tokenizer.mask_id, tokenizer.mask_id)) for pair in pairs)
        counts["deleted"] += 300 - len(pairs)
    total = 40 * 300
    for name, share, tolerance in (("kept", 0.80, 0.02), ("masked", 0.10, 0.015), ("random", 0.02, 0.007), ("deleted", 0.08, 0.015)):
        assert abs(counts[name] / total - share) < tolerance, (name, counts[name] / total)


def test_the_last_batchnorm_of_every_mlp_is_kept_but_never_applied(encoder):
    """The published MLP never applies ``bns.1``: changing its statistics must change no embedding
    (identity statistics would hide the difference, so they are randomised here)."""
    batch = image_batch([4, 2], num_regions=4, seed=5)
    altered = ImageEncoder(region_dim=REGION_DIM, embed_size=EMBED).eval()
    altered.load_state_dict(encoder.state_dict())
    gen = torch.Generator().manual_seed(9)
    last_norms = [name for name, _ in altered.named_modules() if name.endswith("bns.1")]
    assert len(last_norms) == 7 and all(f"{name}.running_var" in encoder.state_dict() for name in last_norms)
    for name in last_norms:
        norm = altered.get_submodule(name)
        norm.running_mean.copy_(3 * torch.randn(norm.num_features, generator=gen))
        norm.running_var.copy_(4 * torch.rand(norm.num_features, generator=gen) + 0.1)
        norm.weight.data.copy_(torch.randn(norm.num_features, generator=gen))
    with torch.no_grad():
        torch.testing.assert_close(altered(**batch), encoder(**batch), atol=0, rtol=0)
