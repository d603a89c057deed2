"""Backbone(s) + head + preprocessing in one file.

Contract of the exported model: input uint8 (B, H, W, 3) RGB, any H and W (resizing happens inside the
graph, by the same `resize_crop` the extractor uses); output float (B, C) calibrated class probabilities
in class order. Class names and fingerprints travel in the file's metadata:
TorchScript `_extra_files["imgsent.json"]`, ONNX `metadata_props["imgsent"]`.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from features.backbones import resize_crop
from features.errors import UserError
from pipeline.predict import load_model


class Exported(nn.Module):
    def __init__(self, embedders: list[nn.Module], configs: list[tuple[int, int, bool, bool]], head: nn.Module,
                 class_names: list[str]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)
        self.resizes: List[int] = [c[0] for c in configs]
        self.sizes: List[int] = [c[1] for c in configs]
        self.bicubic: List[bool] = [c[2] for c in configs]
        self.gray: List[bool] = [c[3] for c in configs]
        self.head = head
        self.class_names: List[str] = list(class_names)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, C)
        x = images.permute(0, 3, 1, 2)  # (B, 3, H, W)
        feats: List[torch.Tensor] = []
        for i, emb in enumerate(self.embedders):
            feats.append(emb(resize_crop(x, self.resizes[i], self.sizes[i], self.bicubic[i], self.gray[i])))
        return self.head(torch.cat(feats, 1))


def build_exported(model_dir: str) -> tuple[Exported, dict]:
    m = load_model(model_dir, device="cpu")
    embedders, configs = [], []
    for bb in m.backbones:
        c = 1 if bb.pre.grayscale else 3
        example = torch.zeros(2, c, bb.pre.size, bb.pre.size, dtype=torch.uint8)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embedders.append(torch.jit.trace(bb.model, example, check_trace=False))  # fixed size after resize_crop
        configs.append((bb.pre.resize, bb.pre.size, bb.pre.interpolation == "bicubic", bb.pre.grayscale))
    meta = {"class_names": m.class_names, "backbones": m.meta["backbones"], "temperature": m.meta["temperature"],
            "input": "uint8 (B, H, W, 3) RGB", "output": "float (B, C) calibrated probabilities in class order"}
    return Exported(embedders, configs, m.head, m.class_names).eval(), meta


def export(*, model_dir: str, fmt: str, out: str) -> Path:
    if fmt not in ("torchscript", "onnx"):
        raise UserError(f"--format {fmt}: expected torchscript or onnx")
    model, meta = build_exported(model_dir)
    dst = Path(out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model)
        if fmt == "torchscript":
            torch.jit.save(scripted, str(dst), _extra_files={"imgsent.json": json.dumps(meta)})
            return dst
        try:
            import onnx
        except ImportError:
            raise UserError("--format onnx needs the onnx package: pip install 'imgsent[export]'") from None
        example = torch.randint(0, 256, (1, 240, 320, 3), dtype=torch.uint8)
        torch.onnx.export(scripted, (example,), str(dst), input_names=["images"], output_names=["probs"],
                          dynamic_axes={"images": {0: "batch", 1: "height", 2: "width"}, "probs": {0: "batch"}},
                          opset_version=18, dynamo=False)
    proto = onnx.load(str(dst))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "imgsent", json.dumps(meta)
    onnx.save(proto, str(dst))
    return dst


def load_exported(path: str) -> tuple[torch.jit.ScriptModule, dict]:
    files = {"imgsent.json": ""}
    m = torch.jit.load(path, map_location="cpu", _extra_files=files)
    return m, json.loads(files["imgsent.json"])
