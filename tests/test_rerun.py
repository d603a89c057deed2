"""Re-runs cost what changed: a file whose size, mtime and inode the store recorded is not read again, and a
store that would come out the same is not rewritten; any real change is still seen."""
import hashlib
import os
import time

import numpy as np
from PIL import Image

from features.extract import extract
from features.storage.statcache import stat_path, write_stat_cache
from features.storage.store import read_store
from tests.conftest import TINY

PAST = time.time() - 3600  # well before any hashing pass: not "racy"


def run(images, out, w):
    return extract(images=str(images), out=str(out), backbone=TINY, weights=w, progress=False, workers=0)


def age(folder):
    for p in folder.rglob("*.*"):
        os.utime(p, (PAST, PAST))


def digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns


def test_a_no_op_rerun_reads_no_image_and_leaves_the_store_alone(images, tmp_path, tiny_weights):
    age(images)
    out = tmp_path / "s.h5"
    first = run(images, out, tiny_weights)
    assert first.hashed == 24 and first.extracted == 24 and not first.unchanged
    before = digest(out)
    again = run(images, out, tiny_weights)
    assert again.hashed == 0 and again.extracted == 0 and again.unchanged and again.rows == 24
    assert digest(out) == before  # same bytes, same mtime
    assert "0 files hashed; store unchanged, not rewritten" in again.line()


def test_every_kind_of_change_is_still_seen(images, tmp_path, tiny_weights):
    age(images)
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    files = sorted(images.rglob("*.*"))
    # 1. new content, size and mtime forged back to the recorded ones: the inode differs (written and renamed)
    a = files[0]
    st = a.stat()
    tmp = a.with_name("new.tmp")
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp, format="PNG")
    with open(tmp, "r+b") as f:  # pad or cut to the old size (a PNG decoder ignores trailing bytes)
        data = f.read()
        f.seek(0), f.truncate(), f.write((data + b"\0" * st.st_size)[:max(st.st_size, len(data))])
    os.replace(tmp, a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    # 2. same file, only touched: hashed again, same sha256, nothing embedded
    b = files[1]
    os.utime(b, (PAST + 10, PAST + 10))
    # 3. a new image
    Image.new("RGB", (40, 40), (200, 10, 10)).save(files[2].parent / "extra.png")
    os.utime(files[2].parent / "extra.png", (PAST, PAST))
    s = run(images, out, tiny_weights)
    assert s.hashed == 3 and s.extracted == 2 and not s.unchanged and s.rows == 25
    store = read_store(out, features=False)
    i = store.paths.index(str(a.relative_to(images)))
    assert store.sha256[i] == hashlib.sha256(a.read_bytes()).hexdigest()
    assert run(images, out, tiny_weights).hashed == 0  # and now it is recorded


def test_verify_sees_a_file_rewritten_in_place_with_its_mtime_restored(images, tmp_path, tiny_weights):
    """The stat cache's documented blind spot (same size, same inode, mtime put back) and its remedy, --verify."""
    age(images)
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    a = sorted(images.rglob("*.png"))[0]
    st = a.stat()
    with open(a, "r+b") as f:  # in place: same inode; a byte of the zlib data flipped keeps the size
        data = bytearray(f.read())
        Image.new("RGB", (40, 40), (250, 0, 250)).save(tmp_path / "other.png")
        other = (tmp_path / "other.png").read_bytes()
        f.seek(0), f.truncate(), f.write((other + b"\0" * len(data))[:max(len(data), len(other))])
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (a.stat().st_ino, a.stat().st_size, a.stat().st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    blind = run(images, out, tiny_weights)
    assert blind.hashed == 0 and blind.extracted == 0  # the blind spot: nothing looked changed
    seen = extract(images=str(images), out=str(out), backbone=TINY, weights=tiny_weights, progress=False,
                   workers=0, verify=True)
    assert seen.hashed == 24 and seen.extracted == 1
    store = read_store(out, features=False)
    assert store.sha256[store.paths.index(str(a.relative_to(images)))] == hashlib.sha256(a.read_bytes()).hexdigest()


def test_files_modified_just_before_a_pass_are_hashed_once_more(images, tmp_path, tiny_weights, monkeypatch):
    """mtimes come in ticks of several ms: a file written in the same tick as it was hashed can change without
    its stat changing, so the next run re-hashes files modified < 2 s before the pass (git's racy-clean rule).
    The passes' clock is the test's: the second pass starts 3 s after the first without waiting for it."""
    import types
    import features.extract
    clock = [time.time_ns()]
    monkeypatch.setattr(features.extract, "time", types.SimpleNamespace(time=time.time, time_ns=lambda: clock[0]))
    out = tmp_path / "s.h5"
    for p in images.rglob("*.*"):  # modified 1 s before the first pass
        os.utime(p, ns=(clock[0] - 10 ** 9, clock[0] - 10 ** 9))
    run(images, out, tiny_weights)
    clock[0] += 3 * 10 ** 9
    second = run(images, out, tiny_weights)
    # hashed again; the store's bytes stay (the stat cache beside it records the later pass)
    assert second.hashed == 24 and second.extracted == 0 and second.unchanged
    third = run(images, out, tiny_weights)
    assert third.hashed == 0 and third.unchanged


def test_a_damaged_stat_cache_only_costs_hashing(images, tmp_path, tiny_weights):
    age(images)
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    store = read_store(out, features=False)
    write_stat_cache(out, meta_sha256=store.meta_sha256, file_stats=np.zeros((24, 3), np.int64), stat_time_ns=0,
                     fingerprint_key=None)  # wrong stats: nothing matches any more
    s = run(images, out, tiny_weights)
    assert s.hashed == 24 and s.extracted == 0 and s.rows == 24
    assert run(images, out, tiny_weights).hashed == 0
    stat_path(out).write_bytes(b"garbage")  # unreadable: no cache at all
    assert run(images, out, tiny_weights).hashed == 24
    stat_path(out).unlink()  # gone: the same
    assert run(images, out, tiny_weights).hashed == 24 and run(images, out, tiny_weights).hashed == 0


def test_the_same_images_give_the_same_store_bytes_wherever_they_are(images, tmp_path, tiny_weights):
    """Issue #24: a store holds nothing of the machine, the checkout's place, file times or the clock, so a
    fresh clone's `dvc repro` writes the bytes dvc.lock recorded."""
    import shutil
    age(images)
    run(images, tmp_path / "a" / "s.h5", tiny_weights)
    copy = tmp_path / "elsewhere" / "deeper" / "imgs"
    shutil.copytree(images, copy)  # other inodes, other mtimes, another absolute path
    (tmp_path / "elsewhere" / "deeper" / "a").mkdir()
    time.sleep(0.01)
    run(copy, tmp_path / "elsewhere" / "deeper" / "a" / "s.h5", tiny_weights)
    assert (tmp_path / "a" / "s.h5").read_bytes() == (tmp_path / "elsewhere" / "deeper" / "a" / "s.h5").read_bytes()
    assert read_store(tmp_path / "elsewhere" / "deeper" / "a" / "s.h5").root == str(copy)


def test_a_no_op_rerun_never_builds_the_network(images, tmp_path, tiny_weights, monkeypatch):
    import features.extract as ex
    age(images)
    out = tmp_path / "s.h5"
    run(images, out, tiny_weights)
    real = ex.load_backbone
    calls = []
    monkeypatch.setattr(ex, "load_backbone", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert run(images, out, tiny_weights).unchanged and calls == []  # the store's fingerprint, weights unchanged
    Image.new("RGB", (40, 40), (9, 9, 200)).save(images / "blue" / "more.png")
    s = run(images, out, tiny_weights)
    # something to embed: served by the ONNX export of this very fingerprint that passed parity in the first run
    assert s.extracted == 1 and calls == []
    Image.new("RGB", (40, 40), (9, 200, 9)).save(images / "green" / "more.png")
    s = extract(images=str(images), out=str(out), backbone=TINY, weights=tiny_weights, progress=False, workers=0,
                engine="torch")
    assert s.extracted == 1 and calls == [1]  # the torch engine needs the network: built once, fingerprint checked
    os.utime(tiny_weights)  # the weights file changed (its mtime): never trust the cached fingerprint
    calls.clear()
    run(images, out, tiny_weights)
    assert calls == [1]
    feats = read_store(out).features  # every row, whichever way it was embedded, is a finite feature row
    assert np.isfinite(feats).all() and len(feats) == 26
