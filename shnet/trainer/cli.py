"""``shnet train`` and ``shnet evaluate`` (registered in the main CLI group as ``train_command`` and
``evaluate_command``). Errors are :class:`~shnet.errors.ShnetError` with one message."""

from __future__ import annotations

import dataclasses

import click
from click.core import ParameterSource

from ..devices import DEVICE_HELP, DEVICE_METAVAR, device_option_callback
from ..errors import ShnetError
from ..fileio import terminal_safe
from .metrics import PROTOCOLS
from .options import LEVELS, SEG_MAP_MODES, TEXT_ENCODERS, TrainOptions
from .similarity_files import SIMS_LAYOUTS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}


def _log(message: str) -> None:
    click.echo(terminal_safe(message, keep_newlines=True), err=True)


@click.command("train")
@click.option(
    "--cache", "caches", multiple=True, type=click.Path(file_okay=False), help="Feature cache directory (repeatable; joined on image_id)."
)
@click.option(
    "--captions",
    type=click.Path(dir_okay=False),
    help="Karpathy split JSON, or CSV/Parquet with image_id, caption, split (default: the captions an imported cache holds).",
)
@click.option(
    "--output", "-o", required=True, type=click.Path(file_okay=False), help="Run directory (checkpoints, metrics.jsonl, curves.png)."
)
@click.option("--resume", is_flag=True, help="Continue the run in --output from its last checkpoint.")
@click.option("--level", type=click.Choice(LEVELS), default=_DEFAULTS["level"], show_default=True, help="Region features or grid features.")
@click.option("--text-encoder", type=click.Choice(TEXT_ENCODERS), default=_DEFAULTS["text_encoder"], show_default=True)
@click.option("--bert-path", type=click.Path(file_okay=False), help="Local bert-base-uncased folder (for --text-encoder bert).")
@click.option("--embed-size", type=int, default=_DEFAULTS["embed_size"], show_default=True)
@click.option("--word-dim", type=int, default=_DEFAULTS["word_dim"], show_default=True, help="Word embedding size of the BiGRU encoder.")
@click.option(
    "--seg-map-mode",
    type=click.Choice(SEG_MAP_MODES),
    default=_DEFAULTS["seg_map_mode"],
    show_default=True,
    help="How the 64x64 class map is fed.",
)
@click.option("--epochs", type=int, default=_DEFAULTS["epochs"], show_default=True)
@click.option("--batch-size", type=int, default=_DEFAULTS["batch_size"], show_default=True)
@click.option("--lr", type=float, default=_DEFAULTS["lr"], show_default=True, help="Learning rate of the image encoder and text head.")
@click.option(
    "--bert-lr-factor", type=float, default=_DEFAULTS["bert_lr_factor"], show_default=True, help="BERT's learning rate relative to --lr."
)
@click.option("--weight-decay", type=float, default=_DEFAULTS["weight_decay"], show_default=True, help="AdamW weight decay.")
@click.option("--lr-update", type=int, default=_DEFAULTS["lr_update"], show_default=True, help="Epoch at which the learning rate drops.")
@click.option("--lr-decay", type=float, default=_DEFAULTS["lr_decay"], show_default=True, help="Factor of that drop.")
@click.option("--grad-clip", type=float, default=_DEFAULTS["grad_clip"], show_default=True, help="Gradient-norm clip (0: none).")
@click.option("--margin", type=float, default=_DEFAULTS["margin"], show_default=True, help="Hinge triplet loss margin.")
@click.option(
    "--max-violation-after",
    type=int,
    default=_DEFAULTS["max_violation_after"],
    show_default=True,
    help="First epoch using the hardest negative only (earlier epochs sum over all negatives).",
)
@click.option(
    "--region-dropout",
    type=float,
    default=_DEFAULTS["region_dropout"],
    show_default=True,
    help="Share of regions dropped per training sample.",
)
@click.option("--train-split", default=_DEFAULTS["train_split"], show_default=True)
@click.option("--val-split", default=_DEFAULTS["val_split"], show_default=True)
@click.option(
    "--val-images", type=int, default=_DEFAULTS["val_images"], show_default=True, help="Validate on the split's first N images (0: all)."
)
@click.option("--seed", type=int, default=_DEFAULTS["seed"], show_default=True)
@click.option("--workers", type=int, default=_DEFAULTS["workers"], show_default=True, help="DataLoader worker processes.")
@click.option("--in-memory", is_flag=True, help="Hold the training and validation features in RAM (fp16) instead of reading HDF5.")
@click.option("--device", default=_DEFAULTS["device"], show_default=True, metavar=DEVICE_METAVAR, callback=device_option_callback, help=f"{DEVICE_HELP} (bf16 autocast on CUDA).")
@click.option("--progress/--no-progress", default=_DEFAULTS["progress"], show_default=True, help="Show a progress bar per epoch.")
@click.pass_context
def train_command(ctx: click.Context, resume: bool, **params) -> None:
    """Train a 3SHNet model on cached features (the paper's recipe unless told otherwise)."""
    from .train import train

    explicit = {name for name in params if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
    params["caches"] = [str(c) for c in params["caches"]]
    if not resume and not params["caches"]:
        raise ShnetError("shnet train needs --cache CACHE_DIR (repeatable) and --captions FILE (unless a cache holds its captions)")
    options = TrainOptions(**params)
    summary = train(options, resume=resume, explicit=explicit, log=_log)
    if summary["rank"] == 0:
        click.echo(f"best validation rSum {summary['best_rsum']:.2f} at epoch {summary['best_epoch']}; run in {summary['run_dir']}")


@click.command("evaluate")
@click.argument("sources", nargs=-1, required=True)
@click.option("--ensemble", is_flag=True, help="SOURCES are several runs/checkpoints: average their similarity matrices.")
@click.option(
    "--sims",
    is_flag=True,
    help="SOURCES are saved .npy similarity results (plain images x captions matrices, or the published {'npts', 'sims'} files); "
    "several are averaged.",
)
@click.option(
    "--captions",
    type=click.Path(dir_okay=False),
    help="Caption file (default: the captions a given --cache holds, else the run's); another dataset's for cross-dataset evaluation.",
)
@click.option("--cache", "caches", multiple=True, type=click.Path(file_okay=False), help="Feature cache (repeatable; default: the run's).")
@click.option("--split", default="test", show_default=True)
@click.option(
    "--protocol",
    type=click.Choice(PROTOCOLS),
    default="auto",
    show_default=True,
    help="coco: 1K 5-fold mean + 5K; f30k: 1K; full: the split at once; auto: from the dataset and size.",
)
@click.option("--bert-path", type=click.Path(file_okay=False), help="Local bert-base-uncased folder (needed by reference checkpoints).")
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True)
@click.option("--device", default="auto", show_default=True, metavar=DEVICE_METAVAR, callback=device_option_callback, help=DEVICE_HELP + ".")
@click.option("--save-sims", type=click.Path(dir_okay=False), help="Save the (mean) similarity matrix as .npy.")
@click.option(
    "--sims-layout",
    type=click.Choice(SIMS_LAYOUTS),
    default="plain",
    show_default=True,
    help="--save-sims file: plain (float32 matrix) or 3shnet (the published {'npts', 'sims'} dict its eval_ensemble.py reads).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON ({protocol: {i2t, t2i, rsum}}) instead of the table.")
def evaluate_command(
    sources, ensemble, sims, captions, caches, split, protocol, bert_path, batch_size, workers, device, save_sims, sims_layout, as_json
) -> None:
    """Retrieval metrics of RUN_OR_CHECKPOINT (a run directory means its best.pth), of an --ensemble of
    runs, or of saved --sims matrices: R@1/5/10 both ways, medr, meanr, rSum."""
    from .evaluate import EvalRequest, evaluate_checkpoints, format_table, load_similarities, results_json, save_similarities
    from .metrics import protocol_metrics

    if sims and ensemble:
        raise ShnetError("--sims and --ensemble exclude each other (several --sims files are averaged anyway)")
    if sims_layout != "plain" and not save_sims:
        raise ShnetError(f"--sims-layout {sims_layout} says how --save-sims writes; add --save-sims FILE")
    if sims:
        ignored = [name for name, value in (("--captions", captions), ("--cache", caches), ("--bert-path", bert_path)) if value]
        if ignored:
            raise ShnetError(f"--sims evaluates saved matrices; {', '.join(ignored)} would not be used")
        matrix = load_similarities(sources)
        results = protocol_metrics(matrix, protocol)
        label = f"{len(sources)} saved similarity matrix(es)"
    else:
        if len(sources) > 1 and not ensemble:
            raise ShnetError(f"{len(sources)} runs given; pass --ensemble to average their similarities, or evaluate them one by one")
        request = EvalRequest(captions, [str(c) for c in caches], split, protocol, bert_path, batch_size, workers, device)
        evaluation = evaluate_checkpoints(sources, request, log=_log)
        matrix, results = evaluation.sims, evaluation.results
        label = f"split '{split}' of {evaluation.captions.source}: {evaluation.captions.num_images} images"
    if save_sims:
        _log(f"similarities saved to {save_similarities(save_sims, matrix, sims_layout)}")
    if as_json:
        click.echo(results_json(results))
    else:
        click.echo(f"{' + '.join(sources)} on {label}")
        click.echo(format_table(results))
