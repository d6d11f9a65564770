"""Builders for the panoptic tests: a tiny random-initialised Mask2Former folder and hand-made
COCO-panoptic annotations (PNGs + JSON), both written the way the real ones are."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from shnet.data import coco_panoptic_categories


def tiny_mask2former(folder: Path, id2label: dict[int, str] | None = None) -> Path:
    """A ~0.4M-parameter Mask2Former (Swin backbone config, no download) saved with its processor.

    Its class head and mask embedder are scaled up after saving, so that the random queries make
    confident, spatially varied predictions (with default thresholds most images still get few or
    no segments; ``overlap_threshold=0`` gives several per image)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

    import shnet.pipeline.models  # noqa: F401 - torchvision CPU fallbacks before transformers imports it

    if id2label is None:
        id2label = {c.index: c.name for c in coco_panoptic_categories()}
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        num_queries=20,
        hidden_dim=32,
        mask_feature_size=32,
        feature_size=32,
        encoder_feedforward_dim=64,
        dim_feedforward=64,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    Mask2FormerForUniversalSegmentation(config).save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}).save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["class_predictor.weight"] *= 60
    embedder = "model.transformer_module.decoder.mask_predictor.mask_embedder.2.0"
    weights[f"{embedder}.weight"] *= 30
    weights[f"{embedder}.bias"] *= 0
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def encode_segment_ids(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG pixels: id = R + 256 G + 256^2 B."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // 65536], axis=-1).astype(np.uint8)


def write_annotations(root: Path, images: dict[str, tuple[np.ndarray, list[tuple[int, int]]]], categories=True) -> Path:
    """``images``: stem -> (segment id map, [(segment id, COCO dataset category id)]). Writes
    ``root/panoptic.json`` and ``root/panoptic/<stem>.png`` (COCO's layout); returns the JSON path."""
    png_dir = root / "panoptic"
    png_dir.mkdir(parents=True, exist_ok=True)
    annotations, entries = [], []
    for number, (stem, (ids, segments)) in enumerate(sorted(images.items()), start=1):
        Image.fromarray(encode_segment_ids(ids)).save(png_dir / f"{stem}.png")
        entries.append({"id": number, "file_name": f"{stem}.jpg", "height": ids.shape[0], "width": ids.shape[1]})
        annotations.append(
            {
                "image_id": number,
                "file_name": f"{stem}.png",
                "segments_info": [{"id": int(s), "category_id": int(c), "iscrowd": 0, "area": int((ids == s).sum())} for s, c in segments],
            }
        )
    data = {"images": entries, "annotations": annotations}
    if categories:
        data["categories"] = [{"id": c.id, "name": c.name, "isthing": int(c.is_thing)} for c in coco_panoptic_categories()]
    path = root / "panoptic.json"
    path.write_text(json.dumps(data))
    return path


def blocky_annotations(root: Path, stems_and_sizes: dict[str, tuple[int, int]], seed: int = 0) -> tuple[Path, dict]:
    """Annotations for images of the given (height, width): each a few rectangles of random COCO
    classes over a void background. Returns the JSON path and {stem: (ids, segments)}."""
    rng = np.random.default_rng(seed)
    categories = coco_panoptic_categories()
    made = {}
    for stem, (height, width) in stems_and_sizes.items():
        ids = np.zeros((height, width), np.int64)
        segments = []
        for number in range(1, 5):
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            ids[y0 : y0 + rng.integers(2, height // 2 + 2), x0 : x0 + rng.integers(2, width // 2 + 2)] = number * 70001
            segments.append((number * 70001, categories[int(rng.integers(0, len(categories)))].id))
        made[stem] = (ids, [s for s in segments if (ids == s[0]).any()])
    return write_annotations(root, made), made


def tiny_oneformer(folder: Path) -> Path:
    """A tiny random-initialised OneFormer saved with its processor, including a small CLIP BPE
    tokenizer written here (OneFormer's text branch tokenises the task, "the task is panoptic")."""
    import torch
    from transformers import CLIPTokenizer, OneFormerConfig, OneFormerForUniversalSegmentation, OneFormerImageProcessor, OneFormerProcessor, SwinConfig

    import shnet.pipeline.models  # noqa: F401 - torchvision CPU fallbacks before transformers imports it

    folder.mkdir(parents=True, exist_ok=True)
    words = ["the", "task", "is", "panoptic", "semantic", "instance", "a", "photo", "with", "an"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(set("".join(words))):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges = []
    for word in words:
        tokens = list(word[:-1]) + [word[-1] + "</w>"]
        while len(tokens) > 1:
            merges.append(f"{tokens[0]} {tokens[1]}")
            vocab.setdefault(tokens[0] + tokens[1], len(vocab))
            tokens = [tokens[0] + tokens[1]] + tokens[2:]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    id2label = {c.index: c.name for c in coco_panoptic_categories()}
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=7, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = OneFormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, num_queries=20, hidden_dim=32, mask_dim=32, conv_dim=32,
        encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2,
        text_encoder_width=32, text_encoder_context_length=16, text_encoder_num_layers=1, text_encoder_vocab_size=len(vocab),
        text_encoder_proj_layers=1, text_encoder_n_ctx=4, task_seq_len=16, max_seq_len=16,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    OneFormerForUniversalSegmentation(config).save_pretrained(folder)
    image_processor = OneFormerImageProcessor(size={"shortest_edge": 128, "longest_edge": 192}, num_text=config.num_queries - config.text_encoder_n_ctx)
    OneFormerProcessor(image_processor=image_processor, tokenizer=tokenizer, max_seq_length=16, task_seq_length=16).save_pretrained(folder)
    return folder
