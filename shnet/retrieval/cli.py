"""``shnet encode`` and ``shnet search`` (registered in the main CLI group)."""

from __future__ import annotations

import json

import click

from ..devices import DEVICE_HELP, DEVICE_METAVAR, device_option_callback
from ..errors import ShnetError
from ..fileio import terminal_safe, writable_destination
from .store import DTYPES


def _log(message: str) -> None:
    click.echo(message, err=True)


@click.command("encode")
@click.argument("run", type=click.Path(exists=True))
@click.option("--cache", "caches", multiple=True, required=True, type=click.Path(file_okay=False), help="Feature cache (repeatable; joined on image_id).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Embedding store directory (created if new, resumed if not).")
@click.option("--captions", type=click.Path(dir_okay=False), help="Also encode these captions (Karpathy JSON, or CSV/Parquet image_id, caption, split; default: the captions a cache holds, if one does).")
@click.option("--split", help="Encode the captions of this split only (default: every split).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Stored embedding precision.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--shard-size", type=int, default=10000, show_default=True, help="Rows per Parquet shard (the unit of resume).")
@click.option("--workers", type=int, default=0, show_default=True, help="DataLoader worker processes reading the caches.")
@click.option("--device", default="auto", show_default=True, metavar=DEVICE_METAVAR, callback=device_option_callback, help=DEVICE_HELP + ".")
@click.option("--bert-path", type=click.Path(file_okay=False), help="Local bert-base-uncased folder (needed by reference checkpoints).")
@click.option("--index", "build", is_flag=True, help="Also build the approximate FAISS index (needs faiss) and report its recall@10.")
@click.option("--index-recall", type=float, default=0.95, show_default=True, help="Recall@10 the index's nprobe is tuned to reach.")
@click.option("--index-queries", type=int, default=1000, show_default=True, help="Held-out queries used to tune and measure the index.")
def encode_command(run, caches, output, captions, split, dtype, batch_size, shard_size, workers, device, bert_path, build, index_recall, index_queries):
    """Embeddings of every usable image of the caches (and of --captions) with RUN (a run directory
    means its best.pth), as Parquet shards in OUTPUT; resumable by shard."""
    from .encode import EncodeRequest, encode
    from .index import build_index

    request = EncodeRequest(run, [str(c) for c in caches], output, captions, split, dtype, batch_size, shard_size, workers, device, bert_path)
    report = encode(request, log=_log)
    totals = ", ".join(f"{report.totals[p]} {p} ({report.encoded[p]} encoded now)" for p in report.totals)
    click.echo(f"{report.store}: {totals}; {report.skipped_images} image(s) without usable features skipped; {report.seconds:.1f}s")
    if build:
        record = build_index(report.store, index_recall, index_queries, log=_log)
        caption = record["caption_recall_at_10"]
        click.echo(
            f"index {record['type']}: nprobe {record['nprobe']}, recall@10 {record['recall_at_10']:.3f} vs exact on "
            f"{record['held_out_queries']} held-out images" + (f", {caption:.3f} on caption queries" if caption is not None else "")
            + f"; built in {record['build_seconds']:.1f}s"
        )


@click.command("search")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("queries", nargs=-1)
@click.option("-k", "k", type=int, default=10, show_default=True, help="Hits per query.")
@click.option("--image", "image_id", help="Image-to-text: the captions closest to this image_id (needs encoded captions).")
@click.option("--ann", is_flag=True, help="Use the approximate index built by `shnet encode --index` instead of exact search.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: one {query, searched, method, hits} per query.")
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write the hits as a static HTML page with thumbnails.")
@click.option("--device", default="auto", show_default=True, metavar=DEVICE_METAVAR, callback=device_option_callback, help=f"{DEVICE_HELP}: where query texts are encoded (scoring runs on the CPU over the memory-mapped store).")
@click.option("--bert-path", type=click.Path(file_okay=False), help="Local bert-base-uncased folder (needed by reference checkpoints).")
def search_command(store, queries, k, image_id, ann, as_json, html_path, device, bert_path):
    """Text-to-image top-k over the embeddings in STORE for each QUERY text (exact unless --ann),
    or image-to-text with --image IMAGE_ID."""
    from .search import search_image, search_text

    if image_id and queries:
        raise ShnetError("give query texts or --image IMAGE_ID, not both")
    if html_path:
        writable_destination(html_path, "--html")
    query_path = ""
    if image_id:
        if ann:
            raise ShnetError("--ann searches images; image-to-text (--image) is always exact")
        results = [search_image(store, image_id, k)]
        query_path = _image_path(store, image_id)
    else:
        results = search_text(store, list(queries), k, "ann" if ann else "exact", device, bert_path)
    if html_path:
        from .html import write_results
        from .store import EmbeddingStore

        _log(f"hits written to {write_results(html_path, EmbeddingStore(store).root, results, query_path)}")
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
        return
    for result in results:
        click.echo(f"{terminal_safe(result.query)}  ({result.method} search over {result.part})")
        for hit in result.hits:
            if result.part == "images":
                line = f"{hit.fields['image_id']}  {hit.fields['path']}"
            else:
                line = f"{hit.fields['caption']}  [{hit.fields['image_id'] or hit.fields['image']}]"
            click.echo(f"  {hit.rank:>3}  {hit.score:7.4f}  {terminal_safe(line)}")


def _image_path(store: str, image_id: str) -> str:
    from .store import EmbeddingStore

    row, _ = EmbeddingStore(store).find("images", "image_id", image_id)
    return EmbeddingStore(store).rows("images", [row], ["path"])[0]["path"]
