"""Image discovery and robust decoding, on real photos and on odd files made with Pillow."""

import io
import shutil
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from skimage import data as skimage_data
from sklearn.datasets import load_sample_images

from shnet.data import sample_images_dir
from shnet.errors import ImageDecodeError, ShnetError
from shnet.pipeline.images import IMAGE_EXTENSIONS, decode_image, discover_images, image_size

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture
def china_jpeg(tmp_path) -> Path:
    """A real camera JPEG (scikit-learn's china.jpg, 640x427)."""
    source = next(name for name in load_sample_images().filenames if name.endswith("china.jpg"))
    return Path(shutil.copy(source, tmp_path / "china.jpg"))


def pillow_rgb(path) -> np.ndarray:
    """What Pillow decodes, ignoring EXIF orientation: the reference for lossy formats."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def save(array_or_image, path, **params) -> Path:
    image = array_or_image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    image.save(path, **params)
    return Path(path)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# ---- decoding: ordinary files ------------------------------------------------------------------


def test_real_jpeg_decodes_to_rgb_uint8(china_jpeg):
    pixels = decode_image(china_jpeg)
    assert pixels.dtype == np.uint8 and pixels.shape == (427, 640, 3)
    np.testing.assert_array_equal(pixels, pillow_rgb(china_jpeg))
    assert image_size(china_jpeg) == (640, 427)


@pytest.mark.parametrize("suffix, params", [
    (".png", {}), (".bmp", {}), (".tiff", {}), (".ppm", {}), (".webp", {"lossless": True}),
])
def test_lossless_round_trips(tmp_path, astronaut, suffix, params):
    path = save(astronaut, tmp_path / f"astronaut{suffix}", **params)
    np.testing.assert_array_equal(decode_image(path), astronaut)
    assert image_size(path) == (512, 512)


def test_uppercase_extension_and_lossy_webp(tmp_path, astronaut):
    path = save(astronaut, tmp_path / "astronaut.WEBP", quality=90)
    pixels = decode_image(path)
    assert pixels.shape == (512, 512, 3)
    assert np.abs(pixels.astype(int) - astronaut).mean() < 4


def test_grayscale_becomes_three_equal_channels(tmp_path):
    camera = skimage_data.camera()
    for path in (save(camera, tmp_path / "camera.png"), save(camera, tmp_path / "camera.pgm")):
        pixels = decode_image(path)
        assert pixels.shape == (512, 512, 3)
        for channel in range(3):
            np.testing.assert_array_equal(pixels[:, :, channel], camera)


def test_one_bit_image(tmp_path):
    bits = np.zeros((8, 16), dtype=bool)
    bits[:, 8:] = True
    for suffix in (".png", ".pbm"):
        pixels = decode_image(save(bits, tmp_path / f"bits{suffix}"))
        assert set(np.unique(pixels[:, :8])) == {0} and set(np.unique(pixels[:, 8:])) == {255}


def test_cmyk_jpeg_comes_out_in_true_colours(tmp_path, astronaut):
    path = save(Image.fromarray(astronaut).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as image:
        assert image.mode == "CMYK"
    pixels = decode_image(path)
    assert pixels.shape == (512, 512, 3)
    assert np.abs(pixels.astype(int) - astronaut).mean() < 3  # an inverted decode would be ~100


# ---- decoding: high bit depth ------------------------------------------------------------------

RAMP_16 = np.linspace(0, 65535, 4 * 257).round().astype(np.uint16).reshape(4, 257)
RAMP_16[0, :3] = [0, 32768, 65535]
EXPECTED_8 = np.floor(RAMP_16 / 65535 * 255 + 0.5).astype(np.uint8)


@pytest.mark.parametrize("suffix, dtype, mode", [
    (".png", "<u2", "I;16"), (".tif", ">u2", "I;16B"), (".pgm", "<u2", "I"),
])
def test_sixteen_bit_gray_scales_by_bit_depth(tmp_path, suffix, dtype, mode):
    path = save(RAMP_16.astype(dtype), tmp_path / f"ramp{suffix}")
    with Image.open(path) as image:
        assert image.mode == mode
    pixels = decode_image(path)
    assert list(pixels[0, :3, 0]) == [0, 128, 255]
    for channel in range(3):
        np.testing.assert_array_equal(pixels[:, :, channel], EXPECTED_8)


def test_float_image_in_unit_range_scales_by_255(tmp_path):
    ramp = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    pixels = decode_image(save(ramp, tmp_path / "unit.tif"))
    np.testing.assert_array_equal(pixels[:, :, 0], np.round(ramp * 255).astype(np.uint8))


def test_float_image_of_any_range_spans_0_to_255(tmp_path):
    ramp = np.linspace(-3.0, 5.0, 256, dtype=np.float32).reshape(16, 16)
    pixels = decode_image(save(ramp, tmp_path / "wide.tif"))
    assert pixels[0, 0, 0] == 0 and pixels[-1, -1, 0] == 255
    assert np.all(np.diff(pixels[:, :, 0].ravel().astype(int)) >= 0)


# ---- decoding: palette and transparency ------------------------------------------------------


def test_palette_png_without_transparency(tmp_path, astronaut):
    palette_image = Image.fromarray(astronaut).quantize(64)
    pixels = decode_image(save(palette_image, tmp_path / "palette.png"))
    np.testing.assert_array_equal(pixels, np.asarray(palette_image.convert("RGB")))


def test_palette_png_transparent_index_becomes_white(tmp_path):
    indices = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255])
    path = save(image, tmp_path / "palette-transparent.png", transparency=0)
    pixels = decode_image(path)
    white, red, blue = [255, 255, 255], [255, 0, 0], [0, 0, 255]
    np.testing.assert_array_equal(pixels, [[white, red], [blue, white]])


def test_rgba_composites_over_white(tmp_path):
    rgba = np.array(
        [[[10, 20, 30, 0], [10, 20, 30, 255], [0, 0, 0, 128], [200, 100, 0, 64]]], dtype=np.uint8
    )
    pixels = decode_image(save(rgba, tmp_path / "alpha.png"))
    expected = [[[255, 255, 255], [10, 20, 30], [127, 127, 127], [241, 216, 191]]]
    np.testing.assert_array_equal(pixels, expected)


def test_gray_with_alpha_composites_over_white(tmp_path):
    gray_alpha = np.array([[[0, 0], [0, 255], [100, 255]]], dtype=np.uint8)
    image = Image.fromarray(gray_alpha, mode="LA")
    pixels = decode_image(save(image, tmp_path / "gray-alpha.png"))
    np.testing.assert_array_equal(pixels[0, :, 0], [255, 0, 100])


def test_real_photo_with_alpha_channel(tmp_path, astronaut):
    alpha = np.full(astronaut.shape[:2] + (1,), 255, dtype=np.uint8)
    alpha[:100] = 0
    path = save(np.concatenate([astronaut, alpha], axis=2), tmp_path / "astronaut-alpha.png")
    pixels = decode_image(path)
    assert np.all(pixels[:100] == 255)
    np.testing.assert_array_equal(pixels[100:], astronaut[100:])


# ---- decoding: multi-frame -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".gif", ".tiff"])
def test_multi_frame_files_give_the_first_frame(tmp_path, suffix):
    colours = ((255, 0, 0), (0, 255, 0), (0, 0, 255))
    frames = [Image.new("RGB", (20, 10), colour) for colour in colours]
    path = tmp_path / f"frames{suffix}"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with Image.open(path) as image:
        assert image.n_frames == 3
    pixels = decode_image(path)
    assert pixels.shape == (10, 20, 3)
    assert np.all(pixels == [255, 0, 0])


# ---- decoding: EXIF orientation --------------------------------------------------------------


def exif_with_orientation(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


@pytest.mark.parametrize("orientation, quarter_turns", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_is_applied(tmp_path, astronaut, orientation, quarter_turns):
    landscape = astronaut[:200, :320]
    path = save(landscape, tmp_path / f"rotated-{orientation}.jpg", quality=95,
                exif=exif_with_orientation(orientation))
    stored = pillow_rgb(path)
    assert stored.shape == (200, 320, 3)
    pixels = decode_image(path)
    np.testing.assert_array_equal(pixels, np.rot90(stored, k=quarter_turns))
    assert image_size(path) == (pixels.shape[1], pixels.shape[0])


def test_exif_orientation_in_png_before_and_after_the_pixels(tmp_path, astronaut):
    landscape = astronaut[:200, :320]
    before = save(landscape, tmp_path / "exif-first.png", exif=exif_with_orientation(6))
    after = tmp_path / "exif-last.png"
    after.write_bytes(append_exif_chunk(encode(landscape, "PNG"), orientation=6))
    for path in (before, after):
        np.testing.assert_array_equal(decode_image(path), np.rot90(landscape, k=-1))
        assert image_size(path) == (200, 320)


def test_image_size_reads_only_the_header(tmp_path, astronaut, no_pixel_decoding):
    landscape = astronaut[:200, :320]
    jpeg = save(landscape, tmp_path / "rotated.jpg", exif=exif_with_orientation(8))
    png = tmp_path / "exif-last.png"
    png.write_bytes(append_exif_chunk(encode(landscape, "PNG"), orientation=5))
    plain = tmp_path / "plain.webp"
    plain.write_bytes(encode(landscape, "WEBP"))
    assert image_size(jpeg) == (200, 320)
    assert image_size(png) == (200, 320)
    assert image_size(plain) == (320, 200)


def encode(array, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()


def append_exif_chunk(png: bytes, orientation: int) -> bytes:
    """Insert an eXIf chunk after the pixel data, just before IEND (Pillow writes it before)."""
    payload = b"eXIf" + exif_with_orientation(orientation).tobytes()[len(b"Exif\0\0"):]
    chunk = struct.pack(">I", len(payload) - 4) + payload + struct.pack(">I", zlib.crc32(payload))
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + chunk + png[iend:]


# ---- decoding: draft (reduced-scale JPEG decoding) -------------------------------------------


def test_draft_size_decodes_a_large_jpeg_at_reduced_scale(tmp_path, china_jpeg):
    with Image.open(china_jpeg) as image:
        large = save(image.resize((2560, 1708)), tmp_path / "large.jpg", quality=90)
    pixels = decode_image(large, draft_size=224)
    assert pixels.shape == (427, 640, 3)  # 1/4 scale: the largest whose shorter side is >= 224
    assert decode_image(large, draft_size=500).shape == (854, 1280, 3)
    assert decode_image(large, draft_size=2000).shape == (1708, 2560, 3)


def test_draft_size_keeps_orientation_and_ignores_other_formats(tmp_path, astronaut):
    jpeg = save(astronaut[:400, :], tmp_path / "rotated.jpg", exif=exif_with_orientation(6))
    assert decode_image(jpeg, draft_size=100).shape == (128, 100, 3)  # 512x400 at 1/4, upright
    png = save(astronaut, tmp_path / "astronaut.png")
    np.testing.assert_array_equal(decode_image(png, draft_size=100), astronaut)


# ---- decoding: failures ----------------------------------------------------------------------


def test_truncated_jpeg_fails_promptly(tmp_path, china_jpeg):
    content = china_jpeg.read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(content[: len(content) // 2])
    start = time.monotonic()
    with pytest.raises(ImageDecodeError, match="truncated or corrupt") as failure:
        decode_image(truncated)
    assert time.monotonic() - start < 2
    assert str(truncated) in str(failure.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_fails(tmp_path, astronaut):
    content = encode(astronaut, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        decode_image(truncated)


def test_zero_byte_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.touch()
    with pytest.raises(ImageDecodeError, match=r"empty \(0 bytes\)"):
        decode_image(empty)
    with pytest.raises(ImageDecodeError, match="empty"):
        image_size(empty)


def test_text_file_named_jpg(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("these are not pixels\n" * 20)
    with pytest.raises(ImageDecodeError, match="not an image") as failure:
        decode_image(text)
    assert str(text) in str(failure.value)


def test_unreadable_paths(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot read image .*missing.jpg"):
        decode_image(tmp_path / "missing.jpg")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    with pytest.raises(ImageDecodeError, match="cannot read image"):
        decode_image(folder)


def patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height (and its CRC), leaving the tiny pixel data as it is."""
    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_decompression_bomb_refused_from_the_header(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(patch_png_size(encode(np.zeros((4, 4, 3), np.uint8), "PNG"), 100_000, 100_000))
    start = time.monotonic()
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb)
    assert time.monotonic() - start < 1


def test_max_pixels_checked_before_any_pixel_is_decoded(tmp_path, no_pixel_decoding):
    # The header claims 3000x3000 but the data holds 4x4 pixels: decoding would fail as corrupt.
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(patch_png_size(encode(np.zeros((4, 4, 3), np.uint8), "PNG"), 3000, 3000))
    expected = "3000x3000 = 9000000 pixels exceeds the limit of 1000000"
    with pytest.raises(ImageDecodeError, match=expected):
        decode_image(bomb, max_pixels=1_000_000)


def test_max_pixels_on_a_real_photo(tmp_path, astronaut):
    path = save(astronaut, tmp_path / "astronaut.jpg")
    assert decode_image(path, max_pixels=512 * 512).shape == (512, 512, 3)
    with pytest.raises(ImageDecodeError, match="decompression-bomb guard"):
        decode_image(path, max_pixels=512 * 512 - 1)


def test_decode_errors_are_shnet_errors():
    assert issubclass(ImageDecodeError, ShnetError)


# ---- discovery -------------------------------------------------------------------------------


def write_image(path: Path, colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_format = Image.registered_extensions()[path.suffix.lower()]
    Image.new("RGB", (8, 6), colour).save(path, format=image_format)
    return path


def ids(frame) -> list[str]:
    return list(frame["image_id"])


def test_nested_folders_give_relative_ids_and_absolute_paths(tmp_path):
    root = tmp_path / "photos"
    files = [write_image(root / "top.png"), write_image(root / "a" / "b" / "deep.jpg"),
             write_image(root / "a" / "mid.JPEG")]
    found = discover_images([root])
    assert list(found.columns) == ["image_id", "root", "path", "bytes"]
    assert ids(found) == ["a/b/deep", "a/mid", "top"]
    assert set(found["root"]) == {str(root)}
    by_id = found.set_index("image_id")
    for file, image_id in zip(files, ["top", "a/b/deep", "a/mid"]):
        assert by_id.loc[image_id, "path"] == str(file)
        assert by_id.loc[image_id, "bytes"] == file.stat().st_size
    assert found["bytes"].dtype == np.int64


def test_relative_root_is_made_absolute(tmp_path, monkeypatch):
    write_image(tmp_path / "photos" / "x.png")
    monkeypatch.chdir(tmp_path)
    found = discover_images(["photos"])
    assert found["root"].tolist() == [str(tmp_path / "photos")]
    assert found["path"].tolist() == [str(tmp_path / "photos" / "x.png")]


def test_every_listed_extension_is_found_in_any_case(tmp_path):
    for extension in IMAGE_EXTENSIONS:
        lower = write_image(tmp_path / f"lower-{extension[1:]}{extension}")
        shutil.copy(lower, tmp_path / f"upper-{extension[1:]}{extension.upper()}")
    found = discover_images([tmp_path])
    assert len(found) == 2 * len(IMAGE_EXTENSIONS)


def test_hidden_and_non_image_files_are_skipped(tmp_path):
    write_image(tmp_path / "keep.jpg")
    write_image(tmp_path / ".hidden.jpg")
    write_image(tmp_path / ".git" / "inside-hidden-dir.png")
    write_image(tmp_path / "a" / ".thumbnails" / "thumb.png")
    write_image(tmp_path / "a" / "kept.png")
    (tmp_path / "notes.txt").write_text("captions")
    (tmp_path / "keep.jpg.bak").write_bytes((tmp_path / "keep.jpg").read_bytes())
    (tmp_path / "README").write_text("readme")
    (tmp_path / "video.mp4").write_bytes(b"\x00" * 16)
    assert ids(discover_images([tmp_path])) == ["a/kept", "keep"]


def test_symlink_to_a_file_is_followed(tmp_path):
    target = write_image(tmp_path / "elsewhere" / "real.jpg")
    root = tmp_path / "root"
    write_image(root / "own.png")
    (root / "linked.jpg").symlink_to(target)
    (root / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    found = discover_images([root]).set_index("image_id")
    assert list(found.index) == ["dangling", "linked", "own"]  # the dangling link: recorded, failed by the probe
    assert found.loc["dangling", "bytes"] == -1
    assert found.loc["linked", "path"] == str(root / "linked.jpg")
    assert found.loc["linked", "bytes"] == target.stat().st_size


def test_symlink_to_a_directory_outside_the_root_is_followed(tmp_path):
    write_image(tmp_path / "elsewhere" / "sub" / "far.png")
    root = tmp_path / "root"
    write_image(root / "near.png")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    found = discover_images([root])
    assert ids(found) == ["linked/sub/far", "near"]
    assert found["path"].iloc[0] == str(root / "linked" / "sub" / "far.png")


def test_directory_reached_directly_and_by_link_is_listed_once_under_its_real_path(tmp_path):
    write_image(tmp_path / "real" / "x.png")
    # "alias" sorts before "real", yet the folder is listed under its real path.
    (tmp_path / "alias").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "real" / "again").symlink_to(tmp_path / "real", target_is_directory=True)
    assert ids(discover_images([tmp_path])) == ["real/x"]


def test_symlink_cycle_terminates_without_duplicates(tmp_path):
    root = tmp_path / "root"
    write_image(root / "a" / "one.png")
    write_image(root / "a" / "b" / "two.png")
    (root / "a" / "b" / "up").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "b" / "root-again").symlink_to(root, target_is_directory=True)
    (tmp_path / "outside").mkdir()
    write_image(tmp_path / "outside" / "three.png")
    (tmp_path / "outside" / "back").symlink_to(root, target_is_directory=True)
    (root / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    assert ids(discover_images([root])) == ["a/b/two", "a/one", "out/three"]


def test_two_roots(tmp_path):
    write_image(tmp_path / "coco" / "train" / "1.jpg")
    write_image(tmp_path / "flickr" / "2.jpg")
    found = discover_images([tmp_path / "flickr", str(tmp_path / "coco")])
    assert ids(found) == ["2", "train/1"]
    assert found["root"].tolist() == [str(tmp_path / "flickr"), str(tmp_path / "coco")]


def test_order_is_sorted_and_independent_of_creation_and_root_order(tmp_path):
    names = ["b/2.png", "a.png", "B.png", "b/10.png", "a/z.png", "_.png", "b-c.png"]
    for name in names:
        write_image(tmp_path / "one" / name)
    write_image(tmp_path / "two" / "m.png")
    first = discover_images([tmp_path / "one", tmp_path / "two"])
    second = discover_images([tmp_path / "two", tmp_path / "one"])
    assert ids(first) == sorted(ids(first))
    assert first.equals(second)


def test_same_name_with_two_extensions_is_refused(tmp_path):
    jpg = write_image(tmp_path / "a" / "x.jpg")
    png = write_image(tmp_path / "a" / "x.png")
    with pytest.raises(ShnetError) as failure:
        discover_images([tmp_path])
    message = str(failure.value)
    assert str(jpg) in message and str(png) in message and "'a/x'" in message
    assert "rename" in message and "separate caches" in message


def test_same_relative_path_under_two_roots_is_refused(tmp_path):
    first = write_image(tmp_path / "one" / "x.jpg")
    second = write_image(tmp_path / "two" / "x.jpg")
    write_image(tmp_path / "one" / "y.jpg")
    write_image(tmp_path / "two" / "y.jpg")
    with pytest.raises(ShnetError, match="1 more such pairs") as failure:
        discover_images([tmp_path / "one", tmp_path / "two"])
    assert str(first) in str(failure.value) and str(second) in str(failure.value)


def test_overlapping_roots_are_refused(tmp_path):
    write_image(tmp_path / "all" / "sub" / "x.jpg")
    with pytest.raises(ShnetError, match="overlap"):
        discover_images([tmp_path / "all", tmp_path / "all" / "sub"])
    with pytest.raises(ShnetError, match="overlap"):
        discover_images([tmp_path / "all", tmp_path / "all"])


def test_missing_root_and_file_root_are_named(tmp_path):
    with pytest.raises(ShnetError, match=f"{tmp_path / 'absent'} does not exist"):
        discover_images([tmp_path / "absent"])
    file_root = write_image(tmp_path / "x.jpg")
    with pytest.raises(ShnetError, match="is not a directory"):
        discover_images([file_root])


def test_no_images_names_the_roots_and_extensions(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("x")
    with pytest.raises(ShnetError) as failure:
        discover_images([tmp_path / "empty", tmp_path / "texts"])
    message = str(failure.value)
    assert str(tmp_path / "empty") in message and str(tmp_path / "texts") in message
    assert ".jpg" in message and ".webp" in message


def test_no_roots_given():
    with pytest.raises(ShnetError, match="no image folders"):
        discover_images([])


# ---- bundled samples -------------------------------------------------------------------------


def test_bundled_samples_are_small_decodable_and_credited():
    folder = sample_images_dir()
    found = discover_images([folder])
    assert 6 <= len(found) <= 8
    assert found["bytes"].sum() < 300_000
    sources = (folder / "SOURCES.md").read_text()
    for path in found["path"]:
        assert Path(path).name in sources
        pixels = decode_image(path)
        assert max(pixels.shape[:2]) <= 320 and pixels.shape[2] == 3
