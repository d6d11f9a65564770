"""Data files shipped inside the shnet package."""

from importlib import resources
from pathlib import Path


def sample_images_dir() -> Path:
    """The folder of bundled sample photos that ``shnet extract --sample`` runs on."""
    return Path(resources.files(__name__).joinpath("samples"))
