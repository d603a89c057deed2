"""Is an image like anything the head was trained on? Temperature scaling calibrates confidence on images like
the training ones only: a photo of a city can get 'happy' at 0.999. The out-of-distribution score is the k-NN
cosine distance of the raw features to a reference sample of the training images:

    score(x) = 1 - mean of the K largest cosines between x and the reference rows      (0 = a known image)

Raw features, not the head's standardised ones: standardised by the per-dimension spread of a few dozen training
images (in 1,280 dimensions) every image looks far, and a model of 51 emoji flagged no photo; raw, its training
images lie within 0.33 of each other and photos 0.71 or more. On the shared emoji it flags as many unseen styles
and more strangers (benchmarks/ood.py). Nor adapted features (heads/adapt.py): adaptation makes strangers look
familiar too.

Flagged when above the `quantile` of the reference rows' own leave-one-out scores (0.99: 1% of training-like
images flagged), computed for a random MAX_LOO of them. Stored in the model directory as ood.npz (ref (R, D)
float16, loo (Q,) sorted, Q <= R; and `seen` (S,), the image_ids of every training image, so that evaluate
never calls one of them held out), checksummed in model.json. Mahalanobis distance per class was measured against
it (benchmarks/ood.py, BENCHMARKS.md).
"""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np

from features.errors import UserError
from features.input.images import sha256_file

K = 10
MAX_REF = 4096  # reference rows kept: (4096, 1280) float16 = 10 MB
MAX_LOO = 2048  # reference rows scored leave-one-out for the threshold: half the (R, R) product of all of them
QUERY_CHUNK = 256  # rows scored at once: a (256, R) block of similarities, 4 MiB against 4,096 reference rows
REF_BLOCK = 1024  # reference rows in float32 at once: 5 MiB at 1,280 features
DEFAULT_QUANTILE = 0.99
SPACE = "raw"  # model.json's ood record says which features the reference rows are
FIX = "re-run imgsent train-head to rebuild it"


def normalise(x: np.ndarray) -> np.ndarray:
    """Raw features (N, D) -> unit-length rows (N, D) float32 (one new array, then in place)."""
    z = np.array(x, np.float32)
    z /= np.maximum(np.sqrt(np.einsum("ij,ij->i", z, z)), 1e-12)[:, None]
    return z


def knn_distance(q: np.ndarray, ref: np.ndarray, *, k: int = K, exclude: np.ndarray | None = None) -> np.ndarray:
    """1 - mean of the k largest cosines of each unit row of q (M, D) against ref (R, D). `exclude` (M,): q[i] is
    ref[exclude[i]], whose match with itself is left out (leave-one-out). Arrays in float32 (load_ood's ref) are
    used as they are; in float16 (fit_ood's) they are converted a QUERY_CHUNK of q and a REF_BLOCK of ref at a
    time, never whole (the same numbers: float16 -> float32 is exact)."""
    k = max(1, min(k, len(ref) - int(exclude is not None)))
    out = np.empty(len(q), np.float32)
    sim = np.empty((min(len(q), QUERY_CHUNK), len(ref)), np.float32)  # (b, R) similarities of a chunk of q
    for i in range(0, len(q), QUERY_CHUNK):
        qi = np.asarray(q[i:i + QUERY_CHUNK], np.float32)  # (b, D)
        s = sim[:len(qi)]
        for j in range(0, len(ref), REF_BLOCK):
            s[:, j:j + REF_BLOCK] = qi @ np.asarray(ref[j:j + REF_BLOCK], np.float32).T
        if exclude is not None:
            s[np.arange(len(s)), exclude[i:i + QUERY_CHUNK]] = -np.inf
        out[i:i + QUERY_CHUNK] = 1.0 - top_k(s, k).mean(1)  # (b,)
    return out


def rows_distance(rows, mask: np.ndarray, ref: np.ndarray | None) -> np.ndarray:
    """knn_distance (M,) of the store rows (pipeline/data/rows.py) where `mask` (N,) is True, in row order, a
    block of the store at a time (a streamed store is never whole in memory); NaN for each without a reference."""
    out = []
    for start, x in rows.blocks(mask):
        xs = x[mask[start:start + len(x)]]  # (b, D) the rows asked for
        out.append(knn_distance(normalise(xs), ref) if ref is not None else np.full(len(xs), np.nan, np.float32))
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def top_k(sim: np.ndarray, k: int, width: int = 64) -> np.ndarray:
    """The k largest values of each row of sim (M, R), in no order: (M, k). A row's k largest lie in the k
    column chunks of `width` with the largest maxima (any other chunk's max is below k chunk maxima), so only
    those k * width candidates are partitioned: 6x faster than np.partition over 4096 columns."""
    m, r = sim.shape
    if r <= 2 * k * width:
        return np.partition(sim, r - k, axis=1)[:, r - k:]
    pad = -r % width
    chunks = np.pad(sim, ((0, 0), (0, pad)), constant_values=-np.inf).reshape(m, -1, width) if pad else \
        sim.reshape(m, -1, width)  # (M, R / width, width)
    best = np.argpartition(chunks.max(2), -k, axis=1)[:, -k:]  # (M, k) chunks holding the k largest
    cand = np.take_along_axis(chunks, best[:, :, None], axis=1).reshape(m, k * width)  # (M, k * width)
    return np.partition(cand, k * width - k, axis=1)[:, k * width - k:]


def fit_ood(chunks: Iterable[np.ndarray], n: int, random_state: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference rows (R, D) float16 from a sample of at most MAX_REF raw training rows, given as chunks (r, D)
    that hold n rows in all, and the sorted leave-one-out scores (Q,) of a seeded random MAX_LOO of them against
    all the others: a quantile near 0.99 is estimated from 2,048 of them about as well (the score of a
    training-like image is a sample either way). Memory: the reference rows in float16 (10 MiB at 4,096 x 1,280)
    and the MAX_LOO scored among them (5 MiB), one REF_BLOCK of them and one QUERY_CHUNK of queries in float32, and a QUERY_CHUNK x R block of similarities:
    the sample is never whole in float32 (read a block at a time from a streamed store; its float32 copies made
    this phase 90 MiB at 1,280 features, docs/scaling.md)."""
    ref = None
    at = 0
    for x in chunks:  # each chunk's unit rows, straight into the float16 reference
        ref = np.empty((n, x.shape[1]), np.float16) if ref is None else ref
        ref[at:at + len(x)] = normalise(x)
        at += len(x)
    idx = np.sort(np.random.default_rng(random_state).choice(n, min(n, MAX_LOO), replace=False))
    return ref, np.sort(knn_distance(ref[idx], ref, exclude=idx))  # as predict scores: against the float16 rows


def reference_rows(labelled: np.ndarray, random_state: int) -> np.ndarray:
    """Bool mask (N,) of at most MAX_REF labelled rows, a seeded random sample."""
    idx = np.flatnonzero(labelled)
    mask = np.zeros(len(labelled), bool)
    mask[np.random.default_rng(random_state).choice(idx, min(MAX_REF, len(idx)), replace=False)] = True
    return mask


MIN_JUDGE = 20  # fewer training images than this: no threshold, images are not flagged (and predict says so)


def threshold(loo: np.ndarray, quantile: float) -> tuple[float, str]:
    """(the score above which an image is unlike the training ones, how it was set). The empirical quantile needs
    about 1/(1 - quantile) scores to mean anything (100 for 0.99): from fewer it is just their maximum, and
    a model of 18 images flagged no photo at all. Then a normal tail fitted to the scores stands in
    (mean + z * std); under MIN_JUDGE scores there is no threshold (inf) and the note says why."""
    n = len(loo)
    if n < MIN_JUDGE:
        return float("inf"), (f"no image marked unsure: {n} training images are too few to tell what is unlike "
                              f"them (needs {MIN_JUDGE}); label more to turn the check on")
    if n >= 1.0 / (1.0 - quantile):
        return float(np.quantile(loo, quantile)), ""
    from statistics import NormalDist
    z = NormalDist().inv_cdf(quantile)
    return (float(np.mean(loo) + z * np.std(loo, ddof=1)),
            f"'unsure' judged from only {n} training images: where unlike becomes too unlike is estimated, not "
            f"counted ({1.0 / (1.0 - quantile):.0f} labelled images would count it); more labels make it firmer")


def image_ids(sha256: list[str]) -> np.ndarray:
    """(N,) uint64: an 8-byte digest of each image's sha256 (a store's), what ood.npz's `seen` holds. 8 bytes an
    image (8 MB for a million); two different images share one with odds of about 1e-7 at a million each side."""
    return np.frombuffer(b"".join(hashlib.blake2b(s.encode(), digest_size=8).digest() for s in sha256), np.uint64)


def save_ood(d: Path, ref: np.ndarray, loo: np.ndarray, seen: np.ndarray) -> dict:
    """Write ood.npz into the model folder `d` (`seen`: the training images' image_ids); returns what model.json
    records about it."""
    np.savez(d / "ood.npz", ref=ref, loo=loo, seen=np.unique(seen))
    return {"k": K, "n_ref": int(len(ref)), "space": SPACE, "sha256": sha256_file(str(d / "ood.npz"))}


def _read(d: Path, meta: dict) -> dict[str, np.ndarray]:
    """ood.npz's arrays, once the file is there and matches model.json's record (`meta`)."""
    f = d / "ood.npz"
    if not f.is_file():
        raise UserError(f"{f}: missing (model.json lists it); {FIX}")
    if meta.get("space") != SPACE:
        raise UserError(f"{f}: scored in another feature space ({meta.get('space')!r}, made by another imgsent); {FIX}")
    if sha256_file(str(f)) != meta.get("sha256"):
        raise UserError(f"{f}: does not belong with model.json (checksum differs); {FIX}")
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise UserError(f"{f}: unreadable; {FIX}") from None


def load_ood(d: Path, meta: dict, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """ood.npz validated against model.json's record and the head's input width: (reference rows (R, D) in
    float32, converted once here for every knn_distance call to come; leave-one-out scores (Q,))."""
    z = _read(d, meta)
    ref, loo = z.get("ref"), z.get("loo")
    if ref is None or loo is None or ref.ndim != 2 or ref.shape[1] != dim or loo.ndim != 1 or \
            not 0 < len(loo) <= len(ref) or not np.isfinite(loo).all():
        raise UserError(f"{d / 'ood.npz'}: shapes {getattr(ref, 'shape', None)} / {getattr(loo, 'shape', None)} do "
                        f"not match a {dim}-wide head; {FIX}")
    return ref.astype(np.float32), loo


def load_seen(d: Path, meta: dict | None) -> np.ndarray | None:
    """The image_ids of the model's training images (S,), from ood.npz validated against model.json's record
    (`meta`); None for a model made before they were kept (or before ood.npz)."""
    seen = _read(d, meta).get("seen") if meta is not None else None
    if seen is not None and (seen.dtype != np.uint64 or seen.ndim != 1):
        raise UserError(f"{d / 'ood.npz'}: `seen` is {seen.dtype} {seen.shape}, expected (S,) uint64; {FIX}")
    return seen


def trained_on(d: Path, meta: dict | None, sha256: list[str], rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Which of the store rows `rows` (N,) bool hold an image the model in `d` was trained on (load_seen), and how
    many distinct images that is (face mode: a row per face); none of them for a model made before the ids were
    kept."""
    seen = load_seen(d, meta)
    hit = rows & np.isin(image_ids(sha256), seen) if seen is not None else np.zeros_like(rows)  # (N,)
    return hit, len({s for s, h in zip(sha256, hit) if h})
