"""shnet.weights: local weights files in every supported format, read without running pickled code,
unwrapped, and loaded strictly with every mismatch named."""

from __future__ import annotations

import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shnet.errors import CheckpointMismatchError, ShnetError
from shnet.weights import load_state_strict, load_weights_file, read_state_dict, weights_identity


def small_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_format_reads_the_same_tensors(tmp_path):
    state = small_state()
    torch.save(state, tmp_path / "w.pth")
    save_file(state, str(tmp_path / "w.safetensors"))
    with open(tmp_path / "w.pkl", "wb") as fh:
        pickle.dump({"model": {k: v.numpy() for k, v in state.items()}, "__author__": "d2"}, fh)
    (tmp_path / "hf").mkdir()
    save_file(state, str(tmp_path / "hf" / "model.safetensors"))
    for name in ("w.pth", "w.safetensors", "w.pkl", "hf"):
        assert same(read_state_dict(tmp_path / name), state), name


def test_wrappers_and_prefixes_come_off(tmp_path):
    state = small_state()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "wrapped.pth")
    assert same(read_state_dict(tmp_path / "wrapped.pth"), state)
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "empty.pth")
    with pytest.raises(ShnetError, match="holds no tensors by name"):
        read_state_dict(tmp_path / "empty.pth")


class Payload:
    def __reduce__(self):
        return (os.system, ("echo never",))


def test_pickled_code_is_never_run(tmp_path):
    with open(tmp_path / "evil.pkl", "wb") as fh:
        pickle.dump({"model": Payload()}, fh)
    with pytest.raises(ShnetError, match="refusing to unpickle .*system"):
        load_weights_file(tmp_path / "evil.pkl")
    torch.save({"weight": torch.ones(1), "payload": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ShnetError, match="Python objects of .*system.*shnet never runs code"):
        load_weights_file(tmp_path / "evil.pth")


def test_missing_empty_and_special_files_named(tmp_path):
    with pytest.raises(ShnetError, match="weights not found: .*nothing is downloaded"):
        load_weights_file(tmp_path / "absent.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ShnetError, match="the file is empty"):
        load_weights_file(tmp_path / "empty.pth")
    with pytest.raises(ShnetError, match="not a regular file"):
        weights_identity("/dev/null")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ShnetError, match="needs model.safetensors or pytorch_model.bin"):
        load_weights_file(tmp_path / "folder")


def test_identity_is_the_content_hash(tmp_path):
    torch.save(small_state(), tmp_path / "w.pth")
    data = (tmp_path / "w.pth").read_bytes()
    assert weights_identity(tmp_path / "w.pth") == hashlib.sha256(data).hexdigest()
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "b.json").write_text("{}")
    (tmp_path / "hf" / "a.bin").write_bytes(data)
    assert weights_identity(tmp_path / "hf") == hashlib.sha256(data + b"{}").hexdigest()
    assert weights_identity("random") == "random-init" and weights_identity(None) == ""


def test_strict_loading_names_every_mismatch():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    good = {f"0.{k}": v for k, v in small_state().items()}
    load_state_strict(model, good, "good.pth")
    assert torch.equal(model[0].weight, good["0.weight"])
    bad = {"0.weight": torch.zeros(4, 3), "0.extra": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_strict(model, bad, "bad.pth")
    message = str(info.value)
    assert message.startswith("bad.pth does not match Sequential")
    for line in ("missing from the file (1):\n  0.bias", "not used by the model (1):\n  0.extra", "0.weight: model (2, 3) vs file (4, 3)"):
        assert line in message
