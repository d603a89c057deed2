"""A backbone's weights from a file (--weights): read safely, checked against the network, and hashed by content
(the hash is the store fingerprint's weights_sha256)."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
from torch import nn

from features.errors import UserError


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Content hash of the weights, independent of the file they came from (hub, wheel or local)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k]
        if torch.is_tensor(v):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A --weights file as a state dict: loaded with weights_only=True (never unpickling code), unwrapped from
    the usual checkpoint keys; any other content is one line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--weights {path}: no such file; pass a state dict saved with torch.save(model.state_dict())")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before refusing them
            warnings.simplefilter("ignore")
            sd = torch.load(p, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:  # noqa: BLE001 - any failure here is the file's fault
        raise UserError(f"--weights {path}: not a plain state dict loadable with weights_only=True ({e.__class__.__name__})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise UserError(f"--weights {path}: expected a dict of tensors, found {type(sd).__name__}")
    return sd


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load sd into model, refusing a file that misses tensors the model needs (a classifier may be absent)."""
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A classifier we removed on purpose may be in the file; anything else missing means a wrong file.
    missing = [k for k in missing if not k.startswith(("classifier.", "fc.", "head.fc.", "head."))]
    if missing:
        raise UserError(f"{source}: weights do not fit the model (missing {len(missing)} tensors, e.g. {missing[0]}); "
                        "check the backbone name matches the file")
