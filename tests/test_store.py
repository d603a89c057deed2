"""The store: schema, incremental re-runs, fingerprint refusal, lock, partial state."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest

from features.errors import UserError
from features.extract import extract
from features.storage.atomic import OutputLock
from features.storage.store import partial_dir, read_store
from tests.conftest import TINY


def run(images, out, w, **kw):
    return extract(images=str(images), out=str(out), backbone=TINY, weights=w, progress=False, workers=0, **kw)


def test_schema_is_plain_hdf5(images, tmp_path, tiny_weights):
    s = run(images, tmp_path / "s.h5", tiny_weights)
    assert s.extracted == 24 and s.rows == 24
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].chunks is not None
        n, d = f["features"].shape
        assert f["features"].fletcher32 and f["labels"].fletcher32 and len(f.attrs["meta_sha256"]) == 64
        assert n == 24 and f["labels"].shape == (n,) and f["paths"].shape == (n,) and f["sha256"].shape == (n,)
        assert json.loads(f.attrs["class_names"]) == ["blue", "green", "red"]
        assert f.attrs["backbone"] == TINY and len(f.attrs["weights_sha256"]) == 64
        assert json.loads(f.attrs["preprocess"])["size"] > 0
        assert "skipped_paths" in f and "skipped_reasons" in f
        paths = f["paths"].asstr()[:]
        assert all(p.split("/")[0] == ["blue", "green", "red"][lab] for p, lab in zip(paths, f["labels"][:]))
        assert len(f["sha256"][0]) == 64


def test_incremental_rerun_add_remove_relabel(images, tmp_path, tiny_weights):
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    first = read_store(out)
    again = run(images, out, tiny_weights)
    assert (again.extracted, again.reused, again.removed) == (0, 24, 0)
    # remove one, relabel one (move between class folders), add one new image
    os.remove(images / "red" / "red_00.jpg")
    shutil.move(images / "blue" / "blue_01.png", images / "green" / "blue_01.png")
    shutil.copy(images / "green" / "green_02.jpg", images / "green" / "copy.jpg")  # same bytes: reused
    from PIL import Image
    Image.new("RGB", (30, 30), (10, 20, 30)).save(images / "red" / "new.png")
    s = run(images, out, tiny_weights)
    assert s.extracted == 1 and s.removed == 2 and s.rows == 25
    st = read_store(out)
    assert st.labels[st.paths.index("green/blue_01.png")] == 1
    i, j = first.paths.index("blue/blue_03.png"), st.paths.index("blue/blue_03.png")
    np.testing.assert_array_equal(first.features[i], st.features[j])


def test_a_store_from_another_preprocessing_version_is_named_as_such(images, tmp_path, tiny_weights):
    """After an upgrade that changes pixels (a version bump), the refusal says so, not 'another backbone'."""
    from features.storage.store import describe_mismatch, store_fingerprint
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    now = store_fingerprint(out)
    older = {**now, "preprocess": {**now["preprocess"], "version": 4}}
    v = now['preprocess']['version']
    assert describe_mismatch(now, older, ("this run", "the store")) == \
        f"preprocessing version 4 (the store) != {v} (this run): made by another imgsent"
    other_size = {**now, "preprocess": {**now["preprocess"], "version": 4, "size": 1}}
    assert describe_mismatch(now, other_size).startswith("preprocess {")  # more than the version: the whole record


def test_other_backbone_refused_then_force(images, tmp_path, tiny_weights):
    import timm
    import torch
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    other = tmp_path / "other.pt"
    torch.manual_seed(5)
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    before = read_store(out)
    mtime = out.stat().st_mtime_ns
    with pytest.raises(UserError, match=r"made with other settings \(weights_sha256.*--force"):
        run(images, out, str(other))
    after = read_store(out)  # old store untouched: same file, same rows, same vectors
    assert out.stat().st_mtime_ns == mtime and after.fingerprint == before.fingerprint
    np.testing.assert_array_equal(after.features, before.features)
    s = run(images, out, str(other), force=True)
    assert s.extracted == 24


def test_second_writer_fails_naming_pid(images, tmp_path, tiny_weights):
    out = tmp_path / "s.h5"
    with OutputLock(out):
        with pytest.raises(UserError, match=rf"PID {os.getpid()}"):
            run(images, out, tiny_weights)
    OutputLock(out).path.write_text(json.dumps({"pid": 999999999, "host": os.uname().nodename}))  # dead holder
    assert run(images, out, tiny_weights).extracted == 24  # stale lock taken over
    assert not OutputLock(out).path.exists()


def test_interrupted_run_is_incomplete_then_resumes(images, tmp_path, tiny_weights, ctrl_c_after):
    from features.extract import Interrupted
    out = tmp_path / "s.h5"
    ctrl_c_after(8)
    with pytest.raises(Interrupted, match="re-run the same command"):
        run(images, out, tiny_weights, commit_every=4, batch_size=4)
    assert not out.exists() and partial_dir(out).exists()
    with pytest.raises(UserError, match="incomplete store, re-run extract to resume"):
        read_store(out)
    s = run(images, out, tiny_weights, commit_every=4, batch_size=4)
    assert s.extracted == 16 and s.reused == 8 and s.rows == 24
    full = run(images, tmp_path / "ref.h5", tiny_weights)
    a, b = read_store(out), read_store(tmp_path / "ref.h5")
    assert a.paths == b.paths and full.rows == 24
    np.testing.assert_allclose(a.features, b.features, rtol=1e-3, atol=1e-5)


def test_float16_store(images, tmp_path, tiny_weights):
    run(images, tmp_path / "h.h5", tiny_weights, dtype="float16")
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["features"].dtype == np.float16
    assert read_store(tmp_path / "h.h5").features.dtype == np.float32
    # A backbone whose features pass float16's 65504 were stored as inf: every reader then called the store
    # damaged, and extracting it again did the same. Now each such image is refused with the fix.
    import torch
    big = torch.load(tiny_weights, weights_only=True)
    big["bn2.bias"] = torch.full_like(big["bn2.bias"], 1e6)  # the last layer's output, past its ReLU: ~1e6
    torch.save(big, tmp_path / "big.pt")
    with pytest.raises(UserError, match=r"none of \d+ images could be embedded \(\d+ x features beyond float16's "
                                        r"range; extract with --dtype float32\)"):
        run(images, tmp_path / "big.h5", str(tmp_path / "big.pt"), dtype="float16")
    assert read_store(run(images, tmp_path / "big32.h5", str(tmp_path / "big.pt")).out).features.max() > 65504
