"""Grid-feature backbones: shapes, local checkpoint loading (and its refusals), preprocessing."""

import importlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shnet.errors import CheckpointMismatchError, ShnetError
from shnet.pipeline.models.grid import IMAGENET_MEAN, IMAGENET_STD, build_grid_backbone, preprocess

# importable only once shnet.pipeline.models ran (see shnet.torchvision_compat): kept out of the
# import block so that sorting it cannot move them first
timm = importlib.import_module("timm")
torchvision = importlib.import_module("torchvision")


def _randomise_batchnorm_stats(model: torch.nn.Module) -> None:
    """Non-trivial running statistics, so a checkpoint that skipped them would not reproduce outputs."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _torchvision_resnet(arch: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(weights=None)
    _randomise_batchnorm_stats(model)
    return model.eval()


def _torchvision_features(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # everything before avgpool and fc
    with torch.no_grad():
        return trunk(images)


def _features(backbone, images):
    with torch.no_grad():
        return backbone(images)


def test_resnet50_grid_has_stride_32_and_2048_channels():
    backbone = build_grid_backbone("resnet50", "random")
    assert (backbone.name, backbone.channels, backbone.stride) == ("resnet50", 2048, 32)
    assert (backbone.mean, backbone.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not backbone.training
    assert _features(backbone, torch.zeros(2, 3, 64, 96)).shape == (2, 2048, 2, 3)
    assert _features(backbone, torch.zeros(1, 3, 70, 100)).shape == (1, 2048, 3, 4)  # ceil(70/32), ceil(100/32)


def test_timm_grid_uses_forward_features_and_pretrained_cfg_statistics():
    backbone = build_grid_backbone("timm:resnet18", "random")
    cfg = timm.create_model("resnet18", pretrained=False).pretrained_cfg
    assert (backbone.channels, backbone.stride) == (512, 32)
    assert backbone.mean == tuple(cfg["mean"]) and backbone.std == tuple(cfg["std"])
    assert _features(backbone, torch.zeros(1, 3, 96, 64)).shape == (1, 512, 3, 2)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = build_grid_backbone("resnet18", "random")
    assert torch.equal(torch.rand(3), expected_next)
    second = build_grid_backbone("resnet18", "random")
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(_features(first, images), _features(second, images))


@pytest.mark.parametrize(
    "arch, suffix, wrap",
    [("resnet18", ".pth", True), ("resnet34", ".safetensors", False)],
    ids=["resnet18-pth-DataParallel-wrapped", "resnet34-safetensors"],
)
def test_torchvision_checkpoint_reproduces_the_model_features(tmp_path, arch, suffix, wrap):
    reference = _torchvision_resnet(arch)
    state = reference.state_dict()
    assert any(key.startswith("fc.") for key in state)
    path = tmp_path / f"{arch}{suffix}"
    if wrap:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    backbone = build_grid_backbone(arch, str(path))
    images = torch.randn(2, 3, 64, 96)
    assert torch.equal(_features(backbone, images), _torchvision_features(reference, images))


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    reference = _torchvision_resnet("resnet18")
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    backbone = build_grid_backbone("resnet18", str(tmp_path / "old.pth"))
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(_features(backbone, images), _torchvision_features(reference, images))


def test_timm_checkpoint_with_classifier_reproduces_forward_features(tmp_path):
    torch.manual_seed(2)
    reference = timm.create_model("resnet18", pretrained=False).eval()  # 1000-class fc included
    _randomise_batchnorm_stats(reference)
    save_file(reference.state_dict(), str(tmp_path / "model.safetensors"))

    backbone = build_grid_backbone("timm:resnet18", str(tmp_path))  # a Hugging Face style model folder
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(_features(backbone, images), reference.forward_features(images))


def test_renamed_key_is_named_with_the_file(tmp_path):
    state = _torchvision_resnet("resnet18").state_dict()
    state["layer1.0.conv_one.weight"] = state.pop("layer1.0.conv1.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        build_grid_backbone("resnet18", str(path))
    message = str(error.value)
    assert str(path) in message
    assert "layer1.0.conv1.weight" in message and "layer1.0.conv_one.weight" in message


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    state = _torchvision_resnet("resnet18").state_dict()
    state["layer4.1.bn2.weight"] = torch.ones(256)
    path = tmp_path / "reshaped.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"layer4\.1\.bn2\.weight: model \(512,\) vs file \(256,\)") as error:
        build_grid_backbone("resnet18", str(path))
    assert str(path) in str(error.value)


def test_other_architecture_checkpoint_is_refused(tmp_path):
    torch.save(_torchvision_resnet("resnet18").state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointMismatchError, match="layer1.0.conv3.weight"):
        build_grid_backbone("resnet50", str(tmp_path / "r18.pth"))


def test_missing_weights_tell_the_user_what_to_pass():
    with pytest.raises(ShnetError, match=r"--set grid\.weights=/path/to/file\.pth") as error:
        build_grid_backbone("resnet152", None)
    assert "random" in str(error.value)


def test_unknown_model_lists_the_supported_names():
    with pytest.raises(ShnetError) as error:
        build_grid_backbone("resnet999", "random")
    message = str(error.value)
    assert "resnet999" in message and "resnext101_32x8d" in message and "timm:<name>" in message
    with pytest.raises(ShnetError, match="timm has no model named 'not_a_net'"):
        build_grid_backbone("timm:not_a_net", "random")


def test_timm_model_without_a_spatial_map_is_refused():
    with pytest.raises(ShnetError, match="not a spatial feature map"):
        build_grid_backbone("timm:vit_tiny_patch16_224", "random")


def test_pad_puts_the_image_top_left_and_counts_covered_cells():
    landscape = np.zeros((100, 200, 3), np.uint8)
    landscape[..., 0] = 255
    out, valid = preprocess(landscape, 128, "pad", IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 128, 128) and out.dtype == np.float32
    assert valid == (2, 4)  # resized to 64x128: ceil(64/32) rows, 128/32 columns
    red = (np.array([1.0, 0.0, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(out[:, :64, :].reshape(3, -1).T, np.broadcast_to(red, (64 * 128, 3)), rtol=1e-6)
    assert not out[:, 64:, :].any()

    portrait = np.full((300, 100, 3), 128, np.uint8)
    out, valid = preprocess(portrait, 96, "pad", IMAGENET_MEAN, IMAGENET_STD)
    assert valid == (3, 1)  # resized to 96x32
    assert out[:, :, :32].any() and not out[:, :, 32:].any()


def test_pad_with_partly_covered_cells_rounds_up():
    out, valid = preprocess(np.full((50, 100, 3), 10, np.uint8), 64, "pad", IMAGENET_MEAN, IMAGENET_STD)
    assert valid == (1, 2)  # 32x64 -> one row; a 33-row image would need two
    out, valid = preprocess(np.full((66, 100, 3), 10, np.uint8), 64, "pad", IMAGENET_MEAN, IMAGENET_STD)
    assert valid == (2, 2)  # 42 rows


def test_stretch_fills_the_square():
    image = np.random.default_rng(0).integers(0, 256, (37, 91, 3), dtype=np.uint8)
    out, valid = preprocess(image, 64, "stretch", IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 64, 64) and valid == (2, 2)
    flat = np.full((37, 91, 3), 200, np.uint8)
    out, _ = preprocess(flat, 64, "stretch", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    np.testing.assert_allclose(out, (200 / 255 - 0.5) / 0.25, rtol=1e-6)


def test_unknown_preprocess_mode_is_refused():
    with pytest.raises(ShnetError, match="stretch, pad"):
        preprocess(np.zeros((8, 8, 3), np.uint8), 32, "crop", IMAGENET_MEAN, IMAGENET_STD)
