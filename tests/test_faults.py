"""Off the happy path, as a hostile user: every fault is one line `error: ...` (exit 2, no traceback) naming the
file or key, and nothing the user already had is destroyed or silently changed."""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from features.storage.atomic import OutputLock
from features.errors import UserError
from features.storage.store import read_store
from tests.synthetic import synthetic_store
from tests.conftest import ROOT, TINY, make_images, run_cli


def one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert "weights_only=False" not in err
    return err


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_weights):
    """A tiny store, a trained model and a held-out store, made once for this module."""
    d = tmp_path_factory.mktemp("world")
    make_images(d / "imgs", per_class=6)
    make_images(d / "test", per_class=3, seed=5)
    kw = ["--backbone", TINY, "--weights", tiny_weights, "--no-progress"]
    run_cli("extract", str(d / "imgs"), "--out", str(d / "s.h5"), *kw, check=True)
    run_cli("extract", str(d / "test"), "--out", str(d / "t.h5"), *kw, check=True)
    run_cli("train-head", str(d / "s.h5"), "--out", str(d / "model"), "--params", str(ROOT / "params.yaml"), check=True)
    return d


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _limited(max_bytes):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))
    return limit


def _cli(*args, cwd=None, preexec=None):
    cmd = [sys.executable, "-c", "from pipeline.cli import main; main()", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=preexec, timeout=600)


# --------------------------------------------------------------------------- outputs whole or not at all

@pytest.mark.parametrize("command", ["train-head", "evaluate", "report", "predict", "export"])
def test_a_write_that_dies_midway_keeps_the_previous_output(world, tmp_path, command):
    out = tmp_path / ("out.csv" if command == "predict" else "out.pt" if command == "export" else "out")
    args = {"train-head": ["train-head", str(world / "s.h5"), "--params", str(ROOT / "params.yaml")],
            "evaluate": ["evaluate", str(world / "model"), str(world / "t.h5")],
            "report": ["report", str(world / "model"), str(world / "t.h5")],
            "predict": ["predict", str(world / "model"), str(world / "test"), "--no-progress"],
            "export": ["export", str(world / "model"), "--format", "torchscript"]}[command] + ["--out", str(out)]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    before = _snapshot(out) if out.is_dir() else out.read_bytes()
    r = _cli(*args, preexec=_limited(300))  # every file over 300 bytes fails to write (EFBIG), like a full disk
    one_line_error(r, "cannot write", "previous output")
    assert (_snapshot(out) if out.is_dir() else out.read_bytes()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp debris left behind


def test_train_head_killed_at_any_moment_leaves_a_complete_model(tmp_path):
    """SIGKILL in each phase of a train-head that replaces a model: a CV fit, the final fit, just before the swap
    of the folders, just after it. Each point is reached as an event (tests/pause.py), not after a sleep; whichever
    model is then there is whole and consistent, and the next run takes the dead writer's lock over."""
    from tests.pause import start, wait_for
    store = synthetic_store(tmp_path / "s.h5", n=600, dim=64)  # each point is an event: no size needed to hit it
    out, marker = tmp_path / "m", tmp_path / "paused"
    args = ["train-head", store, "--out", str(out), "--params", str(ROOT / "params.yaml")]
    assert _cli(*args).returncode == 0
    from pipeline.inference.modeldir import load_model_dir
    for target, k in (("pipeline.selection.crossval:fit_rows", 2), ("pipeline.selection.heads:fit_final", 1),
                      ("features.storage.atomic:_exchange", 1), ("features.storage.atomic:_fsync_dir", 2)):
        p = start(target, k, marker, *args)
        assert wait_for(marker, p), (target, p.communicate())
        p.send_signal(signal.SIGKILL)
        p.wait()
        marker.unlink()
        head, info = load_model_dir(out)  # whichever run's model is there, it is whole and consistent
        metrics = json.loads((out / "details.json").read_text())
        assert len(np.load(out / "oof_logits.npy")) == metrics["n_images"] == 600, target
    assert _cli(*args).returncode == 0  # the SIGKILLed holder's lock is stale: taken over


def test_two_writers_of_one_model_directory(world, tmp_path):
    out = tmp_path / "m"
    with OutputLock(out):
        r = _cli("train-head", str(world / "s.h5"), "--out", str(out), "--params", str(ROOT / "params.yaml"))
    one_line_error(r, f"PID {os.getpid()}", "is being written by")
    assert not out.exists()


# --------------------------------------------------------------------------- stores: damaged, foreign, flipped bytes

def _flip_feature_byte(store):
    with h5py.File(store, "r") as f:
        info = f["features"].id.get_chunk_info(0)
    with open(store, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        b = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_flipped_feature_bytes_are_named_then_re_embedded(world, tmp_path, tiny_weights):
    import shutil
    store = tmp_path / "s.h5"
    shutil.copy(world / "s.h5", store)
    good = read_store(store)
    _flip_feature_byte(store)
    with pytest.raises(UserError, match="damaged store"):
        read_store(store)
    one_line_error(_cli("train-head", str(store), "--out", str(tmp_path / "m"), "--params", str(ROOT / "params.yaml")),
                   str(store), "damaged store", "re-run imgsent extract")
    one_line_error(_cli("evaluate", str(world / "model"), str(store), "--out", str(tmp_path / "e")), "damaged store")
    r = _cli("extract", str(world / "imgs"), "--out", str(store), "--backbone", TINY, "--weights", tiny_weights,
             "--no-progress")
    assert r.returncode == 0 and "damaged rows re-embedded" in r.stdout, r.stdout + r.stderr
    fixed = read_store(store)
    assert fixed.paths == good.paths
    np.testing.assert_allclose(fixed.features, good.features, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "foreign_hdf5", "folder"])
@pytest.mark.parametrize("budget", [0, 1])  # in memory, and streamed (budget 1 MiB)
def test_damaged_or_foreign_stores_are_one_line(world, tmp_path, kind, budget):
    bad = tmp_path / "bad.h5"
    if kind == "truncated":
        data = (world / "s.h5").read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("not a store\n")
    elif kind == "foreign_hdf5":
        with h5py.File(bad, "w") as f:
            f["x"] = np.zeros(3)
    else:
        bad.mkdir()
    params = (ROOT / "params.yaml").read_text().replace("memory_budget_mb: 0 ", f"memory_budget_mb: {budget} ")
    (tmp_path / "p.yaml").write_text(params)
    one_line_error(_cli("train-head", str(bad), "--out", str(tmp_path / "m"), "--params", str(tmp_path / "p.yaml")),
                   str(bad))
    assert not (tmp_path / "m").exists()


# --------------------------------------------------------------------------- model directories

def _edit_model(world, tmp_path, edit):
    import shutil
    m = tmp_path / "m"
    shutil.copytree(world / "model", m)
    edit(m)
    return m


@pytest.mark.parametrize("case,needle", [
    ("extra_class", "model.json: head has 3 outputs but 4 class_names"),
    ("missing_class", "model.json: head has 3 outputs but 2 class_names"),
    ("reordered", "head.npz: was trained for other class names, class order"),
    ("json_list", "model.json: expected a JSON object"),
    ("missing_key", "model.json: missing key 'temperature'"),
    ("temperature_text", "model.json: temperature 'hot' is not a number"),
    ("empty_head", "head.npz: empty file"),
    ("pickle_head", "head.npz: does not belong with model.json"),
    ("pickle_head_matching_sha", "head.npz: not an array archive imgsent can load"),
    ("not_json", "model.json: not valid JSON"),
    ("older_format", "model.json: made by an older imgsent (format 2); re-run imgsent train-head"),
    ("older_dir", "model.json: made by an older imgsent (format 2); re-run imgsent train-head"),
    ("float64_head", "head.npz: array w0 is float64"),
])
def test_model_directory_is_cross_checked(world, tmp_path, case, needle):
    def edit(m):
        meta = json.loads((m / "model.json").read_text())
        if case == "extra_class":
            meta["class_names"].append("purple")
        elif case == "missing_class":
            meta["class_names"].pop()
        elif case == "reordered":
            meta["class_names"] = meta["class_names"][::-1]
        elif case == "json_list":
            meta = []
        elif case == "missing_key":
            del meta["temperature"]
        elif case == "temperature_text":
            meta["temperature"] = "hot"
        elif case == "empty_head":
            (m / "head.npz").write_bytes(b"")
        elif case.startswith("pickle_head"):
            (m / "head.npz").write_bytes(pickle.dumps({"x": os.getcwd}))
            if case.endswith("sha"):
                import hashlib
                meta["head_sha256"] = hashlib.sha256((m / "head.npz").read_bytes()).hexdigest()
        elif case.startswith("older"):
            meta["format"] = 2
            if case == "older_dir":  # the layout imgsent wrote before head.npz
                (m / "head.npz").rename(m / "head.pt")
        elif case == "float64_head":
            import hashlib
            with np.load(m / "head.npz") as z:
                arrays = {k: z[k].astype(np.float64) if k == "w0" else z[k] for k in z.files}
            np.savez(m / "head.npz", **arrays)
            meta["head_sha256"] = hashlib.sha256((m / "head.npz").read_bytes()).hexdigest()
        if case == "not_json":
            (m / "model.json").write_text("{oops")
        else:
            (m / "model.json").write_text(json.dumps(meta))
    m = _edit_model(world, tmp_path, edit)
    for cmd in (["evaluate", str(m), str(world / "t.h5"), "--out", str(tmp_path / "e")],
                ["predict", str(m), str(world / "test"), "--out", str(tmp_path / "p.csv")],
                ["export", str(m), "--out", str(tmp_path / "x.pt")]):
        one_line_error(_cli(*cmd), needle)
    assert not (tmp_path / "e").exists() and not (tmp_path / "p.csv").exists() and not (tmp_path / "x.pt").exists()


def test_a_clean_up_that_fails_never_hides_the_error(tmp_path, monkeypatch):
    """Issue #33: `imgsent init` on a read-only file system ended in 'unexpected OSError ... .params.yaml.tmp-PID':
    atomic_file's clean-up (removing its temp file) raised in its `finally` and replaced the one-line error. Every
    clean-up (temp file, lock, a dead run's debris) now gives way to the error the user must fix."""
    import errno
    from pathlib import Path
    from features.errors import UserError
    from features.storage.atomic import OutputLock, atomic_file

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    with pytest.raises(UserError, match=r"x.txt: cannot write \(Read-only file system\); choose a writable location"):
        with OutputLock(tmp_path / "x.txt"), atomic_file(tmp_path / "x.txt") as tmp:
            monkeypatch.setattr(Path, "unlink", read_only)  # nothing can be removed from here on
            tmp.write_text("half")
            raise OSError(errno.EROFS, "Read-only file system")


def test_a_dead_runs_helper_temp_files_are_removed_by_the_next_writer(tmp_path):
    """Issue #33: after `kill -TERM` during an ONNX export the next export left `.m.onnx.tmp-PID.pre.onnx` behind:
    the clean-up read 'PID.pre.onnx' as the PID. Files of a live process are kept."""
    from features.storage.atomic import OutputLock
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    debris = [tmp_path / f".m.onnx.tmp-{dead}", tmp_path / f".m.onnx.tmp-{dead}.pre.onnx",
              tmp_path / f".m.onnx.tmp-{dead}.net.onnx"]
    alive = tmp_path / f".m.onnx.tmp-{os.getppid()}.pre.onnx"
    for f in debris + [alive]:
        f.write_bytes(b"x")
    with OutputLock(tmp_path / "m.onnx"):
        pass
    assert not any(f.exists() for f in debris) and alive.exists()


def test_a_model_from_another_imgsents_preprocessing_says_to_retrain(world, tmp_path, monkeypatch):
    """Issue #33: a model trained under preprocessing version 4, used by version 5: predict said 'install the same
    weights' and evaluate 'extract it with --backbone ...'; neither helps, retraining does. Both now say so, and
    name which version is whose (extract's message had them the other way round)."""
    import dataclasses
    from features.errors import UserError
    from features.models import backbones
    from pipeline.inference.predict import load_model
    from pipeline.stages.evaluate import evaluate
    real = backbones.load_backbone

    def newer(*args, **kwargs):  # this imgsent computes version + 1
        bb = real(*args, **kwargs)
        return dataclasses.replace(bb, pre=dataclasses.replace(bb.pre, version=bb.pre.version + 1))
    monkeypatch.setattr("pipeline.inference.predict.load_backbone", newer)
    with pytest.raises(UserError, match=r"preprocessing version (\d+) \(this imgsent\) != \d+ \(the model\): made by "
                                        r"another imgsent\); re-extract its training images with this imgsent and "
                                        r"re-run train-head"):
        load_model(world / "model", device="cpu").predict([str(world / "test")], source="none")
    st = read_store(world / "t.h5")
    fp = st.fingerprint
    older = {**fp, "preprocess": {**fp["preprocess"], "version": fp["preprocess"]["version"] - 1}}
    monkeypatch.setattr("pipeline.data.rows.read_store",
                        lambda *a, **k: dataclasses.replace(read_store(*a, **k), fingerprint=older))
    with pytest.raises(UserError, match=r"t.h5: features do not match the model \(preprocessing version \d+ \(this "
                                        r"store\) != \d+ \(the model\): made by another imgsent\); re-extract the "
                                        r"model's training images"):
        evaluate(model_dir=str(world / "model"), stores=[str(world / "t.h5")], out=str(tmp_path / "e"))


def test_a_model_directory_with_something_put_inside_says_what_is_in_the_way(world, tmp_path):
    """Issue #33: `report m --out m/report`, then `train-head --out m` said m 'exists and is not a model directory
    made by imgsent'; it is one, and report/ inside is what is in the way."""
    import shutil
    m = tmp_path / "m"
    shutil.copytree(world / "model", m)
    (m / "report").mkdir()
    (m / "report" / "index.html").write_text("<html/>")
    r = run_cli("train-head", str(world / "s.h5"), "--out", str(m), "--params", str(ROOT / "params.yaml"))
    one_line_error(r, f"--out {m}: a model directory made by imgsent, but it also holds report/; move that out of it")


def test_predict_checks_the_per_face_csv_only_for_a_face_mode_model(world, tmp_path):
    """Issue #33: `predict --out` with a 245-character name was refused because the `.faces.csv` companion's name
    was too long, for a model that never writes one."""
    out = tmp_path / ("p" * 241 + ".csv")  # 245 characters: its '.faces.csv' companion would be 251
    r = run_cli("predict", str(world / "model"), str(world / "test"), "--out", str(out), "--no-progress")
    assert r.returncode == 0 and out.exists(), r.stderr
