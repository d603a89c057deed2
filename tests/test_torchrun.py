"""`torchrun --nproc-per-node=2 --no-python imgsent extract` (gloo on CPU) equals a single-process run."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from features.extract import extract
from features.plan import shard_path
from features.storage.store import read_store
from tests.conftest import ROOT, TINY, make_images


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_torchrun_equals_single_process(tmp_path, tiny_weights):
    bindir = Path(sys.executable).parent
    torchrun, imgsent = shutil.which("torchrun", path=str(bindir)), shutil.which("imgsent", path=str(bindir))
    if not torchrun or not imgsent:
        pytest.skip("torchrun / imgsent console scripts not installed in this environment")
    images = make_images(tmp_path / "imgs", per_class=10)
    (images / "red" / "zero.png").write_bytes(b"")
    (images / "blue" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    extract(images=str(images), out=str(tmp_path / "single.h5"), backbone=TINY, weights=tiny_weights, progress=False,
            workers=0)
    out = tmp_path / "dist.h5"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc-per-node=2", "--no-python", imgsent, "extract",
                        str(images), "--out", str(out), "--backbone", TINY, "--weights", tiny_weights, "--workers", "0",
                        "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(shard_path(out, i, 2).exists() for i in range(2))
    a, b = read_store(tmp_path / "single.h5"), read_store(out)
    assert sorted(a.paths) == sorted(b.paths) and sorted(a.skipped) == sorted(b.skipped)
    ia, ib = np.argsort(a.paths), np.argsort(b.paths)
    np.testing.assert_allclose(a.features[ia], b.features[ib], rtol=1e-3, atol=1e-5)
    assert list(a.labels[ia]) == list(b.labels[ib])
