"""The box head: RoIPool 14x14 on res4, the VG res5, mean pooling to 2048-d, and the predictor
(1601-way classifier, class-specific box regression, attribute head).

The attribute head embeds the predicted class (argmax over all 1601 scores, as both ports do) and
reads it with the feature: Embedding(1601, 256) -> concat (2304) -> Linear 512 -> ReLU -> Linear 401.
Its parameters are named as py-bottom-up-attention names them (``cls_embedding``, ``fc_attr``,
``attr_score``); :mod:`.checkpoint` maps MILVLG's names onto these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ....cache.schema import REGION_FEATURE_DIM
from .backbone import visual_genome_res5
from .conventions import NUM_ATTRIBUTES, NUM_OBJECTS, Convention

POOLER_RESOLUTION = 14
ROI_CHUNK = 512
CLASS_EMBEDDING = 256
ATTRIBUTE_HIDDEN = 512


class BoxPredictor(nn.Module):
    def __init__(self, convention: Convention):
        super().__init__()
        self.cls_score = nn.Linear(REGION_FEATURE_DIM, NUM_OBJECTS + 1)
        self.bbox_pred = nn.Linear(REGION_FEATURE_DIM, convention.box_classes * 4)
        self.cls_embedding = nn.Embedding(NUM_OBJECTS + 1, CLASS_EMBEDDING)
        self.fc_attr = nn.Linear(REGION_FEATURE_DIM + CLASS_EMBEDDING, ATTRIBUTE_HIDDEN)
        self.attr_score = nn.Linear(ATTRIBUTE_HIDDEN, NUM_ATTRIBUTES + 1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        class_logits = self.cls_score(features)
        deltas = self.bbox_pred(features)
        embedded = self.cls_embedding(class_logits.argmax(dim=1))
        hidden = F.relu(self.fc_attr(torch.cat([features, embedded.to(features.dtype)], dim=1)))
        return class_logits, deltas, self.attr_score(hidden)


class Res5ROIHeads(nn.Module):
    def __init__(self, convention: Convention, stride: int):
        super().__init__()
        self.spatial_scale = 1.0 / stride
        self.res5 = visual_genome_res5()
        self.box_predictor = BoxPredictor(convention)

    def pooled_features(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """Mean-pooled res5 output [sum(R_i), 2048] of every box (resized-image coordinates),
        ``ROI_CHUNK`` boxes at a time (a 14x14x2048 map per box: thousands at once would hold
        gigabytes per layer)."""
        rois = torch.cat(
            [torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1) for i, b in enumerate(boxes)]
        )
        # pooled in fp32: fp16 box coordinates would move RoIPool's rounded bins on large images
        features, rois = features.float(), rois.float()
        chunks = rois.split(ROI_CHUNK) if len(rois) else (rois,)
        return torch.cat(
            [self.res5(torchvision.ops.roi_pool(features, chunk, POOLER_RESOLUTION, self.spatial_scale)).mean(dim=(2, 3)) for chunk in chunks]
        )
