"""The report's building blocks: one split of predictions (Split), inline thumbnails and
gallery cards, the page's CSS. Everything a page shows is HTML-escaped."""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from features.input.images import decode


@dataclass
class Split:
    name: str
    paths: list[str]
    y: np.ndarray  # (N,)
    probs: np.ndarray  # (N, C) calibrated
    root: str
    fold: np.ndarray | None = None
    boxes: np.ndarray | None = None  # (N, 4) face mode: the crop each row embeds, drawn on its thumbnail
    face: np.ndarray | None = None  # (N,) face mode: which face of its image


def thumb(root: str, path: str, size: int = 96, box=None) -> str:
    """Inline JPEG data URI, or '' when the image cannot be read any more. Face mode: the crop box drawn on it."""
    from PIL import Image, ImageDraw
    full = Path(path) if Path(path).is_absolute() else Path(root) / path
    try:
        im = Image.fromarray(decode(str(full)))
    except (ValueError, OSError):
        return ""
    if box is not None:
        x, y, w, h = (int(v) for v in box)
        ImageDraw.Draw(im).rectangle([x, y, x + w - 1, y + h - 1], outline=(255, 32, 32),
                                     width=max(2, round(max(im.size) / size * 1.5)))  # ~1.5 px after thumbnailing
    im.thumbnail((size, size))
    b = io.BytesIO()
    im.save(b, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(b.getvalue()).decode()


def figure(path: Path, alt: str, extra: str = "") -> str:
    """An <img> of the PNG at `path`, inlined as a data URI: the page opens alone (mailed, moved, served), and the
    PNG stays beside it for DVC's plots."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f"<img class=plot {extra}alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{data}'>"


def card(split: Split, names: list[str], i: int, pred: int, p_true: float, word: str = "pred") -> str:
    e = html.escape
    src = thumb(split.root, split.paths[i], box=split.boxes[i] if split.boxes is not None else None)
    img = f"<img src='{src}' alt='{e(split.paths[i], quote=True)}'>" if src else "<div class=missing>image unavailable</div>"
    return (f"<figure>{img}<figcaption><code>{e(split.paths[i])}</code><br>true <b>{e(names[split.y[i]])}</b> "
            f"p={p_true:.2f}<br>{word} <b>{e(names[pred])}</b> p={split.probs[i, pred]:.2f}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child{text-align:left}.headline{font-size:1.1em}.plot{max-width:100%;margin:0.5em 1em 0.5em 0}
.gallery{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px;font-size:12px;border:1px solid #ddd;
padding:4px}figure img{width:96px;height:96px;object-fit:contain;display:block;margin:auto}
code{word-break:break-all}.missing{height:96px;background:#eee}.note{color:#8a5a00}"""
