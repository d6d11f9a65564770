"""Write the bundled sample images (shnet/data/samples) from scikit-image's public-domain photos.

Run once by developers (needs scikit-image): python tools/make_sample_images.py
The licences of the chosen photos are listed in shnet/data/samples/SOURCES.md.
"""

from pathlib import Path

from PIL import Image
from skimage import data

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "shnet" / "data" / "samples"
LONGER_SIDE = 320
JPEG_QUALITY = 85

# output file name -> scikit-image loader
SAMPLES = {
    "astronaut-eileen-collins.jpg": data.astronaut,
    "coffee-cup-on-saucer.jpg": data.coffee,
    "chelsea-the-cat.jpg": data.chelsea,
    "falcon9-rocket-launch.jpg": data.rocket,
    "hubble-deep-field.jpg": data.hubble_deep_field,
    "cameraman-grayscale.png": data.camera,
}


def main() -> None:
    SAMPLES_DIR.mkdir(parents=True, exist_ok=True)
    for name, load in SAMPLES.items():
        image = Image.fromarray(load())
        image.thumbnail((LONGER_SIDE, LONGER_SIDE), Image.Resampling.LANCZOS)
        target = SAMPLES_DIR / name
        if target.suffix == ".jpg":
            image.save(target, quality=JPEG_QUALITY, optimize=True)
        else:
            image.save(target, optimize=True)
        print(f"{target.name}: {image.width}x{image.height}, {target.stat().st_size} bytes")


if __name__ == "__main__":
    main()
