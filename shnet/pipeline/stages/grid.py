"""Stage ``grid``: CNN grid features (the last conv stage of a ResNet-family backbone), fp16.

A fixed input size gives a fixed grid (512 -> 16x16 at stride 32). ``resize: pad`` keeps the aspect
ratio instead, pads to the square input, and records the valid cells in ``valid_hw``.
"""

from __future__ import annotations

import numpy as np

from ...weights import weights_identity
from ...errors import ShnetError
from ...cache import schema
from .base import ImageStage, StageOutput
from ..grid_backbones import check_backbone_name, has_more_than_a_name_to_check
from ...devices import autocast, place_model


class GridStage(ImageStage):
    name = schema.GRID
    defaults = {"model": "resnet152", "weights": None, "input_size": 512, "resize": "stretch"}
    location_keys = ("weights",)
    description = "CNN grid features [h, w, C] from torchvision/timm backbones"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        if config["resize"] not in ("stretch", "pad"):
            raise ShnetError(f"grid.resize must be 'stretch' or 'pad' (got {config['resize']!r})")
        size = int(config["input_size"])
        if size < 32 or size % 32:
            raise ShnetError(f"grid.input_size must be a multiple of 32 of at least 32 (got {size})")
        config["input_size"] = size
        check_backbone_name(config["model"])
        config["weights_sha256"] = weights_identity(config["weights"])
        return config

    def check(self, config):
        if not has_more_than_a_name_to_check(config["model"], config["weights"]):
            return
        from ..models.grid import check_grid_weights

        check_grid_weights(config["model"], config["weights"])

    def load(self, config, device):
        from ..models.grid import build_grid_backbone

        return place_model(build_grid_backbone(config["model"], config["weights"]), device)

    def outputs(self, config, model):
        return schema.specs(schema.GRID, G=config["input_size"] // model.stride, C=model.channels)

    def attrs(self, config, model):
        return {"model": config["model"], "weights_sha256": config["weights_sha256"], "stride": model.stride}

    def draft_size(self, config):
        return config["input_size"]

    def prepare(self, rgb, config, model):
        from ..models.grid import preprocess

        return preprocess(rgb, config["input_size"], config["resize"], model.mean, model.std, model.stride)

    def infer(self, model, prepared, config, device):
        import torch

        images = torch.from_numpy(np.stack([p[0] for p in prepared]))
        valid = np.asarray([p[1] for p in prepared], dtype=np.int16)
        with torch.inference_mode(), autocast(device, "float16"):
            features = model(images.to(device, non_blocking=True))
        grid = features.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
        return StageOutput(arrays={schema.GRID_FEATURES: grid, schema.VALID_HW: valid})

