"""Weights from local files, loaded without executing untrusted code, matched to models by name.

Supported: ``.pth``/``.pt``/``.bin``/``.ckpt`` (torch weights-only unpickling), ``.safetensors``,
detectron2-style ``.pkl`` (a restricted unpickler that admits numpy arrays and plain containers
only), and Hugging Face model folders (``model.safetensors`` or ``pytorch_model.bin``). A file's
wrapper (``{"state_dict": ...}``, ``{"model": ...}``, a ``module.`` prefix) is taken off by
:func:`read_state_dict`; :func:`load_state_strict` loads a model requiring every name used and every
shape equal, naming each mismatch. What a network calls its parameters stays with the network (the
detector's two namings: :mod:`shnet.pipeline.models.butd.weights`); a shnet training run's own
checkpoint format is :mod:`shnet.trainer.checkpoint`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from stat import S_ISREG
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointMismatchError, ShnetError
from .fileio import content_sha256

_WRAPPER_KEYS = ("state_dict", "model")
_WRAPPER_PREFIXES = ("module.", "model.")


def regular_file(path: Path) -> Path:
    """``path`` when it is a non-empty regular file: a device (/dev/zero), a FIFO or a socket given
    as weights would be read forever or block, so they are refused before any read."""
    info = path.stat()
    if not S_ISREG(info.st_mode):
        raise ShnetError(f"{path}: not a regular file (a device, FIFO or socket); give a weights file or a model folder")
    if info.st_size == 0:
        raise ShnetError(f"{path}: the file is empty; copy the weights file again")
    return path


def weights_identity(weights: str | Path | None) -> str:
    """What identifies a stage's weights in its config: the file's sha256, ``random-init``, or ``""``."""
    if weights is None:
        return ""
    if weights == "random":
        return "random-init"
    if not Path(weights).expanduser().exists():
        raise ShnetError(f"weights not found: {weights} (weights are read from local files only; nothing is downloaded)")
    path = Path(weights).expanduser()
    return content_sha256(path if path.is_dir() else regular_file(path))


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Admits numpy arrays/scalars and builtin containers; refuses every other global."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy"):
                import importlib

                return getattr(importlib.import_module(module), name)
            if module == "collections":
                import collections

                return getattr(collections, name)
            import builtins

            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays and plain containers are allowed")


def load_pickle_arrays(path: str | Path):
    """Load a ``.pkl`` holding numpy arrays in plain containers (the detectron2 model-zoo format)."""
    with open(regular_file(Path(path)), "rb") as fh:
        data = fh.read()
    try:
        return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ShnetError(f"{path}: not a weights pickle shnet can read safely ({exc})") from exc


def load_weights_file(path: str | Path, extra_safe_globals: tuple = ()) -> object:
    """Load the raw object stored in a local weights file, never executing arbitrary pickled code."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ShnetError(f"weights not found: {path} (weights are read from local files only; nothing is downloaded)")
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return load_weights_file(path / name)
        raise ShnetError(f"{path}: a model folder needs model.safetensors or pytorch_model.bin")
    regular_file(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for damaged files
            raise ShnetError(f"{path}: not a readable .safetensors file ({str(exc).splitlines()[0]}); copy or save it again") from exc
    if suffix == ".pkl":
        return load_pickle_arrays(path)
    import torch

    try:
        if extra_safe_globals:
            with torch.serialization.safe_globals(list(extra_safe_globals)):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file fails torch.load in many ways (struct.error for 4 bytes)
        raise ShnetError(f"{path}: {describe_unloadable(path)}") from exc


_TENSOR_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "builtins.", "_codecs.encode", "numpy.")


def describe_unloadable(path: str | Path) -> str:
    """What a file that torch's weights-only loader refused actually is, in shnet's words."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        return "the file is empty; copy the weights file again"
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return "a truncated or damaged torch checkpoint (its zip archive is incomplete); copy or save it again"
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                return "a zip archive, but not a torch checkpoint (it has no data.pkl)"
            payload = archive.read(names[0])
    elif head[:1] == b"\x80":
        payload = path.read_bytes()
    else:
        return (
            f"not a checkpoint: neither a torch file, a pickle nor .safetensors (it starts with bytes {head.hex(' ')}); "
            "give a .pth/.pt state dict, a .safetensors file, a detectron2 .pkl or a Hugging Face model folder"
        )
    try:
        classes = sorted({g for g in _pickle_globals(payload) if not g.startswith(_TENSOR_GLOBAL_PREFIXES)})
    except Exception:  # noqa: BLE001 - any parse failure means the pickle stream is cut short or damaged
        return "a truncated or damaged pickle; copy or save the file again"
    if classes:
        return (
            f"a pickle holding Python objects of {', '.join(classes[:8])}{' ...' if len(classes) > 8 else ''} beside "
            "its tensors; shnet never runs code from weights files, so it refuses it: save the weights alone "
            "(torch.save(model.state_dict(), 'weights.pth')) or as .safetensors"
        )
    return "a pickle that torch's weights-only loader cannot read; save the weights alone as a state dict or .safetensors"


def _pickle_globals(payload: bytes) -> list[str]:
    """The ``module.name`` of every class or function a pickle stream refers to (without loading it)."""
    found, strings = [], []
    for opcode, arg, _ in pickletools.genops(payload):
        if opcode.name in ("GLOBAL", "INST"):
            found.append(arg.replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        if isinstance(arg, str):
            strings.append(arg)
    return found


def to_tensor_dict(state: Mapping) -> dict[str, torch.Tensor]:
    """Tensors (numpy arrays converted) of a flat state mapping; non-array entries dropped."""
    import torch

    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray):
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (e.g. ``module.`` from DataParallel checkpoints)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def mismatch_report(expected: Mapping[str, torch.Tensor], loaded: Mapping[str, torch.Tensor]) -> list[str]:
    """Lines naming every missing key, unexpected key and shape mismatch (empty when they match)."""
    lines = []
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    shapes = [
        f"  {k}: model {tuple(expected[k].shape)} vs file {tuple(loaded[k].shape)}"
        for k in expected
        if k in loaded and tuple(expected[k].shape) != tuple(loaded[k].shape)
    ]
    if missing:
        lines.append(f"missing from the file ({len(missing)}):")
        lines += [f"  {k}" for k in missing[:50]] + ([f"  ... and {len(missing) - 50} more"] if len(missing) > 50 else [])
    if unexpected:
        lines.append(f"not used by the model ({len(unexpected)}):")
        lines += [f"  {k}" for k in unexpected[:50]] + ([f"  ... and {len(unexpected) - 50} more"] if len(unexpected) > 50 else [])
    if shapes:
        lines.append(f"shape mismatches ({len(shapes)}):")
        lines += shapes
    return lines


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring every key used and every shape equal; otherwise raise
    :class:`CheckpointMismatchError` with the full report, naming ``source``."""
    expected = module.state_dict()
    report = mismatch_report(expected, state)
    if report:
        raise CheckpointMismatchError(f"{source} does not match {type(module).__name__}:\n" + "\n".join(report))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, unwrapped from a ``{"state_dict": ...}`` or ``{"model": ...}``
    training checkpoint and from a ``module.`` (DataParallel) or ``model.`` prefix on every key."""
    obj = load_weights_file(path)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    state = to_tensor_dict(obj) if isinstance(obj, Mapping) else {}
    if not state:
        raise ShnetError(f"{path}: holds no tensors by name; expected a model state dict")
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = strip_prefix(state, prefix)
    return state
