"""The onnxruntime forward engine: same features as torch fp32 on real images, exported once and cached, a
damaged cache rebuilt, and a clear refusal (or a silent fall back under `auto`) when parity fails."""
import numpy as np
import pytest
import torch

import features.models.engine as engine
from features.models.backbones import load_backbone
from features.models.embed import iter_embeddings
from features.errors import UserError
from features.extract import extract
from features.storage.store import read_store
from tests.conftest import TINY


@pytest.fixture
def tiny(tiny_weights):
    return load_backbone(TINY, weights=tiny_weights)


def engine_name(model) -> str:
    """Which engine a forward model is: onnxruntime's session wrapper says so; a torch module does not."""
    return getattr(model, "engine", "torch")


def test_onnxruntime_gives_torchs_features_and_is_cached(tiny, images, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_CACHE", str(tmp_path / "cache"))
    m = engine.forward_engine(tiny, "cpu", 8)
    assert engine_name(m) == "onnxruntime" and m.path.parent == tmp_path / "cache" / "onnx"
    stamp = m.path.stat().st_mtime_ns
    paths = sorted(str(p) for p in images.rglob("*.*"))
    got = {name: np.concatenate([f for _, f, _ in iter_embeddings(tiny, paths, workers=0, progress=False,
                                                                  engine=name)]) for name in ("onnx", "torch")}
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got["onnx"]), torch.from_numpy(got["torch"]))
    assert float(cos.min()) >= 0.9999
    assert engine.forward_engine(tiny, "cpu", 8).path.stat().st_mtime_ns == stamp  # reused, not exported again


def test_a_damaged_cache_file_is_rebuilt(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_CACHE", str(tmp_path / "cache"))
    path = engine.forward_engine(tiny, "cpu", 8).path
    path.write_bytes(b"not an onnx model")
    m = engine.forward_engine(tiny, "cpu", 8)
    assert engine_name(m) == "onnxruntime" and m.path.stat().st_size > 1000


def test_parity_failure_falls_back_under_auto_and_is_refused_under_onnx(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(engine, "PARITY_MIN_COS", 1.5)  # nothing can match
    assert engine_name(engine.forward_engine(tiny, "cpu", 8)) == "torch"
    with pytest.raises(UserError, match="--engine onnx: onnxruntime cannot run"):
        engine.forward_engine(tiny, "cpu", 8, engine="onnx")
    with pytest.raises(UserError, match="--engine fast: expected one of auto, onnx, torch"):
        engine.forward_engine(tiny, "cpu", 8, engine="fast")


def test_stores_from_either_engine_agree(images, tmp_path, tiny_weights):
    stores = {}
    for name in ("onnx", "torch"):
        extract(images=str(images), out=str(tmp_path / f"{name}.h5"), backbone=TINY, weights=tiny_weights,
                progress=False, workers=0, engine=name, device="cpu")  # the CPU's engines, even beside a GPU
        stores[name] = read_store(tmp_path / f"{name}.h5")
    a, b = (torch.from_numpy(stores[n].features) for n in ("onnx", "torch"))
    assert stores["onnx"].fingerprint == stores["torch"].fingerprint  # the engine is not part of the fingerprint
    assert float(torch.nn.functional.cosine_similarity(a, b).min()) >= 0.9999


def test_only_a_parity_checked_export_is_served_without_the_network(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGSENT_CACHE", str(tmp_path / "cache"))
    fp = tiny.fingerprint
    assert engine.cached_engine(fp) is None  # nothing exported yet
    m = engine.forward_engine(tiny, "cpu", 8)  # exports, checks parity, records the file's sha256
    served = engine.cached_engine(fp)
    x = torch.randint(0, 256, (3, 3, tiny.pre.size, tiny.pre.size), dtype=torch.uint8)
    assert served is not None and torch.equal(served(x), m(x))
    m.path.write_bytes(m.path.read_bytes() + b"\0")  # the file changed after its check: not served
    assert engine.cached_engine(fp) is None


def test_cache_follows_imgsent_cache_then_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("IMGSENT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert engine.cache_dir() == tmp_path / "xdg" / "imgsent" / "onnx"
    monkeypatch.setenv("IMGSENT_CACHE", str(tmp_path / "mine"))
    assert engine.cache_dir() == tmp_path / "mine" / "onnx"
