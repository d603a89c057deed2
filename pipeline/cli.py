"""The `imgsent` command line: thin typer commands that unpack arguments and call the stage functions.
Every UserError becomes one line on stderr and exit code 2; nothing already computed is deleted."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from features.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image sentiment / emotion classifiers by transfer learning on cached CNN features.")


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


def _torchrun_rank() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun, else (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


@app.command()
def extract(
    images: str = typer.Argument(..., help="ImageFolder directory (one sub-folder per class) or CSV with path,label[,group]"),
    out: str = typer.Option(..., "--out", help="HDF5 feature store to create or update"),
    backbone: str = typer.Option("efficientnet_lite0", help="efficientnet_lite0|1|2, fer_mini_xception, a timm name, or torchvision:NAME"),
    weights: Optional[str] = typer.Option(None, help="local state dict for the backbone (torch.load weights_only)"),
    batch_size: int = typer.Option(32, help="images per forward pass"),
    workers: int = typer.Option(1, help="DataLoader decode workers"),
    device: str = typer.Option("auto", help="auto|cpu|cuda"),
    dtype: str = typer.Option("float32", help="feature dtype in the store: float32|float16"),
    classes: Optional[str] = typer.Option(None, help="comma-separated class list; other labels are skipped"),
    force: bool = typer.Option(False, help="rebuild a store made with another backbone / weights / preprocessing"),
    strict: bool = typer.Option(False, help="exit 1 when any image was skipped"),
    allow_outside: bool = typer.Option(False, help="accept manifest paths outside the manifest's folder"),
    num_shards: Optional[int] = typer.Option(None, help="split images into K shards by content hash (Slurm arrays)"),
    shard_index: Optional[int] = typer.Option(None, help="which shard this process extracts (0..K-1)"),
    commit_every: int = typer.Option(256, help="images per durable commit (resume granularity)"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Embed every image once with a frozen backbone into an HDF5 store (incremental, resumable)."""
    from features.extract import Interrupted, assemble_shards
    from features.extract import extract as run

    rank, world = _torchrun_rank()
    distributed = num_shards is None and world > 1
    k, i = (world, rank) if distributed else (num_shards or 1, shard_index or 0)
    if num_shards is not None and shard_index is None:
        _fail("--num-shards needs --shard-index (0..K-1); assemble finished shards with `imgsent assemble`")
    try:
        s = run(images=images, out=out, backbone=backbone, weights=weights, batch_size=batch_size, workers=workers,
                device=device, dtype=dtype, force=force, classes=classes.split(",") if classes else None,
                allow_outside=allow_outside, commit_every=commit_every, num_shards=k, shard_index=i,
                progress=progress and rank == 0)
    except Interrupted as e:
        _fail(str(e), 130)
    for path, why in s.skipped[:20]:
        typer.echo(f"skipped {path}: {why}", err=True)
    if len(s.skipped) > 20:
        typer.echo(f"... {len(s.skipped) - 20} more skipped; the store lists them all (skipped_paths)", err=True)
    for path, why in s.conflicts[:20]:
        typer.echo(f"label conflict {path}: {why}", err=True)
    typer.echo(s.line())
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        dist.barrier()  # every shard is complete on disk
        if rank == 0:
            typer.echo(assemble_shards(out=out, num_shards=k).line())
        dist.barrier()
        dist.destroy_process_group()
    if strict and s.skipped:
        raise typer.Exit(1)


@app.command()
def assemble(out: str = typer.Argument(..., help="the store the shards were extracted for (--out)"),
             num_shards: int = typer.Option(..., help="K, as given to extract --num-shards")) -> None:
    """Merge finished shard stores (STORE.shard-I-of-K.h5) into STORE.h5."""
    from features.extract import assemble_shards
    typer.echo(assemble_shards(out=out, num_shards=num_shards).line())


@app.command("train-head")
def train_head(
    stores: Optional[List[str]] = typer.Argument(None, help="one or more stores, fused by image content "
                                                 "(default: paths.train_stores/<backbone>.h5 from params)"),
    out: str = typer.Option(..., "--out", help="model directory to write"),
    params: Optional[str] = typer.Option(None, help="params.yaml (default: ./params.yaml if present, else built-ins)"),
    intersect: bool = typer.Option(False, help="with several stores, use only the images they share"),
) -> None:
    """Cross-validate the head on cached features, calibrate it, and fit it on all images."""
    from pipeline.cv import train_head as run
    from pipeline.params import load_params
    p = load_params(params)
    run(stores=stores or p.stores(p.paths.train_stores), out=out, params=p, intersect=intersect, progress=typer.echo)


@app.command()
def evaluate(model_dir: str = typer.Argument(...),
             stores: Optional[List[str]] = typer.Argument(None, help="labelled held-out store(s), one per backbone "
                                                          "(default: paths.test_stores/<backbone>.h5 from params)"),
             out: str = typer.Option(..., "--out"), params: Optional[str] = typer.Option(None)) -> None:
    """Metrics, confusion matrix and misclassified images on a labelled held-out store."""
    from pipeline.evaluate import evaluate as run
    from pipeline.params import load_params
    if not stores:
        p = load_params(params)
        stores = p.stores(p.paths.test_stores)
    run(model_dir=model_dir, stores=stores, out=out, progress=typer.echo)


@app.command()
def report(model_dir: str = typer.Argument(...),
           stores: Optional[List[str]] = typer.Argument(None, help="labelled held-out store(s) to add a test section"),
           out: str = typer.Option("report", "--out"), gallery: int = typer.Option(60, help="misclassified images shown"),
           params: Optional[str] = typer.Option(None, help="with no STORE: add paths.test_stores from this params file")) -> None:
    """Self-contained HTML error analysis: CIs, per-class table, confusion, gallery, label errors, near-duplicates."""
    from pipeline.params import load_params
    from pipeline.report import build_report
    if not stores and params:
        p = load_params(params)
        stores = p.stores(p.paths.test_stores)
    build_report(model_dir=model_dir, out=out, test_stores=stores or None, gallery=gallery, progress=typer.echo)


@app.command()
def export(model_dir: str = typer.Argument(...), format: str = typer.Option("torchscript", "--format", help="torchscript|onnx"),
           out: str = typer.Option(..., "--out")) -> None:
    """One file with backbone(s) + head + preprocessing: uint8 (B, H, W, 3) RGB in, calibrated (B, C) out."""
    from pipeline.export import export as run
    typer.echo(f"{run(model_dir=model_dir, fmt=format, out=out)}: exported ({format})")


@app.command()
def predict(model_dir: str = typer.Argument(...), paths: List[str] = typer.Argument(..., help="image files or folders"),
            out: str = typer.Option("predictions.csv", "--out"),
            min_confidence: float = typer.Option(0.0, help="below this calibrated confidence the label is 'unsure'"),
            device: str = typer.Option("auto"), batch_size: int = typer.Option(32)) -> None:
    """Classify images; writes path,label,confidence,p_<class>...,error."""
    from pipeline.predict import load_model, write_prediction_csv
    if not 0.0 <= min_confidence <= 1.0:
        _fail(f"--min-confidence {min_confidence}: must be within [0, 1]")
    pred = load_model(model_dir, device=device).predict(paths, min_confidence=min_confidence, batch_size=batch_size)
    write_prediction_csv(out, pred)
    bad = sum(1 for e in pred.errors if e)
    typer.echo(f"{out}: {len(pred.paths)} images, {bad} unreadable")


def main() -> None:
    try:
        app()
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
