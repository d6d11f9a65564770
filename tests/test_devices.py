"""One --device vocabulary (auto|cpu|cuda|cuda:N) for every command, checked without torch."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from shnet.cli import main
from shnet.devices import autocast, check_device_name, extract_device, place_model, resolve_device
from shnet.errors import ShnetError

NO_GPU = not torch.cuda.is_available()


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_the_vocabulary(name):
    assert check_device_name(name) == name


@pytest.mark.parametrize("name", ["gpu", "CPU", "cuda:", "cuda:x", "mps", "cuda:0 ", ""])
def test_other_names_refused_with_the_vocabulary(name):
    with pytest.raises(ShnetError, match=r"not a device name; use auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_names_and_option_callback_import_no_torch():
    code = "import sys, shnet.devices as d; d.check_device_name('cuda:1'); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_auto_and_cpu_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert extract_device("cpu", local=True) == "cpu"
    assert extract_device("auto", local=True) == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_one_clear_error(name):
    with pytest.raises(ShnetError, match=rf"--device {name}: no usable CUDA device here \(torch .*\); use --device cpu"):
        resolve_device(name)
    with pytest.raises(ShnetError, match="no usable CUDA device here"):
        place_model(torch.nn.Linear(2, 2), name)


def test_a_placed_model_runs_channels_last_on_the_cpu_with_the_contiguous_results_whatever_the_batch():
    from shnet.pipeline.models.grid import build_grid_backbone

    backbone = build_grid_backbone("resnet18", "random").train()
    generator = torch.Generator().manual_seed(0)
    for bn in (m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # statistics that are not the identity
        for tensor, low, high in ((bn.running_mean, -0.2, 0.2), (bn.running_var, 0.5, 1.5), (bn.weight.data, 0.5, 1.5), (bn.bias.data, -0.2, 0.2)):
            tensor.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    contiguous = copy.deepcopy(backbone).eval()
    placed = place_model(backbone, "cpu")
    convs = [m for m in placed.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not placed.training and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images = torch.randn(3, 3, 256, 256, generator=generator)
    with torch.inference_mode():
        batch, alone, expected = placed(images), placed(images[1:2]), contiguous(images)
    assert torch.equal(batch[1:2], alone)
    assert ((batch - expected).norm() / expected.norm()).item() < 1e-5  # float rounding of another kernel


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_extract_cuda_checked_here_when_local_and_by_the_workers_otherwise():
    with pytest.raises(ShnetError, match="--device cuda: no usable CUDA device here"):
        extract_device("cuda", local=True)
    assert extract_device("cuda", local=False) == "cuda"


@pytest.mark.skipif(NO_GPU, reason="needs a GPU")
def test_a_gpu_index_past_the_last_is_refused():
    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(ShnetError, match=rf"this machine has {count} GPU\(s\)"):
        resolve_device(f"cuda:{count}")


def test_extract_refuses_a_gpu_index_with_what_to_do_instead(tmp_path):
    with pytest.raises(ShnetError, match=r"CUDA_VISIBLE_DEVICES=1 and --device cuda"):
        extract_device("cuda:1", local=True)
    result = CliRunner().invoke(main, ["extract", str(tmp_path), "-o", str(tmp_path / "cache"), "--device", "cuda:1"])
    assert result.exit_code == 1 and "CUDA_VISIBLE_DEVICES=1" in result.output, result.output
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", [["extract", "IMAGES", "-o", "CACHE"], ["train", "-o", "RUN", "--cache", "CACHE"], ["evaluate", "RUN"], ["encode", "RUN", "--cache", "C", "-o", "O"], ["search", "STORE", "a dog"]])
def test_every_command_takes_the_one_vocabulary(command):
    result = CliRunner().invoke(main, [*command, "--device", "gpu"])
    assert result.exit_code == 2 and "Invalid value for '--device': not a device name; use auto, cpu, cuda or cuda:N" in result.output, result.output


def test_autocast_only_on_cuda():
    with autocast("cpu", "float16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    if not NO_GPU:
        with autocast(torch.device("cuda"), "bfloat16"):
            assert torch.ones(2, 2, device="cuda").matmul(torch.ones(2, 2, device="cuda")).dtype == torch.bfloat16
