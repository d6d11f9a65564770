"""The demo's metric table: region, grid and hybrid next to what a random ranking scores."""

from __future__ import annotations

from ..trainer.metrics import CAPTIONS_PER_IMAGE, RECALL_AT

MODELS = ("region", "grid", "hybrid")
TABLE_COLUMNS = tuple((f"{d} R@{k}", d, f"r{k}") for d in ("i2t", "t2i") for k in RECALL_AT) + (("rSum", None, "rsum"),)


def chance_metrics(n_images: int, captions_per_image: int = CAPTIONS_PER_IMAGE) -> dict:
    """Expected recalls of a random ranking (in %), in the shape of a metrics result.

    Text-to-image: the caption's one image lands in the top k of n with probability k/n.
    Image-to-text: the best of the image's ``captions_per_image`` captions lands in the top k of
    all ``captions_per_image * n`` captions.
    """
    n_captions = captions_per_image * n_images
    i2t, t2i = {}, {}
    for k in RECALL_AT:
        miss = 1.0
        for j in range(captions_per_image):
            miss *= max(0, n_captions - k - j) / (n_captions - j)
        i2t[f"r{k}"] = 100.0 * (1.0 - miss)
        t2i[f"r{k}"] = 100.0 * min(k, n_images) / n_images
    return {"i2t": i2t, "t2i": t2i, "rsum": sum(i2t.values()) + sum(t2i.values())}


def format_table(metrics: dict) -> str:
    """A fixed-width text table of the ``full``-protocol results of every model, and chance."""
    header = f"{'model':<8}" + "".join(f"{label:>10}" for label, _, _ in TABLE_COLUMNS)
    rows = [header, "-" * len(header)]
    chance = chance_metrics(metrics["n_test_images"])
    for name, result in [(m, metrics[m]["full"]) for m in MODELS] + [("chance", chance)]:
        rows.append(f"{name:<8}" + "".join(f"{(result[d][k] if d else result[k]):>10.1f}" for _, d, k in TABLE_COLUMNS))
    return "\n".join(rows)
