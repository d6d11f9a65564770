"""``shnet demo``: generate scenes, extract every stage, train region and grid models, evaluate
both and their hybrid, write ``metrics.json`` and ``report.html``; a re-run on the same directory
resumes every step.

It calls exactly what the commands call (``run_extract`` for ``shnet extract``, ``train`` for
``shnet train``, ``evaluate_checkpoints`` for ``shnet evaluate``), so it is also the template for
running shnet on one's own data:

```
DIR/data/      images/, panoptic.json + panoptic/ (COCO panoptic), captions.json (Karpathy split)
DIR/cache/     the feature cache (profile ``demo``; the panoptic stage reads data/panoptic.json)
DIR/runs/      region/ and grid/ training runs
DIR/metrics.json, DIR/report.html
```
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..cache import Cache
from ..errors import ShnetError
from ..fileio import atomic_write_json
from ..pipeline.runner import ExtractReport, ExtractRequest, run_extract
from ..trainer.evaluate import EvalRequest, Evaluation, evaluate_checkpoints
from ..trainer.run import RunDir
from ..trainer.train import TrainOptions, train
from .dataset import DatasetFiles, DatasetSettings, generate_dataset
from .metrics_table import MODELS, chance_metrics, format_table
from .options import DemoOptions
from .report import retrieval_examples, write_report
from .scenes import CAPTIONS_PER_SCENE

PROFILE = "demo"  # shnet/manifests/profiles/demo.yaml
LEVELS = ("region", "grid")  # the trained runs (named after their level)
REPORT_EXAMPLES = 6
MAX_SHARDS = 4  # shards per stage: enough to keep the embedded cluster's workers busy

# The training recipe of the demo: a small joint space and a raised learning rate so that a few
# epochs on a few hundred images learn; the loss sums over all negatives throughout (the
# hardest-negative switch of the paper recipe needs longer training to pay off). A step costs the
# same per caption at any batch size (the 64x64 class-map attention dominates), so batches are as
# large as MAX_BATCH but small enough for MIN_STEPS steps per epoch on small sets.
MAX_BATCH, MIN_STEPS = 64, 8
TRAIN_RECIPE = dict(
    embed_size=256,
    word_dim=128,
    lr=2e-3,
    max_violation_after=1000,
    workers=0,
    in_memory=True,
    val_images=0,
)


@dataclass
class DemoResult:
    output: Path
    metrics: dict
    report: Path
    seconds: dict[str, float] = field(default_factory=dict)


def demo_layout(output: str | Path) -> dict[str, Path]:
    root = Path(output).expanduser().resolve()
    return {
        "root": root,
        "data": root / "data",
        "cache": root / "cache",
        "runs": root / "runs",
        "metrics": root / "metrics.json",
        "report": root / "report.html",
    }


def shard_size(images: int) -> int:
    return max(1, math.ceil(images / MAX_SHARDS))


def extract_request(files: DatasetFiles, cache: Path, images: int, workers: int | None) -> ExtractRequest:
    """The extract the demo runs: profile ``demo`` with the panoptic stage pointed at the generated
    COCO panoptic annotations (the ``shnet extract`` command line it equals is printed)."""
    return ExtractRequest(
        image_dirs=[str(files.images)],
        cache=str(cache),
        profile=PROFILE,
        overrides=[f"regions.boxes={files.boxes}", f"panoptic.annotations={files.panoptic_json}"],
        workers=workers,
        shard_size=shard_size(images),
    )


def extract_command_line(request: ExtractRequest) -> str:
    sets = " ".join(f"--set {o}" for o in request.overrides)
    folders = " ".join(request.image_dirs)
    return f"shnet extract {folders} -o {request.cache} --profile {request.profile} {sets} --shard-size {request.shard_size}"


def batch_size(train_images: int) -> int:
    return max(8, min(MAX_BATCH, CAPTIONS_PER_SCENE * train_images // MIN_STEPS))


def train_options(
    files: DatasetFiles, cache: Path, run_dir: Path, level: str, settings: DatasetSettings, epochs: int, progress: bool
) -> TrainOptions:
    return TrainOptions(
        caches=[str(cache)],
        captions=str(files.captions),
        output=str(run_dir),
        level=level,
        epochs=epochs,
        seed=settings.seed,
        progress=progress,
        batch_size=batch_size(settings.split_sizes()["train"]),
        **TRAIN_RECIPE,
    )


def train_or_resume(options: TrainOptions, log: Callable[[str], None]) -> dict:
    """A new run, or the run already in ``options.output`` continued (or left as it is when it has
    finished its epochs), as ``shnet train [--resume]`` does."""
    resume = RunDir(options.output).has_run()
    return train(options, resume=resume, explicit={"epochs", "progress"}, log=log)


def evaluate_all(runs: dict[str, Path], log: Callable[[str], None]) -> dict[str, Evaluation]:
    """Each run on the test split, and the hybrid (mean of the runs' similarity matrices)."""
    request = EvalRequest(split="test", protocol="full", workers=0)
    evaluations = {name: evaluate_checkpoints([str(path)], request, log=log) for name, path in runs.items()}
    evaluations["hybrid"] = evaluate_checkpoints([str(runs[name]) for name in runs], request, log=log)
    return evaluations


def settings_lines(options: DemoOptions, settings: DatasetSettings, request: ExtractRequest) -> list[str]:
    sizes = settings.split_sizes()
    recipe = ", ".join(f"{k}={v}" for k, v in TRAIN_RECIPE.items())
    recipe += f", batch_size={batch_size(sizes['train'])}"
    return [
        f"data: {settings.images} synthetic scenes (train {sizes['train']}, val {sizes['val']}, test {sizes['test']}), "
        f"seed {settings.seed}, longer side up to {settings.max_side} px, 5 captions each",
        f"extraction: {extract_command_line(request)}",
        "networks: the region detector and the grid backbone are seeded random initialisations (no weights ship with "
        "shnet); the panoptic stage reads the generated ground-truth annotations (coco backend)",
        f"training: BiGRU text encoder, {options.epochs} epochs, {recipe}",
    ]


def run_demo(
    options: DemoOptions, log: Callable[[str], None] = print, show_extract: Callable[[ExtractReport], None] | None = None
) -> DemoResult:
    """Every step of the demo, each one resumed when its output is already there."""
    if options.images < 20:
        raise ShnetError(f"--images must be at least 20 (got {options.images}): each split needs a few images")
    if options.epochs < 1:
        raise ShnetError(f"--epochs must be at least 1 (got {options.epochs})")
    paths = demo_layout(options.output)
    paths["root"].mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 2)
        clock = now

    settings = DatasetSettings(images=options.images, seed=options.seed)
    sizes = settings.split_sizes()
    log(f"[1/5] scenes: {options.images} captioned images with COCO panoptic annotations in {paths['data']}")
    files = generate_dataset(paths["data"], settings)
    lap("data")

    request = extract_request(files, paths["cache"], options.images, options.workers)
    log(
        "[2/5] extract: stages grid, saliency, regions, panoptic, layout with seeded random-initialised networks "
        "(no weights ship with shnet; their features carry colour and layout, not learned semantics)\n"
        f"      {extract_command_line(request)}"
    )
    report = run_extract(request)
    if show_extract is not None:
        show_extract(report)
    if report.failed_shards:
        lines = "\n".join(f"  {stage} shard {shard}: {error}" for stage, shard, error in report.failed_shards)
        raise ShnetError(
            f"the demo's extract left {len(report.failed_shards)} failed shard(s) (re-run to retry):\n{lines}\n"
            f"Tracebacks: {Cache.error_log_path(report.cache)}"
        )
    lap("extract")

    runs = {}
    for step, name in enumerate(LEVELS, start=3):
        run_dir = paths["runs"] / name
        log(f"[{step}/5] train the {name} model ({options.epochs} epochs) in {run_dir}")
        train_or_resume(train_options(files, paths["cache"], run_dir, name, settings, options.epochs, options.progress), log)
        runs[name] = run_dir
        lap(f"train_{name}")

    log(f"[5/5] evaluate region, grid and hybrid on the {sizes['test']} test images")
    evaluations = evaluate_all(runs, log)
    lap("evaluate")

    n_test = evaluations["hybrid"].captions.num_images
    metrics = {name: evaluations[name].results for name in MODELS}
    metrics["n_test_images"] = n_test
    metrics["chance"] = chance_metrics(n_test)
    hybrid = evaluations["hybrid"]
    examples = retrieval_examples(hybrid.sims, hybrid.captions, REPORT_EXAMPLES)
    curves = {name: RunDir(run_dir).curves for name, run_dir in runs.items()}
    write_report(paths["report"], metrics, curves, examples, Cache(paths["cache"]), settings_lines(options, settings, request))
    lap("report")
    seconds["total"] = round(time.perf_counter() - started, 2)
    metrics["seconds"] = seconds
    atomic_write_json(paths["metrics"], metrics)
    return DemoResult(paths["root"], metrics, paths["report"], seconds)


def summary(result: DemoResult) -> str:
    """The metric table, the hybrid's text-to-image R@1 against chance, and where the files are."""
    metrics = result.metrics
    n_test = metrics["n_test_images"]
    r1 = metrics["hybrid"]["full"]["t2i"]["r1"]
    chance = 100.0 / n_test
    return "\n".join(
        [
            f"test split: {n_test} images, {5 * n_test} captions (protocol 'full'; chance = a random ranking)",
            format_table(metrics),
            f"hybrid text-to-image R@1 {r1:.1f}% = {r1 / chance:.1f}x chance ({chance:.1f}%)",
            f"{result.seconds['total']:.0f}s in all ({', '.join(f'{k} {v:.0f}s' for k, v in result.seconds.items() if k != 'total')})",
            f"metrics: {result.output / 'metrics.json'}",
            f"report:  {result.report}",
        ]
    )
