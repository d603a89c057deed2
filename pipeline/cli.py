"""The `imgsent` command line: thin typer commands that unpack arguments and call the stage functions.
Every UserError becomes one line on stderr and exit code 2; nothing already computed is deleted."""
from __future__ import annotations

import atexit
import gc
import os
import sys
from typing import List, Optional

import typer

from features.errors import UserError, broken_install

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image sentiment / emotion classifiers by transfer learning on cached CNN features.")


def _steps(line: str) -> None:
    """A command's progress lines: on a terminal (stderr) only; logs and pipes get its one summary line."""
    if sys.stderr.isatty():
        typer.echo(line, err=True)


def _bar(asked: bool) -> bool:  # a bar where a person watches; logs and pipes get the summary line only
    return asked and sys.stderr.isatty()


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(code)


@app.command()
def extract(
    images: str = typer.Argument(..., help="ImageFolder directory (one sub-folder per class) or CSV with path,label[,group]"),
    out: str = typer.Option(..., "--out", help="HDF5 feature store to create or update"),
    backbone: str = typer.Option("efficientnet_lite0", help="efficientnet_lite0|1|2, fer_mini_xception, a timm name, or torchvision:NAME"),
    weights: Optional[str] = typer.Option(None, help="local state dict for the backbone (torch.load weights_only)"),
    batch_size: int = typer.Option(32, help="images per forward pass"),
    workers: str = typer.Option("auto", help="decode threads: auto (one per available core) or a number; 0 "
                                "decodes in the main thread"),
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
    engine: str = typer.Option("auto", help="CPU forward engine: auto (onnxruntime when its features match "
                               "torch's, else torch) | onnx | torch"),
    faces: str = typer.Option("off", help="photos of people: off | largest (the largest face's crop) | all (one "
                              "row per face)"),
    faces_fallback: str = typer.Option("skip", help="an image without a face: skip (recorded as skipped) | whole"),
    verify: bool = typer.Option(False, help="read and hash every file again instead of trusting size, mtime and "
                                "inode (catches a file rewritten in place with its old mtime)"),
) -> None:
    """Embed every image once with a frozen backbone into an HDF5 store (incremental, resumable)."""
    from features.extract import Interrupted
    from features.extract import extract as run
    from features.shards import extract_distributed, torchrun_rank

    if num_shards is not None and shard_index is None:
        _fail("--num-shards needs --shard-index (0..K-1); assemble finished shards with `imgsent assemble`")
    rank, world = torchrun_rank()
    kw = dict(images=images, out=out, backbone=backbone, weights=weights, batch_size=batch_size, workers=workers,
              device=device, dtype=dtype, force=force, classes=classes.split(",") if classes is not None else None,
              allow_outside=allow_outside, commit_every=commit_every, progress=_bar(progress), engine=engine,
              faces=faces, faces_fallback=faces_fallback, verify=verify)
    try:
        if num_shards is None and world > 1:
            s = extract_distributed(rank=rank, world=world, echo=typer.echo, **kw)
        else:
            s = run(num_shards=num_shards or 1, shard_index=shard_index or 0, **kw)
    except Interrupted as e:
        _fail(str(e), 130)
    for line in s.detail_lines():
        typer.echo(line, err=True)
    typer.echo(s.line())
    if strict and s.skipped:
        raise typer.Exit(1)


@app.command()
def init(folder: str = typer.Argument(".", help="where to write params.yaml"),
         force: bool = typer.Option(False, help="overwrite an existing params.yaml")) -> None:
    """Write a params.yaml to edit: every setting with its default and what it means (no DVC paths)."""
    from pipeline.stages.init import write_params
    typer.echo(f"{write_params(folder, force=force)}: written; edit it, then run imgsent extract / train-head")


@app.command()
def assemble(out: str = typer.Argument(..., help="the store the shards were extracted for (--out)"),
             num_shards: int = typer.Option(..., help="K, as given to extract --num-shards")) -> None:
    """Merge finished shard stores (STORE.shard-I-of-K.h5) into STORE.h5."""
    from features.shards import assemble_shards
    typer.echo(assemble_shards(out=out, num_shards=num_shards).line())


@app.command("train-head")
def train_head(
    stores: Optional[List[str]] = typer.Argument(None, help="one or more stores, fused by image content "
                                                 "(default: paths.train_stores/<backbone>.h5 from params)"),
    out: str = typer.Option(..., "--out", help="model directory to write"),
    params: Optional[str] = typer.Option(None, help="params.yaml (default: ./params.yaml)"),
    intersect: bool = typer.Option(False, help="with several stores, use only the images they share"),
) -> None:
    """Cross-validate the head on cached features, calibrate it, and fit it on all images."""
    from pipeline.stages.train import notes, summary_line, train_head as run
    from pipeline.params import load_params
    p = load_params(params)
    m = run(stores=stores or p.stores("train_stores"), out=out, params=p, intersect=intersect, progress=_steps)
    typer.echo(summary_line(out, m))
    for note in notes(m):
        typer.echo(f"note: {note}", err=True)


@app.command()
def sweep(
    stores: Optional[List[str]] = typer.Argument(None, help="store(s) as for train-head (default: from params)"),
    out: str = typer.Option(..., "--out", help="folder for sweep.csv and best/ (the best config's model directory)"),
    grid: List[str] = typer.Option(..., "--grid", help="head.KEY=V1,V2,... (repeat for each key), e.g. "
                                   "--grid head.lr=0.001,0.003 --grid 'head.hidden=[],[256]'"),
    params: Optional[str] = typer.Option(None, help="params.yaml (default: ./params.yaml): the values not swept"),
    intersect: bool = typer.Option(False, help="with several stores, use only the images they share"),
    progress: bool = typer.Option(True, help="show a progress bar"),
) -> None:
    """Cross-validate every combination of head settings on the same folds in one process; rank by macro-F1."""
    from pipeline.params import load_params
    from pipeline.stages.sweep import sweep as run
    p = load_params(params)
    run(stores=stores or p.stores("train_stores"), out=out, params=p, grid=grid, intersect=intersect,
        progress=typer.echo, bar=_bar(progress))


@app.command()
def suggest(model_dir: str = typer.Argument(...),
            stores: List[str] = typer.Argument(..., help="store(s) of unlabelled images, one per backbone of the model"),
            n: int = typer.Option(50, "--n", help="how many images to suggest"),
            out: str = typer.Option("to_label.csv", "--out"),
            max_similarity: float = typer.Option(0.95, help="skip a candidate this similar (cosine) to one picked")
            ) -> None:
    """Rank unlabelled images by what labelling them would teach the head: uncertain first, no near-duplicates."""
    from pipeline.stages.suggest import suggest as run
    run(model_dir=model_dir, stores=stores, out=out, n=n, max_similarity=max_similarity, progress=typer.echo)


@app.command()
def evaluate(model_dir: str = typer.Argument(...),
             stores: Optional[List[str]] = typer.Argument(None, help="labelled held-out store(s), one per backbone "
                                                          "(default: paths.test_stores/<backbone>.h5 from params)"),
             out: str = typer.Option(..., "--out"), params: Optional[str] = typer.Option(None)) -> None:
    """Metrics, confusion matrix and misclassified images on a labelled held-out store."""
    from pipeline.stages.evaluate import evaluate as run
    from pipeline.params import load_params
    run(model_dir=model_dir, stores=stores or load_params(params).stores("test_stores"), out=out,
        progress=typer.echo)


@app.command()
def report(model_dir: str = typer.Argument(...),
           stores: Optional[List[str]] = typer.Argument(None, help="labelled held-out store(s) to add a test section"),
           out: str = typer.Option("report", "--out"), gallery: int = typer.Option(60, help="misclassified images shown"),
           params: Optional[str] = typer.Option(None, help="with no STORE: add paths.test_stores from this params file")) -> None:
    """Self-contained HTML error analysis: CIs, confusion, gallery, label errors, near-duplicates, learning curve, map."""
    from pipeline.params import load_params
    from pipeline.stages.report import build_report, summary_line
    stores = stores or (load_params(params).stores("test_stores") if params else None)
    typer.echo(summary_line(out, build_report(model_dir=model_dir, out=out, test_stores=stores or None, gallery=gallery,
                                              progress=_steps)))


@app.command()
def export(model_dir: str = typer.Argument(...), format: str = typer.Option("torchscript", "--format", help="torchscript|onnx"),
           out: str = typer.Option(..., "--out"), adapt_to: Optional[str] = typer.Option(
               None, "--adapt-to", help="one source's images, a folder or a CSV manifest: its shift baked in "
               "(default: none)"), adapt_group: Optional[str] = typer.Option(
               None, "--adapt-group", help="the manifest group --adapt-to bakes in, when the manifest has several")) -> None:
    """One file with backbone(s) + head + preprocessing: uint8 (B, H, W, 3) RGB in, calibrated (B, C) out."""
    from pipeline.stages.export import export as run
    _steps(f"{out}: exporting backbone(s) and head to {format}{' (up to a minute)' if format == 'onnx' else ''}")
    dst = run(model_dir=model_dir, fmt=format, out=out, adapt_to=adapt_to, adapt_group=adapt_group)
    to = f"{f'group {adapt_group} of ' if adapt_group else ''}{adapt_to}"
    typer.echo(f"{dst}: exported ({format}{f', adapted to {to}' if adapt_to else ''})")


@app.command()
def predict(model_dir: str = typer.Argument(...),
            paths: List[str] = typer.Argument(..., help="image files, folders, a CSV manifest path[,label][,group], or the "
                                         "stores they were extracted to (one per backbone: no CNN run)"),
            out: Optional[str] = typer.Option(None, "--out", help="predictions CSV to write ('-': standard output); "
                                              "without it each image's label is printed"),
            source: str = typer.Option("argument", help="images adapted together: argument (each folder, manifest "
                                       "group, or the files named) | call (all) | none (each image alone)"),
            min_confidence: float = typer.Option(0.0, help="below this calibrated confidence the label is 'unsure'"),
            device: str = typer.Option("auto"), batch_size: int = typer.Option(32),
            workers: str = typer.Option("auto", help="decode threads: auto (one per core), a number, or 0"),
            progress: bool = typer.Option(True, help="show a progress bar"),
            engine: str = typer.Option("auto", help="CPU forward engine: auto | onnx | torch (as extract)"),
            ood_quantile: float = typer.Option(0.99, help="label 'unsure' an image farther from the training images "
                                               "than this quantile of the training images themselves (1 = never)")) -> None:
    """Classify images; writes path,predicted,confidence,ood_score,p_<class>...,source,adapted,error."""
    from pipeline.inference.predict import load_model
    from pipeline.inference.predictions import check_predict_args, check_prediction_out, write_prediction_csv
    from pipeline.inference.summary import label_lines, summary_line
    check_predict_args(batch_size=batch_size, workers=workers, min_confidence=min_confidence,
                       ood_quantile=ood_quantile, engine=engine, source=source)
    model = load_model(model_dir, device=device)  # the head and model.json only: the backbones load on first use
    if out is not None:
        check_prediction_out(out, faces=model.faces is not None)
    pred = model.predict(paths, min_confidence=min_confidence, batch_size=batch_size, workers=workers,
                         progress=_bar(progress), engine=engine, ood_quantile=ood_quantile, source=source)
    if out is not None:
        write_prediction_csv(out, pred)
    else:
        for line in label_lines(pred):
            typer.echo(line)
    typer.echo(summary_line(pred, out), err=out is None or out == "-")


def main() -> None:
    """Console entry point: every failure is one line `error: ...` (no traceback); exit 2 for bad input."""
    atexit.register(gc.freeze)  # the exit's last garbage collection, over objects nothing waits on, skipped: 0.3 s
    # of the 0.5 s between a FER-sized train-head's last line and the prompt (outputs are closed and renamed by then)
    try:
        rc = app(standalone_mode=False)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - click's classes (vendored by typer or not) are matched by name
        kinds = {c.__name__ for c in type(e).__mro__}
        if "Exit" in kinds:
            sys.exit(getattr(e, "exit_code", 0))
        if "Abort" in kinds:
            typer.echo("error: interrupted", err=True)
            sys.exit(130)
        if "UsageError" in kinds:
            ctx = getattr(e, "ctx", None)
            cmd = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
            msg = e.format_message()
            if msg:  # empty: the help was printed (no arguments)
                typer.echo(f"error: {msg} (see imgsent{cmd} --help)", err=True)
            sys.exit(2)
        if os.environ.get("IMGSENT_DEBUG"):
            raise
        broken = broken_install(e)
        if broken:
            typer.echo(f"error: {broken}", err=True)
            sys.exit(2)
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        typer.echo(f"error: unexpected {e.__class__.__name__}: {text} (a bug: please report it with the output of "
                   "IMGSENT_DEBUG=1 and the same command)", err=True)
        sys.exit(1)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
