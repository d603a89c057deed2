"""params.yaml -> frozen dataclasses, parsed once. Unknown, missing, mistyped or out-of-range keys
are one-line errors naming the key, its value and what is allowed, before any work starts."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from features.errors import UserError


def _f(default, *, lo=None, hi=None, choices=None, lo_open=False):
    return field(default=default, metadata={"lo": lo, "hi": hi, "choices": choices, "lo_open": lo_open})


@dataclass(frozen=True)
class PathsParams:
    """Every path the DVC pipeline uses, in one place (dvc.yaml reads them from here)."""
    train_images: str = "data/demo/train.csv"
    test_images: str = "data/demo/test"
    train_stores: str = "out/stores/train"  # one <backbone>.h5 per extract.backbones entry
    test_stores: str = "out/stores/test"
    model: str = "out/model"
    eval: str = "out/eval"
    report: str = "out/report"


@dataclass(frozen=True)
class ExtractParams:
    backbones: tuple[str, ...] = ("efficientnet_lite0",)  # several = fusion of their features
    batch_size: int = _f(32, lo=1)
    workers: int = _f(1, lo=0)
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))
    dtype: str = _f("float32", choices=("float32", "float16"))


@dataclass(frozen=True)
class HeadParams:
    hidden: tuple[int, ...] = (256,)  # () = multinomial logistic regression
    dropout: float = _f(0.3, lo=0.0, hi=0.95)
    lr: float = _f(1e-3, lo=0.0, lo_open=True, hi=10.0)
    weight_decay: float = _f(1e-4, lo=0.0)
    epochs: int = _f(60, lo=1)
    batch_size: int = _f(128, lo=1)
    patience: int = _f(3, lo=1)  # validation checks without improvement (one per epoch, or per 50 steps)
    val_fraction: float = _f(0.1, lo=0.0, hi=0.5)  # early-stopping slice carved from each training fold
    min_val_images: int = _f(200, lo=1)  # smaller slices: no early stopping, train all `epochs`
    class_weight: str = _f("balanced", choices=("balanced", "none"))


@dataclass(frozen=True)
class CVParams:
    folds: int = _f(5, lo=2)
    seed: int = _f(0, lo=0)
    memory_budget_mb: int = _f(0, lo=0)  # 0 = a quarter of available RAM; stores above it are streamed


@dataclass(frozen=True)
class Params:
    paths: PathsParams = PathsParams()
    extract: ExtractParams = ExtractParams()
    head: HeadParams = HeadParams()
    cv: CVParams = CVParams()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def stores(self, folder: str) -> list[str]:
        """The store of each backbone in `folder`, in params order (the head's column order)."""
        return [str(Path(folder) / f"{b}.h5") for b in self.extract.backbones]


def _check(section: str, f: dataclasses.Field, value, hint):
    key = f"{section}.{f.name}"
    origin = typing.get_origin(hint)
    if origin is tuple:
        inner = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, inner) and not isinstance(v, bool) for v in value):
            raise UserError(f"params: {key}={value!r}: expected a list of {inner.__name__}")
        if not value and f.name == "backbones":
            raise UserError(f"params: {key}=[]: list at least one backbone, e.g. [efficientnet_lite0]")
        if inner is int and any(v < 1 for v in value):
            raise UserError(f"params: {key}={value!r}: every size must be >= 1")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
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
        raise UserError(f"{where}: missing key '{name}.{missing[0]}'; add it (default: {fields[missing[0]].default!r})")
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
        if name not in raw:
            raise UserError(f"{where}: missing section '{name}'; see the README for the full params.yaml")
        parts[name] = _section(hints[name], name, raw[name], where)
    return Params(**parts)


def load_params(path: str | None) -> Params:
    """`path=None`: ./params.yaml when present, else the built-in defaults."""
    if path is None:
        if not Path("params.yaml").exists():
            return Params()
        path = "params.yaml"
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--params {p}: no such file; copy params.yaml from the README")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UserError(f"{p}: not valid YAML{f' at line {mark.line + 1}' if mark else ''}; fix the syntax") from None
    return parse_params(raw, str(p))
