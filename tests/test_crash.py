"""Fault injection: SIGKILL a real `imgsent extract` subprocess at random points of its run, re-run, and compare
with an uninterrupted run. Also SIGTERM (clean stop) and a concurrent second writer. Every point is reached as an
event (tests/pause.py), never after a sleep."""
import signal

import numpy as np
import pytest

from features.errors import UserError
from features.storage.store import partial_dir, read_store
from tests.conftest import TINY, make_images, run_cli
from tests.pause import start, wait_for


def _args(images, out, w):
    return ["extract", str(images), "--out", str(out), "--backbone", TINY, "--weights", w, "--batch-size", "4",
            "--commit-every", "8", "--workers", "0", "--no-progress"]


FORWARD, COMMIT = "features.models.embed:_forward", "features.storage.partial:fsync_replace"  # 23 and 12 calls


def test_sigkill_at_random_points_then_resume(tmp_path, tiny_weights):
    """SIGKILL at random points of a run, between two forward passes or inside a commit (its chunk written, not
    yet renamed), each reached as an event (tests/pause.py): the store is then in one of two states, each with its
    own exact message, never an HDF5 error. Then two kills in a row, each resumed: the result equals an
    uninterrupted run, with no debris."""
    import shutil
    images = make_images(tmp_path / "imgs", per_class=30, size=48)
    ref = tmp_path / "ref.h5"
    run_cli("extract", str(images), "--out", str(ref), "--backbone", TINY, "--weights", tiny_weights, "--no-progress",
            check=True)
    rng = np.random.default_rng(0)
    out, marker = tmp_path / "s.h5", tmp_path / "paused"

    def kill_at(target: str, k: int) -> None:
        p = start(target, k, marker, *_args(images, out, tiny_weights))
        assert wait_for(marker, p), p.communicate()
        p.send_signal(signal.SIGKILL)
        p.wait()
        marker.unlink()

    for target, k in [(FORWARD, int(rng.integers(1, 24))) for _ in range(2)] + \
                     [(COMMIT, int(rng.integers(1, 12))) for _ in range(2)]:
        shutil.rmtree(partial_dir(out), ignore_errors=True)  # a fresh run each time: k is within its work
        kill_at(target, k)
        if partial_dir(out).exists():  # killed mid-run: committed chunks wait for the resume
            with pytest.raises(UserError, match="incomplete store, re-run extract to resume"):
                read_store(out)
        else:  # killed before its first commit: nothing was written
            with pytest.raises(UserError, match="no such store; create it with"):
                read_store(out)
    shutil.rmtree(partial_dir(out), ignore_errors=True)
    kill_at(COMMIT, 4)  # 3 chunks committed, the 4th written and not renamed
    kill_at(FORWARD, 4)  # the resume: 12 images reused, killed 3 batches further
    r = run_cli(*_args(images, out, tiny_weights))
    assert r.returncode == 0 and "90 images (" in r.stdout and "0 reused" not in r.stdout, r.stdout + r.stderr
    a, b = read_store(out), read_store(ref)
    assert a.paths == b.paths and a.sha256 == b.sha256 and list(a.labels) == list(b.labels)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-3, atol=1e-5)
    assert not partial_dir(out).exists()


def test_sigterm_commits_and_says_how_to_resume(tmp_path, tiny_weights):
    images = make_images(tmp_path / "imgs", per_class=30, size=48)
    out, marker = tmp_path / "s.h5", tmp_path / "paused"
    p = start(FORWARD, 5, marker, *_args(images, out, tiny_weights))  # after two commits of 8 images
    assert wait_for(marker, p), p.communicate()
    p.send_signal(signal.SIGTERM)
    marker.unlink()  # let it go on: it stops at the next batch, committing what it has
    _, err = p.communicate(timeout=300)
    assert p.returncode == 130, err
    assert "re-run the same command to resume" in err and "Traceback" not in err
    assert len(list(partial_dir(out).glob("chunk-*.h5"))) >= 2


def test_second_extract_on_same_store_fails_at_once(tmp_path, tiny_weights):
    images = make_images(tmp_path / "imgs", per_class=30, size=48)
    out, marker = tmp_path / "s.h5", tmp_path / "paused"
    p = start(FORWARD, 1, marker, *_args(images, out, tiny_weights))  # holds the lock, paused at its first batch
    assert wait_for(marker, p), p.communicate()
    r = run_cli("extract", str(images), "--out", str(out), "--backbone", TINY, "--weights", tiny_weights)
    p.kill()
    p.wait()
    assert r.returncode == 2 and f"PID {p.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
