"""shnet: image folders to a trained 3SHNet image-sentence retrieval model."""

__version__ = "0.1.0"
