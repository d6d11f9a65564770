"""Caption tokenizers and text encoders (BERT as in the paper, or a BiGRU needing no weights).

Both encoders end like the image encoder: per-token features -> GPO -> l2 normalisation. Token id 0
is padding for both tokenizers (BERT's attention mask is ``token id != 0``, as in the reference).
transformers is imported only when a BERT model or tokenizer is built.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..errors import ShnetError
from .gpo import GPO, l2norm

AUGMENT_PROBABILITY = 0.2
_MASK_SHARE, _RANDOM_SHARE = 0.5, 0.1  # of the chosen words; the remaining 40% are deleted

BERT_ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "pad_token_id",
)


def _transformers():
    from ..torchvision_compat import ensure_torchvision

    ensure_torchvision()
    import transformers

    return transformers


@runtime_checkable
class Tokenizer(Protocol):
    """Caption text -> token ids, with the training-time augmentation and a JSON-able state."""

    pad_id: int
    vocab_size: int

    def encode(self, caption: str) -> list[int]: ...

    def augment(self, ids: list[int], rng: np.random.Generator) -> list[int]: ...

    def state(self) -> dict: ...


def augment_words(
    ids: list[int],
    starts_word: np.ndarray,
    protected: frozenset[int],
    mask_id: int,
    random_ids: tuple[int, int],
    rng: np.random.Generator,
) -> list[int]:
    """The reference's caption augmentation: each word (a token that starts a word plus the
    continuation pieces after it) is chosen with p=0.2; a chosen word has all its pieces replaced
    by ``mask_id`` (50%), each piece replaced by a random id from ``random_ids`` [low, high) (10%),
    or is deleted (40%). ``protected`` ids (start/end/padding) are kept and never form a word."""
    out: list[int] = []
    action = None
    for token in ids:
        if token in protected:
            out.append(token)
            action = None
            continue
        if starts_word[token] or action is None:
            draw = rng.random()
            if draw >= AUGMENT_PROBABILITY:
                action = "keep"
            elif draw < AUGMENT_PROBABILITY * _MASK_SHARE:
                action = "mask"
            elif draw < AUGMENT_PROBABILITY * (_MASK_SHARE + _RANDOM_SHARE):
                action = "random"
            else:
                action = "delete"
        if action == "keep":
            out.append(token)
        elif action == "mask":
            out.append(mask_id)
        elif action == "random":
            out.append(int(rng.integers(*random_ids)))
    return out


class VocabularyTokenizer:
    """Lower-cased word tokens over a vocabulary built from training captions.

    Ids: ``<pad>``=0, ``<start>``=1, ``<end>``=2, ``<unk>``=3, ``<mask>``=4, then the words, most
    frequent first. ``encode`` wraps a caption in ``<start>``/``<end>``.
    """

    SPECIALS = ("<pad>", "<start>", "<end>", "<unk>", "<mask>")
    pad_id, start_id, end_id, unk_id, mask_id = range(5)
    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, words: list[str]):
        self.words = list(words)
        self._index = {word: i for i, word in enumerate(self.SPECIALS + tuple(self.words))}
        if len(self._index) != len(self.SPECIALS) + len(self.words):
            raise ShnetError("a vocabulary must not repeat a word or contain a special token")
        self.vocab_size = len(self._index)
        self._starts_word = np.ones(self.vocab_size, dtype=bool)

    @classmethod
    def split(cls, caption: str) -> list[str]:
        return cls._WORD.findall(caption.lower())

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1) -> VocabularyTokenizer:
        counts = Counter(word for caption in captions for word in cls.split(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept)

    def encode(self, caption: str) -> list[int]:
        return [self.start_id] + [self._index.get(w, self.unk_id) for w in self.split(caption)] + [self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        names = self.SPECIALS + tuple(self.words)
        return [names[i] for i in ids]

    def augment(self, ids: list[int], rng: np.random.Generator) -> list[int]:
        first_word = len(self.SPECIALS)
        random_ids = (first_word, self.vocab_size) if self.vocab_size > first_word else (self.mask_id, self.mask_id + 1)
        protected = frozenset((self.pad_id, self.start_id, self.end_id))
        return augment_words(ids, self._starts_word, protected, self.mask_id, random_ids, rng)

    def state(self) -> dict:
        return {"kind": "vocabulary", "words": list(self.words)}


class BertTokenizerAdapter:
    """A BERT WordPiece tokenizer (Hugging Face ``tokenizers`` backend): ``[CLS] pieces [SEP]``.

    Its state carries the whole tokenizer definition, so a checkpoint rebuilds it without the folder.
    Captions longer than ``max_length`` tokens are cut (keeping the final ``[SEP]``).
    """

    def __init__(self, backend, max_length: int = 512):
        self._backend = backend
        self.max_length = int(max_length)
        vocab = backend.get_vocab(with_added_tokens=True)
        missing = [t for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]") if t not in vocab]
        if missing:
            raise ShnetError(f"the BERT tokenizer lacks the special tokens {missing}; use a bert-base-uncased style vocabulary")
        if vocab["[PAD]"] != 0:
            raise ShnetError(f"the BERT tokenizer's [PAD] has id {vocab['[PAD]']}; the model masks id 0 as padding")
        self.pad_id, self.cls_id, self.sep_id, self.mask_id = (vocab[t] for t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]"))
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._starts_word = np.ones(self.vocab_size, dtype=bool)
        for token, index in vocab.items():
            if token.startswith("##"):
                self._starts_word[index] = False

    @classmethod
    def from_folder(cls, path: str | Path) -> BertTokenizerAdapter:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise ShnetError(f"BERT folder not found: {path} (a local bert-base-uncased folder with vocab.txt or tokenizer.json)")
        try:
            tokenizer = _transformers().BertTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ShnetError(f"{path}: no BERT tokenizer could be loaded from this folder ({exc})") from exc
        max_length = tokenizer.model_max_length
        if max_length > 1_000_000:
            config = path / "config.json"
            max_length = json.loads(config.read_text()).get("max_position_embeddings", 512) if config.exists() else 512
        return cls(tokenizer.backend_tokenizer, max_length)

    def encode(self, caption: str) -> list[int]:
        pieces = self._backend.encode(caption, add_special_tokens=False).ids[: self.max_length - 2]
        return [self.cls_id] + pieces + [self.sep_id]

    def augment(self, ids: list[int], rng: np.random.Generator) -> list[int]:
        protected = frozenset((self.pad_id, self.cls_id, self.sep_id))
        # random replacements exclude [PAD] (id 0), which the attention mask would silently drop
        return augment_words(ids, self._starts_word, protected, self.mask_id, (1, self.vocab_size), rng)

    def state(self) -> dict:
        return {"kind": "bert", "tokenizer_json": self._backend.to_str(), "max_length": self.max_length}

    @classmethod
    def from_state(cls, state: dict) -> BertTokenizerAdapter:
        from tokenizers import Tokenizer as Backend

        return cls(Backend.from_str(state["tokenizer_json"]), state["max_length"])


def tokenizer_from_state(state: dict, bert_path: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`Tokenizer.state`. With ``bert_path``, a BERT tokenizer is read
    from that folder instead, after checking that its vocabulary is the one stored."""
    kind = state.get("kind")
    if kind == "vocabulary":
        return VocabularyTokenizer(state["words"])
    if kind == "bert":
        stored = BertTokenizerAdapter.from_state(state)
        if bert_path is None:
            return stored
        folder = BertTokenizerAdapter.from_folder(bert_path)
        if folder._backend.get_vocab(with_added_tokens=True) != stored._backend.get_vocab(with_added_tokens=True):
            raise ShnetError(f"{bert_path}: its vocabulary differs from the one this model was trained with")
        return folder
    raise ShnetError(f"unknown tokenizer kind {kind!r} in the checkpoint (expected 'vocabulary' or 'bert')")


def bert_architecture(config) -> dict:
    """The architecture fields of a ``BertConfig`` (enough to rebuild the module without weights)."""
    return {key: getattr(config, key) for key in BERT_ARCHITECTURE_KEYS}


_SHAPE_DERIVED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "max_position_embeddings", "type_vocab_size")


def bert_architecture_from_weights(state: dict[str, torch.Tensor], prefix: str = "bert.", folder: str | None = None) -> dict:
    """A BERT architecture read off a state dict's shapes. Shapes cannot tell the attention heads
    and activation: those come from ``folder``'s config.json when given (its sizes must agree with
    the weights), otherwise heads = hidden / 64 (true of every Google BERT release) and the rest
    as bert-base-uncased."""
    try:
        vocab_size, hidden = state[f"{prefix}embeddings.word_embeddings.weight"].shape
        max_positions = state[f"{prefix}embeddings.position_embeddings.weight"].shape[0]
        type_vocab = state[f"{prefix}embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = state[f"{prefix}encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as exc:
        raise ShnetError(f"the text encoder weights are not a BERT model: {exc.args[0]!r} is missing") from exc
    layer_key = re.compile(re.escape(prefix) + r"encoder\.layer\.(\d+)\.")
    layers = 1 + max(int(m.group(1)) for m in map(layer_key.match, state) if m)
    from_shapes = {
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden),
        "num_hidden_layers": layers,
        "intermediate_size": int(intermediate),
        "max_position_embeddings": int(max_positions),
        "type_vocab_size": int(type_vocab),
    }
    config_file = Path(folder).expanduser() / "config.json" if folder is not None else None
    if config_file is None or not config_file.exists():
        defaults = bert_architecture(_transformers().BertConfig())
        return dict(defaults, **from_shapes, num_attention_heads=max(int(hidden) // 64, 1))
    described = bert_architecture(_transformers().BertConfig.from_json_file(str(config_file)))
    differing = {k: (described[k], v) for k, v in from_shapes.items() if described[k] != v}
    if differing:
        raise ShnetError(
            f"{config_file} describes another BERT than the checkpoint's (config vs weights: {differing}); "
            "give the bert-base-uncased folder the model was trained with"
        )
    return described


def check_bert_folder(path: str | Path) -> None:
    """Refuse, before any work starts, a ``--bert-path`` that is not a loadable local BERT folder:
    missing, without a vocabulary, without config.json, or without weights."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ShnetError(f"BERT folder not found: {folder} (a local bert-base-uncased folder; nothing is downloaded)")
    needs = {
        "a vocabulary (vocab.txt or tokenizer.json)": ("vocab.txt", "tokenizer.json"),
        "config.json": ("config.json",),
        "weights (model.safetensors or pytorch_model.bin)": ("model.safetensors", "pytorch_model.bin"),
    }
    missing = [what for what, names in needs.items() if not any((folder / name).is_file() for name in names)]
    if missing:
        raise ShnetError(
            f"{folder} is not a BERT model folder: it lacks {', '.join(missing)}; save one with "
            "BertModel.from_pretrained('bert-base-uncased').save_pretrained(DIR) and the tokenizer's save_pretrained(DIR)"
        )


def build_bert(architecture: dict | None = None, path: str | None = None) -> nn.Module:
    """A ``BertModel``: from ``architecture`` with untrained weights (to be loaded from a checkpoint),
    otherwise with the pretrained weights of the local folder ``path``."""
    transformers = _transformers()
    if architecture is not None:
        return transformers.BertModel(transformers.BertConfig(**architecture))
    if path is None:
        raise ShnetError("the BERT text encoder needs bert_path: a local bert-base-uncased folder (config.json + weights)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ShnetError(f"BERT folder not found: {folder} (weights are read from local folders only; nothing is downloaded)")
    try:
        return transformers.BertModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ShnetError(f"{folder}: not a loadable BERT model folder ({exc})") from exc


class BertTextEncoder(nn.Module):
    """BERT last hidden state -> Linear(hidden, D) -> GPO over all tokens -> l2norm."""

    def __init__(self, bert: nn.Module, embed_size: int):
        super().__init__()
        self.bert = bert
        self.linear = nn.Linear(bert.config.hidden_size, embed_size)
        self.gpool = GPO(32, 32)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=tokens, attention_mask=(tokens != 0).long()).last_hidden_state
        return l2norm(self.gpool(self.linear(hidden), lengths.to(tokens.device)))


class BiGRUTextEncoder(nn.Module):
    """Word embedding -> bidirectional GRU (directions averaged) -> GPO -> l2norm."""

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim)
        self.rnn = nn.GRU(word_dim, embed_size, num_layers, batch_first=True, bidirectional=True)
        self.gpool = GPO(32, 32)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = pack_padded_sequence(self.embed(tokens), lengths.long().cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        half = out.shape[2] // 2
        out = (out[:, :, :half] + out[:, :, half:]) / 2
        return l2norm(self.gpool(out, lengths.to(tokens.device)))


TextEncoder = BertTextEncoder | BiGRUTextEncoder
