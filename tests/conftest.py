"""Shared fixtures: real photos (shipped inside scikit-image / scikit-learn), odd files, and the one
``extract`` helper every test file runs `shnet extract` through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

IN_PROCESS = ["--scheduler", "in-process"]


def pytest_configure(config):
    """In each pytest-xdist worker, torch's intra-op threads are that worker's share of the cores, so
    that the workers together never run more threads than there are cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(workers)))


def run_extract_cli(*args, ok: bool = True, cluster: bool = False, torch_threads: int = 1):
    """`shnet extract ARGS` through the command line, in this process (Click's runner).

    Its tasks run in-process (``--scheduler in-process``) unless ``cluster``: a test about the cache's
    content needs no Dask cluster, and starting one costs seconds; the tests of Dask itself (kills,
    lost workers, an external scheduler) pass ``cluster=True`` and their ``--workers``. In-process
    tasks use ``torch_threads`` intra-op threads: one by default, since the test models are tiny and
    on a busy machine more threads than free cores cost 5x. ``ok``: the run must succeed (exit code
    0); otherwise the result is returned as it is.
    """
    import torch

    from shnet.cli import main

    command = ["extract", *map(str, args), *([] if cluster else IN_PROCESS)]
    previous = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        result = CliRunner().invoke(main, command, catch_exceptions=False)
    finally:
        torch.set_num_threads(previous)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="session")
def extract():
    """:func:`run_extract_cli`, for tests and fixtures of any scope."""
    return run_extract_cli


def _photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_image

    return {
        "animals/chelsea": skimage.data.chelsea(),
        "animals/astronaut": skimage.data.astronaut(),
        "things/coffee": skimage.data.coffee(),
        "things/rocket": skimage.data.rocket(),
        "places/china": load_sample_image("china.jpg"),
        "places/flower": load_sample_image("flower.jpg"),
        "gray/camera": skimage.data.camera(),
    }


def write_photos(folder: Path, max_side: int = 160) -> list[str]:
    """Real photos, shrunk to ``max_side`` for speed, as JPEG (one PNG); returns their image_ids."""
    ids = []
    for image_id, pixels in _photos().items():
        image = Image.fromarray(pixels)
        image.thumbnail((max_side, max_side))
        suffix = ".png" if image_id.startswith("gray/") else ".jpg"
        path = folder / f"{image_id}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
        ids.append(image_id)
    return sorted(ids)


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files that cannot be decoded, with the image_id each will get."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not-an-image.jpg").write_text("this is text, not pixels\n")
    good = folder / "_full.jpg"
    Image.fromarray((np.random.default_rng(0).random((96, 128, 3)) * 255).astype(np.uint8)).save(good, quality=95)
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    good.unlink()
    return {"bad/empty": "empty", "bad/not-an-image": "not an image", "bad/truncated": "truncated"}


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_photos(folder)
    return folder


@pytest.fixture(scope="session")
def mixed_dir(tmp_path_factory) -> Path:
    """Real photos plus three undecodable files under bad/."""
    folder = tmp_path_factory.mktemp("mixed")
    write_photos(folder)
    write_bad_files(folder / "bad")
    return folder


@pytest.fixture(scope="module")
def single_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine they lose 10x."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
