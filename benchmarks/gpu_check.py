"""Stage one at the machine's speed (issue #22), every figure side by side in one run, in <= 6 minutes on a GPU
box; on a machine without a GPU it measures the CPU figures and says what it skipped.

    python benchmarks/gpu_check.py [--photos 2000] [--emoji DIR] [--threads N] [--out DIR]

  forward alone   Lite0 on a resident uint8 batch: fp32 with TF32 off (what extract runs) and bf16 autocast (the
                  old default, for the record); on CPU the onnxruntime engine
  decode alone    decode + resize to the 224 px input, 1 thread and N threads: PIL + float resize (main before
                  #22) and libjpeg-turbo via simplejpeg + uint8 resize (the CPU recipe); nvJPEG + the exact
                  integer resize on the GPU (features/models/gpu_jpeg.py), its inputs against the CPU recipe's
                  byte for byte (photos and JPEG flavours), nvJPEG's pixels against libjpeg-turbo's
  embed loop      iter_embeddings with JPEGs decoded on the GPU and on the CPU threads, batch 32 and 256
  extract         `imgsent extract` with default flags on 1,000 and on all photos (and the steady rate the two
                  give), and with --batch-size 256
  parity          the same images extracted with --device cpu and --device cuda: min / mean cosine, max rel. error
  predict         `imgsent predict` wall time on CUDA and on CPU (a few hundred images), max |dp| between them

Photos: photo-like JPEGs (real sample photos, random crops, noise), 3 of 4 at 800x600 and 1 of 4 at 1600x1200.
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from features.models.backbones import load_backbone  # noqa: E402
from features.models.preprocess import prepare
from features.models.engine import forward_engine  # noqa: E402
from features.input.images import decode_tensor  # noqa: E402
from features.input.prefetch import available_cores, ordered_map  # noqa: E402
from features.storage.store import read_store  # noqa: E402

CUDA = torch.cuda.is_available()


def make_photos(folder: Path, n: int, threads: int) -> list[str]:
    from skimage import data
    srcs = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(), data.immunohistochemistry()]

    def one(i: int) -> str:
        rng = np.random.default_rng(i)
        w, h = (1600, 1200) if i % 4 == 3 else (800, 600)
        src = srcs[i % len(srcs)]
        y, x = rng.integers(0, src.shape[0] // 4), rng.integers(0, src.shape[1] // 4)  # a random crop
        im = Image.fromarray(src[y:, x:]).resize((w, h), Image.BICUBIC)
        a = np.asarray(im, np.float32) + rng.normal(0, 6, (h, w, 3))  # sensor noise: photo-like entropy
        path = folder / f"c{i % 4}" / f"p{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        return str(path)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, range(n)))


def rate(fn, items, threads: int) -> float:
    """items/s of fn over items on `threads` threads (1 = inline)."""
    t = time.perf_counter()
    for _ in ordered_map(fn, items, workers=0 if threads == 1 else threads, window=4 * threads):
        pass
    return len(items) / (time.perf_counter() - t)


def old_decode(path: str, pre) -> torch.Tensor:
    """main before #22: PIL decode, float antialiased resize (recipe version 3)."""
    with Image.open(path) as im:
        rgb = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)[None].float()
    h, w = rgb.shape[2:]
    s = pre.resize / min(h, w)
    x = F.interpolate(rgb, size=[round(h * s), round(w * s)], mode="bicubic", antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def forward_rates(bb) -> dict[str, float]:
    out = {}
    x = torch.randint(0, 256, (256 if CUDA else 32, 3, 224, 224), dtype=torch.uint8)
    if CUDA:
        graphed = forward_engine(bb, "cuda", 256)  # fp32, TF32 off, CUDA graph, parity-checked
        x = x.cuda().contiguous(memory_format=torch.channels_last)
        for name, bf16, model in (("fp32 (TF32 off), CUDA graph", False, graphed),
                                  ("bf16 autocast, eager (the old default)", True, bb.embedder)):
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
                for _ in range(3):
                    model(x)
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(20):
                    model(x)
                torch.cuda.synchronize()
            out[f"Lite0 forward, {name}, batch 256, resident"] = 20 * len(x) / (time.perf_counter() - t)
    else:
        model = forward_engine(bb, "cpu", 32)
        with torch.inference_mode():
            model(x)
            t = time.perf_counter()
            for _ in range(4):
                model(x)
        out["Lite0 forward, CPU engine, batch 32"] = 4 * len(x) / (time.perf_counter() - t)
    return out


def nvjpeg_rate(paths: list[str], bb) -> float:
    """img/s of the GPU's share of the GPU path alone (features/models/gpu_jpeg.py: nvJPEG + the exact resize), 256
    JPEGs a call, their bytes already read and validated."""
    from features.models import gpu_jpeg
    jpegs = [decode_tensor(p, defer_jpeg=True) for p in paths]
    gpu_jpeg.decode_inputs(jpegs[:8], bb.pre, "cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(0, len(jpegs), 256):
        gpu_jpeg.decode_inputs(jpegs[i:i + 256], bb.pre, "cuda")
    torch.cuda.synchronize()
    return len(paths) / (time.perf_counter() - t)


def embed_rates(paths: list[str], threads: int) -> dict[str, float]:
    """img/s of iter_embeddings (no store, no start-up) on CUDA: JPEGs decoded on the GPU (now) and on the CPU
    threads (before), batch 32 and 256."""
    from features.models import embed
    bb = load_backbone("efficientnet_lite0", device="cuda")
    out = {}
    real = embed._gpu_jpeg_batches

    def threads_decode(bb, paths, batch_size, workers, *, device, layout):  # the CPU path, as before the GPU path
        return embed._input_batches(bb, paths, batch_size, workers, pinned=True, layout=layout)
    for batch in (32, 256):
        model = forward_engine(bb, "cuda", batch)
        for name, gpu in (("JPEG decoded on the GPU", True), ("decoded by the CPU threads", False)):
            embed._gpu_jpeg_batches = real if gpu else threads_decode
            t = time.perf_counter()
            for _ in embed.iter_embeddings(bb, paths, batch_size=batch, workers=threads, device="cuda",
                                           progress=False, model=model):
                pass
            out[f"embed loop, {name}, batch {batch}"] = len(paths) / (time.perf_counter() - t)
    embed._gpu_jpeg_batches = real
    return out


def nvjpeg_parity(paths: list[str]) -> dict[str, float]:
    """Does the GPU path keep the CPU's fingerprint? The network inputs of features/models/gpu_jpeg.py (nvJPEG +
    the exact integer resize) against the CPU recipe's, byte for byte, on the photos and on a set of JPEG
    flavours (subsamplings, grey, qualities, odd sizes, restart markers, EXIF orientations); then nvJPEG's raw
    pixels against libjpeg-turbo's with fast (replicating, the recipe) and default (interpolating) chroma."""
    import simplejpeg
    from features.models import gpu_jpeg
    from features.input.images import JpegBytes
    bb = load_backbone("efficientnet_lite0", device="cuda")
    flavours = Path(tempfile.mkdtemp(prefix="imgsent-flavours-"))
    photo = Image.open(paths[0]).convert("RGB")
    for k, (size, kw) in enumerate([((800, 600), {}), ((801, 599), {"subsampling": 1}), ((333, 251), {"subsampling": 0}),
                                    ((1600, 1200), {"quality": 50}), ((640, 480), {"quality": 100}),
                                    ((1023, 767), {"quality": 75})]):
        photo.resize(size).save(flavours / f"f{k}.jpg", **{"quality": 90, **kw})
        photo.resize(size).convert("L").save(flavours / f"g{k}.jpg", quality=90)
        exif = photo.getexif()
        exif[0x0112] = 1 + k % 8
        photo.resize(size).save(flavours / f"o{k}.jpg", quality=85, exif=exif)
    try:  # restart markers: PIL cannot write them
        import cv2
        cv2.imwrite(str(flavours / "rst.jpg"), np.asarray(photo)[:, :, ::-1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 4])
    except (ImportError, AttributeError):
        pass
    out = {}
    for name, group in (("photos", paths), ("JPEG flavours", sorted(map(str, flavours.iterdir())))):
        jpegs = [j for j in (decode_tensor(q, defer_jpeg=True) for q in group) if isinstance(j, JpegBytes)]
        got = gpu_jpeg.decode_inputs(jpegs, bb.pre, "cuda").cpu()
        want = torch.stack([prepare(gpu_jpeg.cpu_decode(j), bb.pre) for j in jpegs])
        out[f"GPU JPEG path vs CPU recipe, {name}: images checked"] = len(jpegs)
        out[f"GPU JPEG path vs CPU recipe, {name}: images with any other byte"] = int((got != want).flatten(1).any(1).sum())
        with torch.inference_mode():
            fa, fb = (bb.embedder(v.cuda().contiguous(memory_format=torch.channels_last)).double() for v in (got, want))
        out[f"GPU JPEG path vs CPU recipe, {name}: min feature cosine"] = float(F.cosine_similarity(fa, fb).min())
    nv = gpu_jpeg.nvjpeg([torch.frombuffer(bytearray(Path(q).read_bytes()), dtype=torch.uint8) for q in paths], "cuda")
    for fast in (True, False):
        d = [(x.cpu().int() - torch.from_numpy(simplejpeg.decode_jpeg(Path(q).read_bytes(), colorspace="RGB",
              fastupsample=fast)).permute(2, 0, 1).int()).abs() for x, q in zip(nv, paths)]
        name = "fastupsample, the recipe" if fast else "default upsampling, PIL's"
        out[f"nvJPEG vs libjpeg-turbo ({name}) pixels: max |d|"] = float(max(int(x.max()) for x in d))
        out[f"nvJPEG vs libjpeg-turbo ({name}) pixels: mean |d|"] = float(sum(x.float().mean() for x in d) / len(d))
    shutil.rmtree(flavours, ignore_errors=True)
    return out


def imgsent(*args: str, env: dict | None = None) -> tuple[str, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", *args], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **(env or {})})
    if r.returncode:
        raise SystemExit(f"imgsent {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout + r.stderr, time.perf_counter() - t


def extract_rate(images: Path, store: Path, *flags: str) -> float:
    store.unlink(missing_ok=True)
    text, secs = imgsent("extract", str(images), "--out", str(store), "--no-progress", *flags)
    m = re.search(r"([\d.]+) img/s embedding", text)
    return float(m.group(1)) if m else float("nan")


def parity(a: Path, b: Path) -> tuple[float, float, float]:
    sa, sb = read_store(str(a)), read_store(str(b))
    xb = dict(zip(sb.sha256, sb.features))
    x = np.stack([f for s, f in zip(sa.sha256, sa.features)]).astype(np.float64)
    y = np.stack([xb[s] for s in sa.sha256]).astype(np.float64)
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    rel = np.abs(x - y).max() / np.abs(x).max()
    return float(cos.min()), float(cos.mean()), float(rel)


def predict_check(work: Path, images: Path, store: Path) -> dict[str, float]:
    """A linear head on `store`, then predict on `images` on each device: wall seconds and max |dp|."""
    params = (ROOT / "params.yaml").read_text()
    params = re.sub(r"train_stores: .*", f"train_stores: {store.parent}", params)
    params = re.sub(r"backbones: \[[^]]*\]", "backbones: [efficientnet_lite0]", params)
    params = re.sub(r"hidden: \[[^]]*\]", "hidden: []", params)
    params = re.sub(r"folds: \d+", "folds: 2", params)
    (work / "params.yaml").write_text(params)
    imgsent("train-head", "--params", str(work / "params.yaml"), "--out", str(work / "model"))
    out = {}
    probs = {}
    for dev in (["cuda", "auto"] if CUDA else []) + ["cpu"]:
        csv_path = work / f"pred-{dev}.csv"
        _, out[f"predict wall s, {dev}"] = imgsent("predict", str(work / "model"), str(images), "--out", str(csv_path),
                                                   "--device", dev, "--no-progress")
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        probs[dev] = {r["path"]: [float(r[k]) for k in r if k.startswith("p_")] for r in rows if not r["error"]}
    if CUDA:  # the images both devices predicted (a file that is no image is an error row on both)
        both = sorted(probs["cuda"].keys() & probs["cpu"].keys())
        out["predict max |dp| cuda vs cpu"] = float(np.abs(np.array([probs["cuda"][k] for k in both]) -
                                                           np.array([probs["cpu"][k] for k in both])).max())
    return out


class Table(dict):
    """Rows printed as they are measured: a run cut short still shows what it measured."""

    def __setitem__(self, key: str, value: float) -> None:
        super().__setitem__(key, value)
        print(f"{key:72s} {value:10.4f}" if value < 10 else f"{key:72s} {value:10.1f}", flush=True)

    def update(self, other: dict) -> None:
        for k, v in other.items():
            self[k] = v


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=2000)
    ap.add_argument("--emoji", default=str(ROOT.parent / "shared" / "data" / "emoji-faces7"),
                    help="a folder of class folders for the parity and predict checks")
    ap.add_argument("--threads", type=int, default=max(1, available_cores() - 2))
    ap.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="imgsent-gpu-check-"))
    os.environ.setdefault("IMGSENT_CACHE", str(work / "cache"))
    n, t = args.photos, args.threads
    print(f"device: {torch.cuda.get_device_name() if CUDA else 'no GPU'}; {available_cores()} cores; torch "
          f"{torch.__version__}; decode threads {t}", flush=True)
    t0 = time.time()
    paths = make_photos(work / "photos", n, available_cores())
    print(f"{n} photos made in {time.time() - t0:.0f} s", flush=True)
    bb = load_backbone("efficientnet_lite0")
    rows = Table()
    rows.update(forward_rates(load_backbone("efficientnet_lite0", device="cuda") if CUDA else bb))
    few = paths[:200]
    rows["decode+resize, PIL + float resize (before), 1 thread"] = rate(lambda p: old_decode(p, bb.pre), few, 1)
    rows[f"decode+resize, PIL + float resize (before), {t} threads"] = rate(lambda p: old_decode(p, bb.pre), paths[:1000], t)
    rows["decode+resize, libjpeg-turbo + uint8 resize (CPU recipe), 1 thread"] = rate(lambda p: prepare(decode_tensor(p), bb.pre), few, 1)
    rows[f"decode+resize, libjpeg-turbo + uint8 resize (CPU recipe), {t} threads"] = rate(
        lambda p: prepare(decode_tensor(p), bb.pre), paths[:1000], t)
    # what the decode threads do per JPEG when the GPU decodes: read, header, validation at 1/8 scale
    rows["decode threads' share of the GPU path (read + validate), 1 thread"] = rate(
        lambda p: decode_tensor(p, defer_jpeg=True), few, 1)
    rows[f"decode threads' share of the GPU path (read + validate), {t} threads"] = rate(
        lambda p: decode_tensor(p, defer_jpeg=True), paths[:1000], t)
    if CUDA:
        rows["decode+resize, nvJPEG batched 256 + exact GPU resize"] = nvjpeg_rate(paths[:1000], bb)
        rows.update(nvjpeg_parity(paths[:256]))
        rows.update(embed_rates(paths[:2000], t))
    print(f"decode figures done at {time.time() - t0:.0f} s", flush=True)
    # extract's "img/s embedding" counts the engine's start (CUDA context, graph capture, parity: seconds), so
    # two folder sizes give the steady rate too: (n2 - n1) / (seconds2 - seconds1)
    first, n1 = work / "photos-first", min(n, 1000)
    for q in paths[:n1]:
        (first / Path(q).parent.name).mkdir(parents=True, exist_ok=True)
        os.link(q, first / Path(q).parent.name / Path(q).name)
    r1 = rows[f"imgsent extract, default flags, {n1:,} photos"] = extract_rate(first, work / "s-first.h5")
    r2 = rows[f"imgsent extract, default flags, {n:,} photos"] = extract_rate(work / "photos", work / "s-default.h5")
    if n > n1:
        rows["imgsent extract, default flags, steady rate (from the two runs)"] = (n - n1) / (n / r2 - n1 / r1)
    rows[f"imgsent extract --batch-size 256, {n:,} photos"] = extract_rate(
        work / "photos", work / "s-tuned.h5", "--batch-size", "256")
    print(f"extract figures done at {time.time() - t0:.0f} s", flush=True)
    emoji = Path(args.emoji)
    stores = work / "stores"
    stores.mkdir(exist_ok=True)
    extract_rate(emoji, stores / "efficientnet_lite0.h5", "--device", "cpu")
    if CUDA:
        extract_rate(emoji, work / "emoji-cuda.h5", "--device", "cuda")
        rows["parity emoji cpu vs cuda: min cosine"], rows["parity emoji: mean cosine"], \
            rows["parity emoji: max rel error"] = parity(stores / "efficientnet_lite0.h5", work / "emoji-cuda.h5")
        extract_rate(first, work / "s-cpu.h5", "--device", "cpu")
        rows["parity photos cpu vs cuda: min cosine"], rows["parity photos: mean cosine"], \
            rows["parity photos: max rel error"] = parity(work / "s-cpu.h5", work / "s-default.h5")
    rows.update(predict_check(work, emoji, stores / "efficientnet_lite0.h5"))
    print(f"all done in {time.time() - t0:.0f} s; work folder {work}")
    if not CUDA:
        print("no GPU: the forward, nvJPEG, parity and CUDA predict rows were skipped")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
