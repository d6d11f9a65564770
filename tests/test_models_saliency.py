"""Saliency networks: spectral residual (weights-free) and MSI-Net (architecture, weights, preprocessing)."""

import importlib

import cv2
import numpy as np
import pytest
import skimage.data
import torch

from shnet.errors import CheckpointMismatchError, ShnetError
from shnet.pipeline.models.msinet import (
    INPUT_SIZE,
    PAD_VALUE,
    REFERENCE_LAYER_NAMES,
    REFERENCE_MEAN,
    TORCHVISION_VGG_MEAN,
    MSINet,
    PadBox,
    _upsample2x,
    convert_reference_variables,
    load_msinet,
    preprocess,
    restore_map,
)
from shnet.pipeline.models.saliency_spectral import spectral_residual_saliency

# importable only once shnet.pipeline.models ran (see shnet.torchvision_compat): kept out of the
# import block so that sorting it cannot move it first
torchvision = importlib.import_module("torchvision")


# --- spectral residual ------------------------------------------------------------------------


@pytest.mark.parametrize("photo, out_size", [(skimage.data.astronaut, (64, 64)), (skimage.data.coffee, (30, 50))])
def test_spectral_residual_on_a_photo_is_a_deterministic_unit_range_map(photo, out_size):
    image = photo()
    saliency = spectral_residual_saliency(image, out_size)
    assert saliency.shape == out_size and saliency.dtype == np.float32
    assert np.isfinite(saliency).all()
    assert saliency.min() == 0.0 and saliency.max() == pytest.approx(1.0)
    assert np.array_equal(saliency, spectral_residual_saliency(image, out_size))


@pytest.mark.parametrize("centre", [(60, 240), (180, 70), (120, 160)])
def test_spectral_residual_peaks_on_a_bright_blob(centre):
    image = np.full((240, 320, 3), 90, np.uint8)
    cy, cx = centre
    cv2.circle(image, (cx, cy), 14, (250, 250, 250), -1)
    saliency = spectral_residual_saliency(image, (120, 160))
    peak = np.unravel_index(saliency.argmax(), saliency.shape)
    assert np.hypot(peak[0] * 2 - cy, peak[1] * 2 - cx) < 20
    # the flat background far from the blob is not salient
    far = np.hypot(*np.meshgrid(np.arange(120) * 2 - cy, np.arange(160) * 2 - cx, indexing="ij")) > 80
    assert saliency[far].mean() < 0.1


def test_spectral_residual_of_a_flat_image_is_zero_not_nan():
    saliency = spectral_residual_saliency(np.full((50, 70, 3), 128, np.uint8), (20, 30))
    assert saliency.shape == (20, 30) and not saliency.any()


# --- MSI-Net architecture ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def msinet():
    torch.manual_seed(0)
    return MSINet().eval()


def test_msinet_has_the_published_size(msinet):
    # VGG-16 convs 14,714,688 + ASPP 9,831,936 (five 1280->256 branches, 1280->256 fusion) + decoder 387,585
    assert sum(p.numel() for p in msinet.parameters()) == 24_934_209
    assert [msinet.context.conv_rate4.dilation, msinet.context.conv_rate8.dilation, msinet.context.conv_rate12.dilation] == [
        (4, 4),
        (8, 8),
        (12, 12),
    ]
    assert msinet.encoder.conv5_1.dilation == (2, 2) and msinet.encoder.conv4_3.dilation == (1, 1)


def test_msinet_encoder_keeps_one_eighth_resolution(msinet):
    with torch.no_grad():
        features = msinet.encoder(torch.rand(1, 3, 48, 64))
    assert features.shape == (1, 256 + 512 + 512, 6, 8)


def test_msinet_output_is_a_normalised_map_at_input_size(msinet):
    images = torch.rand(2, 3, 48, 64) * 255
    with torch.no_grad():
        saliency = msinet(images)
    assert saliency.shape == (2, 1, 48, 64) and saliency.dtype == torch.float32
    flat = saliency.flatten(1)
    assert torch.all(flat.min(1).values == 0)
    assert torch.allclose(flat.max(1).values, torch.ones(2), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(msinet(images[1:]), saliency[1:], atol=1e-5)  # normalised per image, not per batch


def test_msinet_refuses_sizes_that_are_not_multiples_of_8(msinet):
    with pytest.raises(ValueError, match="multiple of 8"):
        msinet(torch.zeros(1, 3, 50, 64))


def test_upsampling_matches_tensorflow1_resize_bilinear():
    x = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 1, 3)
    assert _upsample2x(x).tolist() == [[[[1.0, 1.5, 2.0, 3.0, 4.0, 4.0]] * 2]]


# --- MSI-Net weights --------------------------------------------------------------------------


def test_msinet_state_dict_round_trip_is_exact(tmp_path, msinet):
    torch.save(msinet.state_dict(), tmp_path / "msinet.pth")
    loaded = load_msinet(tmp_path / "msinet.pth")
    assert not loaded.training
    images = torch.rand(1, 3, 32, 40) * 255
    with torch.no_grad():
        assert torch.equal(loaded(images), msinet(images))
    assert loaded.input_mean.tolist() == pytest.approx(REFERENCE_MEAN)


def test_msinet_mismatches_are_named_with_the_file(tmp_path, msinet):
    state = dict(msinet.state_dict())
    state["context.conv_rate16.weight"] = state.pop("context.conv_rate12.weight")
    state["decoder.conv2.bias"] = torch.zeros(65)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError) as error:
        load_msinet(path)
    message = str(error.value)
    assert str(path) in message
    assert "context.conv_rate12.weight" in message and "context.conv_rate16.weight" in message
    assert "decoder.conv2.bias: model (64,) vs file (65,)" in message


def _vgg16_features_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    return {f"features.{k}": v for k, v in features.state_dict().items()}


def test_from_vgg16_maps_torchvision_features_onto_the_encoder(tmp_path):
    state = _vgg16_features_state()
    state["classifier.6.weight"] = torch.zeros(10, 4096)  # a head to ignore
    torch.save(state, tmp_path / "vgg16.pth")
    model = MSINet.from_vgg16(tmp_path / "vgg16.pth")
    assert torch.equal(model.encoder.conv1_1.weight, state["features.0.weight"])
    assert torch.equal(model.encoder.conv5_3.bias, state["features.28.bias"])
    assert model.input_mean.tolist() == pytest.approx(TORCHVISION_VGG_MEAN)

    vgg = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    vgg.load_state_dict({k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")})
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x)[:, :256], vgg[:17](x))  # through pool3, unchanged from VGG-16


def test_from_vgg16_refuses_a_batchnorm_vgg(tmp_path):
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16_bn.pth")
    with pytest.raises(CheckpointMismatchError) as error:
        MSINet.from_vgg16(tmp_path / "vgg16_bn.pth")
    message = str(error.value)
    assert "vgg16_bn.pth" in message and "features.1.running_mean" in message
    assert "features.7.weight: model (128, 128, 3, 3) vs file (128, 64, 3, 3)" in message


def test_reference_tensorflow_variables_convert_to_an_equivalent_model(msinet):
    ours = msinet.state_dict()
    variables = {}
    for tf_name, name in REFERENCE_LAYER_NAMES.items():
        variables[f"{tf_name}/kernel"] = ours[f"{name}.weight"].permute(2, 3, 1, 0).numpy()  # TF [kh, kw, in, out]
        variables[f"{tf_name}/bias"] = ours[f"{name}.bias"].numpy()
    converted = MSINet()
    converted.load_state_dict(convert_reference_variables(variables), strict=True)
    images = torch.rand(1, 3, 24, 32) * 255
    with torch.no_grad():
        assert torch.equal(converted.eval()(images), msinet(images))

    del variables["aspp/conv1_5/kernel"]
    with pytest.raises(ShnetError, match="aspp/conv1_5/kernel"):
        convert_reference_variables(variables)


# --- MSI-Net preprocessing --------------------------------------------------------------------


def test_preprocess_fits_centres_and_pads_like_the_reference():
    image = np.full((100, 400, 3), 200, np.uint8)
    pixels, box = preprocess(image)
    assert pixels.shape == (3, *INPUT_SIZE) and pixels.dtype == np.float32
    assert box == PadBox(top=80, left=0, height=80, width=320)
    assert np.all(pixels[:, :80] == PAD_VALUE) and np.all(pixels[:, 160:] == PAD_VALUE)
    np.testing.assert_allclose(pixels[:, 80:160], 200.0, atol=1e-3)

    pixels, box = preprocess(np.zeros((30, 30, 3), np.uint8), (48, 64))  # enlarged, centred horizontally
    assert box == PadBox(top=0, left=8, height=48, width=48)
    assert np.all(pixels[:, :, :8] == PAD_VALUE) and np.all(pixels[:, :, 8:56] == 0.0)


def test_restore_map_crops_the_padding_and_resizes():
    saliency = np.zeros(INPUT_SIZE, np.float32)
    box = PadBox(top=80, left=0, height=80, width=320)
    saliency[80:160, :160] = 1.0  # left half of the image region
    restored = restore_map(saliency, box, (100, 400))
    assert restored.shape == (100, 400) and restored.dtype == np.float32
    assert restored[:, :190].min() == 1.0 and restored[:, 210:].max() == 0.0


def test_preprocess_refuses_sizes_the_network_cannot_take():
    with pytest.raises(ShnetError, match="multiple of 8"):
        preprocess(np.zeros((10, 10, 3), np.uint8), (100, 100))
