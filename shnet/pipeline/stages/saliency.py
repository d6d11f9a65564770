"""Stage ``saliency``: a per-image saliency map in [0, 1] at a fixed stored resolution.

Backends: ``spectral_residual`` (weights-free, OpenCV contrib; the default) and ``msinet`` (the
learned contextual encoder-decoder network, local weights).
"""

from __future__ import annotations

import numpy as np

from ...weights import weights_identity
from ...errors import ShnetError
from ...cache import schema
from .base import ImageStage, StageOutput
from ...devices import autocast, place_model

BACKENDS = ("spectral_residual", "msinet")


class SaliencyStage(ImageStage):
    name = schema.SALIENCY
    defaults = {"backend": "spectral_residual", "resolution": 128, "weights": None}
    location_keys = ("weights",)
    description = "saliency map in [0, 1] at a stored resolution"

    def resolve_config(self, options):
        config = super().resolve_config(options)
        if config["backend"] not in BACKENDS:
            raise ShnetError(f"saliency.backend must be one of {', '.join(BACKENDS)} (got {config['backend']!r})")
        config["resolution"] = int(config["resolution"])
        if config["backend"] == "msinet":
            if config["weights"] is None:
                raise ShnetError("saliency.backend=msinet needs local weights: --set saliency.weights=/path/to/msinet.pth")
        elif config["weights"] is not None:
            raise ShnetError("saliency.weights is only used by saliency.backend=msinet")
        config["weights_sha256"] = weights_identity(config["weights"])
        return config

    def check(self, config):
        if config["backend"] == "msinet":
            from ..models.msinet import check_msinet_weights

            check_msinet_weights(config["weights"])

    def load(self, config, device):
        if config["backend"] == "msinet":
            from ..models.msinet import load_msinet

            return place_model(load_msinet(config["weights"]), device)
        return None

    def outputs(self, config, model):
        return schema.specs(schema.SALIENCY, S=config["resolution"])

    def needs_accelerator(self, config):
        return config["backend"] != "spectral_residual"  # numpy and OpenCV on the CPU

    def attrs(self, config, model):
        return {"backend": config["backend"], "weights_sha256": config["weights_sha256"]}

    def draft_size(self, config):
        return 2 * config["resolution"] if config["backend"] == "spectral_residual" else 480

    def prepare(self, rgb, config, model):
        r = config["resolution"]
        if config["backend"] == "spectral_residual":
            from ..models.saliency_spectral import spectral_residual_saliency

            return spectral_residual_saliency(rgb, (r, r))
        from ..models.msinet import preprocess

        return preprocess(rgb)

    def infer(self, model, prepared, config, device):
        r = config["resolution"]
        if config["backend"] == "spectral_residual":
            maps = np.stack(prepared)
        else:
            import torch

            from ..models.msinet import restore_map

            batch = torch.from_numpy(np.stack([pixels for pixels, _ in prepared])).to(device)
            with torch.inference_mode(), autocast(device, "float16"):
                out = model(batch).float()[:, 0].clamp(0, 1).cpu().numpy()
            maps = np.stack([restore_map(out[i], box, (r, r)) for i, (_, box) in enumerate(prepared)])
        return StageOutput(arrays={schema.SALIENCY_MAP: maps.astype(np.float16)})
