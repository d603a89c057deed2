"""Backbone(s) + head + preprocessing in one file.

Contract of the exported model: input uint8 (B, H, W, 3) RGB, any H and W (resizing happens inside the
graph, by the same `resize_crop` the extractor uses); output float (B, C) calibrated class probabilities
in class order, each image on its own: no adaptation to its source (heads/adapt.py), as `predict --source none`;
or, with `adapt_to` (a folder of one source's images, or a manifest and one of its groups), that source's shift fitted
once and folded into the head (Shift.adapt): each image then gets what `predict` gives it there, for a deployment
serving that source.
Class names and fingerprints travel in the file's metadata: TorchScript `_extra_files["imgsent.json"]`, ONNX
`metadata_props["imgsent"]`.
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from features.storage.atomic import OutputLock, atomic_file, check_output, remove_quietly
from features.models.backbones import Backbone
from features.models.preprocess import resize_crop
from features.errors import UserError
from pipeline.heads.head import Head
from pipeline.inference.predict import load_model


class TorchHead(nn.Module):
    """A fitted Head as a torch module: raw features (B, D) -> calibrated probabilities (B, C)."""

    def __init__(self, head: Head):
        super().__init__()
        layers: list[nn.Module] = []  # Head.logits' layers: Linear, with ReLU between them
        for w, b in head.layers:
            linear = nn.Linear(w.shape[1], w.shape[0])
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(w)), linear.bias.copy_(torch.from_numpy(b))
            layers += [linear, nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])
        self.register_buffer("mean", torch.from_numpy(head.mean.copy()))  # (D,)
        self.register_buffer("scale", torch.from_numpy(head.scale.copy()))  # (D,)
        self.register_buffer("temperature", torch.tensor(float(head.temperature)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net((x - self.mean) / self.scale) / self.temperature, dim=1)


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


def source_images(where: str, group: str | None) -> tuple[list[str], str]:
    """One source's image paths as predict groups them (a folder; a manifest's group, or the manifest when it has
    no group column), and its name for the metadata. A manifest of several groups needs `group` to pick one."""
    from pipeline.inference.predictions import expand_paths
    if Path(where).is_dir() and group is not None:
        raise UserError(f"--adapt-group {group}: {where} is a folder, one source; --adapt-group picks a group of a CSV "
                        "manifest: leave it out")
    if not (Path(where).is_dir() or (Path(where).suffix.lower() == ".csv" and Path(where).is_file())):
        raise UserError(f"--adapt-to {where}: not a folder or a CSV manifest; pass the folder of the source's images "
                        "or a manifest path[,label][,group]")
    paths, errors, sources = expand_paths([where])  # sources: the folder, or each row's group (else the manifest)
    names = sorted({s for i, s in enumerate(sources) if i not in errors})
    if group is not None and group not in names:
        raise UserError(f"--adapt-group {group}: no such group in {where} (its groups: {', '.join(names)}); pass one "
                        "of them")
    if group is None and len(names) > 1:
        raise UserError(f"--adapt-to {where}: {len(names)} sources (groups {', '.join(names[:5])}"
                        f"{', ...' if len(names) > 5 else ''}); pick the one the deployment serves with --adapt-group")
    name = group if group is not None else names[0]
    chosen = [q for i, (q, s) in enumerate(zip(paths, sources)) if i not in errors and s == name]
    return chosen, where if group is None else f"group {group} of {where}"


def adapted_head(m, where: str, group: str | None = None) -> tuple[Head, str]:
    """The model's head with the shift of one source's images (as predict adapts a folder or a manifest group) folded
    in, and the metadata's words for it. Refused in one line when there is nothing to fold: transform none, too
    few images."""
    from pipeline.heads.adapt import MIN_IMAGES, source_logits
    if m.info.adapt == "none":
        raise UserError(f"--adapt-to {where}: the model's transform is none (adapt in model.json): nothing to bake "
                        "in; export without --adapt-to, or retrain with head.adapt: affine or scale")
    paths, name = source_images(where, group)
    feats = m.embed(paths)[0]  # (R, D), one row per image that decoded
    shift = source_logits(m.head, feats, m.info.adapt)[1]
    if shift is None:
        raise UserError(f"--adapt-to {name}: {len(feats)} images could be read, too few to adapt (needs "
                        f"{MIN_IMAGES}); add images of that source")
    predicted = where if group is None else f"{where} (its group {group})"
    return shift.adapt(m.head), (f"{shift.transform}: the shift of {name} ({shift.n} images) baked in: each image "
                                 f"gets what imgsent predict MODEL {predicted} gives it; images of another source get "
                                 "the same fixed shift")


def build_exported(model_dir: str, adapt_to: str | None = None,
                   adapt_group: str | None = None) -> tuple[Exported, dict, list[Backbone]]:
    """The exportable module, its metadata and the loaded backbones (each loaded once)."""
    if adapt_group is not None and not adapt_to:
        raise UserError(f"--adapt-group {adapt_group}: names a group of the manifest given to --adapt-to; pass both")
    m = load_model(model_dir, device="cpu")
    if m.faces is not None:
        raise UserError(f"{model_dir}: trained on face crops (--faces {m.faces.mode}); an exported model cannot "
                        "carry the face detector, so export refuses it: use `imgsent predict` or the Python API")
    head, said = adapted_head(m, adapt_to, adapt_group) if adapt_to else \
        (m.head, f"none: each image on its own (imgsent predict --source none; predict itself adapts each folder or "
                 f"group by '{m.info.adapt}')")  # predict adapts each source (model.json); the file, one image
    embedders, configs = [], []
    for bb in m.backbones:
        c = bb.pre.channels
        example = torch.zeros(2, c, bb.pre.size, bb.pre.size, dtype=torch.uint8)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            embedders.append(torch.jit.trace(bb.embedder, example, check_trace=False))  # fixed size after resize_crop
        configs.append((bb.pre.resize, bb.pre.size, bb.pre.interpolation == "bicubic", bb.pre.grayscale))
    meta = {"class_names": m.class_names, "backbones": m.info.backbones, "temperature": m.info.temperature,
            "input": "uint8 (B, H, W, 3) RGB", "output": "float (B, C) calibrated probabilities in class order",
            "adaptation": said, "adapted_to": adapt_to, "adapted_group": adapt_group}
    return Exported(embedders, configs, TorchHead(head), m.class_names).eval(), meta, m.backbones


def _is_export(fmt: str):
    def ours(p: Path) -> bool:
        try:
            if fmt == "torchscript":
                import zipfile
                return zipfile.is_zipfile(p) and any(n.endswith("extra/imgsent.json") for n in zipfile.ZipFile(p).namelist())
            import onnx
            return any(e.key == "imgsent" for e in onnx.load(str(p), load_external_data=False).metadata_props)
        except Exception:  # noqa: BLE001 - anything unreadable is not ours to overwrite
            return False
    return ours


def export(*, model_dir: str, fmt: str, out: str, adapt_to: str | None = None, adapt_group: str | None = None) -> Path:
    if fmt not in ("torchscript", "onnx"):
        raise UserError(f"--format {fmt}: expected torchscript or onnx")
    dst = check_output(out, folder=False, is_ours=_is_export(fmt), what=f"{fmt} export")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise UserError("--format onnx needs onnx and onnxscript (imgsent's dependencies): reinstall imgsent, "
                            "e.g. pip install -e .") from None
    model, meta, backbones = build_exported(model_dir, adapt_to, adapt_group)
    with OutputLock(dst), atomic_file(dst) as tmp:
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # jit is deprecated (FutureWarning) but is the format promised
                buf = io.BytesIO()  # via bytes: a failed write is then an OSError, named as such
                torch.jit.save(torch.jit.script(model), buf, _extra_files={"imgsent.json": json.dumps(meta)})
            tmp.write_bytes(buf.getvalue())
        else:
            _export_onnx(model, meta, backbones, tmp)
    return dst


class _Pre(nn.Module):
    """ONNX part 1: uint8 (B, H, W, 3) with symbolic H, W -> one uint8 (B, C, S, S) per backbone."""

    def __init__(self, model: Exported):
        super().__init__()
        self.cfg = list(zip(model.resizes, model.sizes, model.bicubic, model.gray))

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2)
        return tuple(resize_crop(x, r, s, b, g) for r, s, b, g in self.cfg)


class _Net(nn.Module):
    """ONNX part 2: fixed-size pixels per backbone -> calibrated probabilities."""

    def __init__(self, model: Exported, eager: list[nn.Module]):
        super().__init__()
        self.embedders, self.head = nn.ModuleList(eager), model.head

    def forward(self, *pix: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([e(p) for e, p in zip(self.embedders, pix)], 1))


def _export_onnx(model: Exported, meta: dict, backbones: list[Backbone], dst: Path) -> None:
    """Two graphs merged into one file: exporting the backbone with symbolic image sizes trips torch.export's
    shape guards (TF-'same' padding), so the resize/crop graph is exported with dynamic H, W, the network
    with a static input size, and onnx.compose joins them."""
    import onnx
    from onnx import compose
    from torch.export import Dim
    n = len(model.sizes)
    pix_names = [f"pix{i}" for i in range(n)]
    images = torch.randint(0, 256, (2, 240, 320, 3), dtype=torch.uint8)
    with torch.no_grad():
        pix = _Pre(model)(images)
    tmp_pre, tmp_net = dst.with_name(dst.name + ".pre.onnx"), dst.with_name(dst.name + ".net.onnx")
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # torch.onnx narrates each step
            warnings.simplefilter("ignore")
            torch.onnx.export(_Pre(model).eval(), (images,), str(tmp_pre), dynamo=True, input_names=["images"],
                              output_names=pix_names, external_data=False,
                              dynamic_shapes={"images": {0: Dim("batch"), 1: Dim("height", min=2, max=1 << 15),
                                                         2: Dim("width", min=2, max=1 << 15)}})
            torch.onnx.export(_Net(model, [bb.embedder for bb in backbones]).eval(), pix, str(tmp_net), dynamo=True,
                              input_names=[f"in_{p}" for p in pix_names], output_names=["probs"], external_data=False,
                              dynamic_shapes=(tuple({0: Dim("batch")} for _ in range(n)),))  # *pix is one packed arg
            pre = compose.add_prefix(onnx.load(str(tmp_pre)), "pre_", rename_inputs=False, rename_outputs=False)
            net = compose.add_prefix(onnx.load(str(tmp_net)), "net_", rename_inputs=False, rename_outputs=False)
            if pre.opset_import[0].version != net.opset_import[0].version:
                net = onnx.version_converter.convert_version(net, pre.opset_import[0].version)
            merged = compose.merge_models(pre, net, io_map=[(p, f"in_{p}") for p in pix_names])
    finally:
        remove_quietly(tmp_pre)
        remove_quietly(tmp_net)
    entry = merged.metadata_props.add()
    entry.key, entry.value = "imgsent", json.dumps(meta)
    onnx.save(merged, str(dst))


def load_exported(path: str) -> tuple[torch.jit.ScriptModule, dict]:
    files = {"imgsent.json": ""}
    m = torch.jit.load(path, map_location="cpu", _extra_files=files)
    return m, json.loads(files["imgsent.json"])
