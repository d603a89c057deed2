"""params.yaml -> frozen dataclasses, parsed once. Unknown, missing, duplicated, mistyped or out-of-range keys
are one-line errors naming the key, its value and what is allowed, before any work starts. Every key is required:
the stages take no default from the code, params.yaml is their single source of truth (the command-line-only
`extract` and `predict` options have typer defaults of their own, listed by --help)."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from features.errors import UserError
from pipeline.transforms import REGISTRY


def _f(*, lo=None, hi=None, choices=None, lo_open=False, auto=False):
    """A key's allowed values: a range [lo, hi] (lo excluded if lo_open), a list of choices; `auto` also
    allows the word auto."""
    return field(metadata={"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open, "auto": auto})


MAX_HIDDEN = 16384  # widest hidden layer: 1280 x 16384 floats is already 80 MB of weights
MAX_LAYERS = 8


@dataclass(frozen=True)
class PathsParams:
    """Every path the DVC pipeline uses, in one place (dvc.yaml reads them from here)."""
    train_images: str  # a folder or a CSV manifest
    train_image_dir: str  # the folder holding the images a manifest lists (DVC watches it)
    test_images: str
    train_stores: str  # one <backbone>.h5 per extract.backbones entry
    test_stores: str
    model: str
    eval: str
    report: str


@dataclass(frozen=True)
class ExtractParams:
    backbones: tuple[str, ...]  # several = fusion of their features
    batch_size: int = _f(lo=1, hi=65536)
    workers: int | str = _f(lo=0, hi=256, auto=True)  # decode threads; auto = one per available core
    device: str = _f(choices=("auto", "cpu", "cuda"))
    dtype: str = _f(choices=("float32", "float16"))
    faces: str = _f(choices=("off", "largest", "all"))  # photos of people: embed face crops (features/models/faces.py)
    faces_fallback: str = _f(choices=("skip", "whole"))  # an image without a face: skipped, or embedded whole


@dataclass(frozen=True)
class HeadParams:
    hidden: tuple[int, ...] | str = _f(auto=True)  # () = multinomial logistic regression; auto = CV picks () or (256,)
    dropout: float = _f(lo=0.0, hi=0.95)
    lr: float = _f(lo=0.0, lo_open=True, hi=10.0)
    weight_decay: float = _f(lo=0.0, hi=10.0)
    epochs: int = _f(lo=1, hi=100000)
    batch_size: int = _f(lo=1, hi=1 << 20)
    patience: int = _f(lo=1)  # validation checks without improvement (one per epoch, or per 50 steps)
    tol: float = _f(lo=0.0, hi=1.0)  # ...or with less than this relative gain of the best val loss: converged
    val_fraction: float = _f(lo=0.0, hi=0.5)  # early-stopping slice carved from each training fold
    min_val_images: int = _f(lo=1)  # smaller slices: no slice, stop on convergence of the training loss
    min_val_per_class: int = _f(lo=0)  # ...nor when some class would put fewer images than this into the slice
    class_weight: str = _f(choices=("balanced", "none"))
    adapt: str = _f(choices=("auto", *REGISTRY))  # each predicted source's features adapted to the training
    # statistics by a transform of pipeline/transforms.py; auto: grouped CV and stress batches decide (selection/)
    align: str = _f(choices=("groups", "none"))  # groups: each training group's features aligned onto the training
    # statistics before the head is fitted, as each predicted source is (heads/align.py); none: as stored


@dataclass(frozen=True)
class CVParams:
    folds: int = _f(lo=2, hi=100)
    seed: int = _f(lo=0)
    repeats: int = _f(lo=1, hi=20)  # CV of the chosen head run this many times, reseeded: the spread is shown
    memory_budget_mb: int = _f(lo=0)  # 0 = a quarter of available RAM; stores above it are streamed


@dataclass(frozen=True)
class Params:
    paths: PathsParams | None  # the DVC pipeline's paths; optional when stores are named on the command line
    extract: ExtractParams
    head: HeadParams
    cv: CVParams

    def to_dict(self) -> dict:
        """As params.yaml would hold it (parse_params reads it back): no `paths` section when there is none."""
        d = dataclasses.asdict(self)
        return d if d["paths"] is not None else {k: v for k, v in d.items() if k != "paths"}

    def stores(self, key: str) -> list[str]:
        """The store of each backbone in the folder paths.<key> names, in params order (the head's columns)."""
        if self.paths is None:
            raise UserError(f"params: no 'paths' section, so no paths.{key} to find the stores in; name the stores "
                            "on the command line (e.g. imgsent train-head my.h5 --out model)")
        return [str(Path(getattr(self.paths, key)) / f"{b}.h5") for b in self.extract.backbones]


def _check(section: str, f: dataclasses.Field, value, hint):
    key = f"{section}.{f.name}"
    if f.metadata.get("auto"):
        if value == "auto":
            return value
        hint = next(a for a in typing.get_args(hint) if a is not str)  # what else the key takes: int, a list
    origin = typing.get_origin(hint)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise UserError(f"params: {key}={value!r}: expected a list of {inner.__name__}")
        if not value and f.name == "backbones":
            raise UserError(f"params: {key}=[]: list at least one backbone, e.g. [efficientnet_lite0]")
        if f.name == "backbones" and len(set(value)) < len(value):
            twice = next(v for v in value if value.count(v) > 1)
            raise UserError(f"params: {key}={value!r}: {twice} is listed twice; list each backbone once (the same "
                            "backbone twice would fuse identical features)")
        if inner is int and any(v < 1 or v > MAX_HIDDEN for v in value):
            raise UserError(f"params: {key}={value!r}: every size must be in [1, {MAX_HIDDEN}]")
        if inner is int and len(value) > MAX_LAYERS:
            raise UserError(f"params: {key}={value!r}: at most {MAX_LAYERS} hidden layers")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string: take what is meant
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is str and value is False and "off" in (f.metadata.get("choices") or ()):
        value = "off"  # YAML 1.1 reads an unquoted off as false: take what is meant
    if not isinstance(value, hint) or isinstance(value, bool) and hint is not bool:
        raise UserError(f"params: {key}={value!r}: expected {hint.__name__}")
    m = f.metadata
    if m.get("choices") and value not in m["choices"]:
        raise UserError(f"params: {key}={value!r}: allowed values are {', '.join(m['choices'])}")
    lo, hi = m.get("lo"), m.get("hi")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"params: {key}={value!r}: must be a finite number")
    if lo is not None and (value < lo or (m.get("lo_open") and value == lo)) or hi is not None and value > hi:
        rng = f"{'(' if m.get('lo_open') else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
        raise UserError(f"params: {key}={value!r}: out of range, allowed {rng}")
    return value


def _section(cls, name: str, raw, where: str):
    if not isinstance(raw, dict):
        raise UserError(f"{where}: section '{name}' must be a mapping of keys to values")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key '{name}.{unknown[0]}'; allowed keys in '{name}': {', '.join(fields)}")
    missing = sorted(set(fields) - set(raw))
    if missing:
        raise UserError(f"{where}: missing key '{name}.{missing[0]}'; add it (every key is required: see params.yaml "
                        "in the README)")
    return cls(**{k: _check(name, fields[k], raw[k], hints[k]) for k in fields})


def parse_params(raw: dict, where: str = "params.yaml") -> Params:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping with sections paths, extract, head, cv")
    sections = {f.name: f.type for f in dataclasses.fields(Params)}
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise UserError(f"{where}: unknown section '{unknown[0]}'; allowed: {', '.join(sections)}")
    hints = typing.get_type_hints(Params)
    parts = {}
    for name in sections:
        if name not in raw or name == "paths" and raw[name] is None:
            if name == "paths":  # only the DVC pipeline needs it (model.json of earlier versions wrote null)
                parts[name] = None
                continue
            raise UserError(f"{where}: missing section '{name}'; `imgsent init` writes a complete params.yaml")
        parts[name] = _section(PathsParams if name == "paths" else hints[name], name, raw[name], where)
    return Params(**parts)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last), a key that is
    not a plain value (`[1]: 2`), and aliases (`*name`): params.yaml needs none, and nested aliases expand
    exponentially (a 1 KB 'billion laughs' file took 65 s and 2.5 GB before this)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise UserError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: params.yaml takes "
                            "plain values; write the value out instead of referring to an anchor")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for k, _ in node.value:
            key = self.construct_object(k, deep=True)  # a key is small: build it whole to name it
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise UserError(f"key {key!r} at line {k.start_mark.line + 1} is not a name; keys are plain words")
            if key in seen:
                raise UserError(f"duplicate key {key!r} at line {k.start_mark.line + 1}; give each key once")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | None) -> Params:
    """`path=None`: ./params.yaml, which must exist (there are no built-in defaults)."""
    p = Path(path or "params.yaml")
    if p.is_dir():
        hint = f"pass {p / 'params.yaml'}" if (p / "params.yaml").is_file() else "pass the params.yaml file"
        raise UserError(f"--params {p}: is a folder; {hint}")
    if not p.is_file():
        if path is None:
            raise UserError("no params.yaml in this folder; write one with `imgsent init .` or pass --params FILE")
        raise UserError(f"--params {p}: no such file; write one with `imgsent init DIR`")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a text file in UTF-8; pass the params.yaml file") from None
    except OSError as e:
        raise UserError(f"{p}: cannot read ({e.strerror}); check the path and permissions") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except UserError as e:
        raise UserError(f"{p}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{p}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}; fix the syntax") from None
    return parse_params(raw, str(p))
