"""The model directory: head.pt (plain state dict) + model.json (classes, backbone fingerprints,
head shape, temperature, params). No pickle: torch.load(..., weights_only=True) only."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from features.errors import UserError
from pipeline.head import HeadNet
from pipeline.params import Params

FORMAT = 1


def save_model(d: Path, head: HeadNet, *, class_names: list[str], fingerprints: list[dict],
               weights_paths: list[str | None], params: Params, stores: list[str], temperature: float) -> None:
    linears = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    meta = {"format": FORMAT, "class_names": class_names, "backbones": fingerprints, "backbone_weights": weights_paths,
            "head": {"dim": linears[0].in_features, "hidden": [m.out_features for m in linears[:-1]],
                     "n_classes": len(class_names), "dropout": params.head.dropout},
            "temperature": temperature, "params": params.to_dict(), "stores": [str(s) for s in stores],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    torch.save(head.state_dict(), d / "head.pt")
    (d / "model.json").write_text(json.dumps(meta, indent=2))


def load_head(model_dir: str | Path) -> tuple[HeadNet, dict]:
    d = Path(model_dir)
    if not (d / "model.json").is_file() or not (d / "head.pt").is_file():
        raise UserError(f"{d}: not a model directory (needs head.pt and model.json); create it with imgsent train-head")
    try:
        meta = json.loads((d / "model.json").read_text())
        h = meta["head"]
        head = HeadNet(h["dim"], tuple(h["hidden"]), h["n_classes"], h["dropout"])
        head.load_state_dict(torch.load(d / "head.pt", map_location="cpu", weights_only=True))
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"{d}: damaged model files ({e.__class__.__name__}: {str(e)[:120]}); re-run imgsent train-head") from None
    return head.eval(), meta
