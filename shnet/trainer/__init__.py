"""The training half of shnet: cached features -> trained 3SHNet retrieval model -> metrics."""

from .checkpoint import LoadedModel, load_model, save_checkpoint
from .model import ModelConfig, SHNet, build_model

__all__ = ["LoadedModel", "ModelConfig", "SHNet", "build_model", "load_model", "save_checkpoint"]
