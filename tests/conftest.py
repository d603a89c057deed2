"""Shared fixtures: tiny real images and a tiny backbone with locally built weights (never downloaded)."""
from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the packages ask (features/__init__.py), before torch loads:
import torch  # noqa: E402 - spinning threads of two test workers on two cores took turns at a crawl
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
# the onnxruntime engine's export cache: one per test session, never the user's ~/.cache (subprocesses inherit it)
os.environ["IMGSENT_CACHE"] = tempfile.mkdtemp(prefix="imgsent-test-cache-")
atexit.register(shutil.rmtree, os.environ["IMGSENT_CACHE"], ignore_errors=True)  # each run left 15 MB in /tmp
TINY = "test_efficientnet"  # timm's tiny test architecture; weights are built here, never fetched

COLOURS = {"blue": (30, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_images(root: Path, per_class: int = 8, size: int = 40, seed: int = 0) -> Path:
    """ImageFolder of noisy colour blobs: the classes are separable, so a head can learn them."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3)).astype(np.float64) * 0.3 + np.array(rgb) * 0.7
            ext = ".png" if i % 2 else ".jpg"
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / name / f"{name}_{i:02d}{ext}")
    return root


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    import timm
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model(TINY, pretrained=False, num_classes=0).state_dict(), path)
    return str(path)


@pytest.fixture
def ctrl_c_after(monkeypatch):
    """ctrl_c_after(n): the next extract in this test gets SIGINT, as from a user's Ctrl-C, once n images are
    embedded (errors counted), then never again: the product's own interrupt path (signal -> commit ->
    Interrupted), with no hook for tests inside it."""
    import signal

    import features.extract as ex

    def arm(images: int) -> None:
        seen, fired = [0], [False]

        def wrap(embed, counted):
            def batches(*args, **kw):
                for batch in embed(*args, **kw):
                    seen[0] += counted(batch)
                    if seen[0] >= images and not fired[0]:
                        fired[0] = True
                        os.kill(os.getpid(), signal.SIGINT)  # extract's handler sets its stop flag
                    yield batch
            return batches
        monkeypatch.setattr(ex, "iter_embeddings", wrap(ex.iter_embeddings, lambda b: len(b[0]) + len(b[2])))
        monkeypatch.setattr(ex, "iter_face_embeddings",
                            wrap(ex.iter_face_embeddings, lambda b: len(set(b[0])) + len(b[3])))
    return arm


@pytest.fixture
def images(tmp_path) -> Path:
    return make_images(tmp_path / "imgs")


def params(**sections):
    """The repo's params.yaml with some values replaced: params(head={"epochs": 20}, cv={"folds": 2})."""
    import dataclasses
    from pipeline.params import load_params
    p = load_params(str(ROOT / "params.yaml"))
    for name, changes in sections.items():
        p = dataclasses.replace(p, **{name: dataclasses.replace(getattr(p, name), **changes)})
    return p


def run_cli(*args: str, cwd: Path | None = None, check: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real console entry point in a subprocess (exit codes and stderr as a user sees them)."""
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", *args]
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=e, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r
