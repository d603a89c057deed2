"""params.yaml validation and the CLI's one-line errors (exit 2, no traceback, nothing lost)."""
import csv
import dataclasses
import json
import re
import sys

import numpy as np
import pytest
import yaml

from features.errors import UserError
from pipeline.params import Params, load_params, parse_params
from tests.conftest import ROOT, TINY, make_images, run_cli


PARAMS = str(ROOT / "params.yaml")


def base() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_parse_and_there_are_no_hidden_defaults(tmp_path, monkeypatch):
    """The repository's params.yaml parses (whatever values `dvc exp run -S` gives it); with no params.yaml the
    commands refuse and say how to get one, never falling back on built-in values."""
    p = load_params(str(ROOT / "params.yaml"))
    assert isinstance(p, Params) and p.paths is not None and len(p.extract.backbones) >= 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"no params.yaml in this folder; write one with `imgsent init \.`"):
        load_params(None)


@pytest.mark.parametrize("section,key,value,msg", [
    ("head", "lrr", 0.1, "unknown key 'head.lrr'"),
    ("head", "lr", -0.1, "head.lr=-0.1: out of range"),
    ("head", "lr", "fast", "head.lr='fast': expected float"),
    ("head", "tol", 2.0, "head.tol=2.0: out of range"),
    ("head", "hidden", [0], "every size must be in [1, 16384]"),
    ("head", "hidden", [100000000], "every size must be in [1, 16384]"),
    ("head", "lr", "1e-3x", "head.lr='1e-3x': expected float"),
    ("head", "class_weight", "auto", "allowed values are balanced, none"),
    ("cv", "folds", 1, "cv.folds=1: out of range, allowed [2, 100]"),
    ("cv", "folds", True, "expected int"),
    ("extract", "backbones", ["efficientnet_lite0", "fer_mini_xception", "efficientnet_lite0"],
     "efficientnet_lite0 is listed twice; list each backbone once"),
])
def test_bad_params_name_key_value_and_range(section, key, value, msg):
    raw = base()
    raw[section][key] = value
    with pytest.raises(UserError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        parse_params(raw)


def test_yaml_forms_users_mean_are_accepted_and_duplicates_refused(tmp_path):
    text = re.sub(r"lr: 0\.001\b", "lr: 1e-3", (ROOT / "params.yaml").read_text())
    assert "lr: 1e-3" in text
    (tmp_path / "p.yaml").write_text(text)
    assert load_params(str(tmp_path / "p.yaml")).head.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    (tmp_path / "dup.yaml").write_text(text.replace("  dropout: 0.3", "  dropout: 0.3\n  dropout: 0.5"))
    with pytest.raises(UserError, match=r"dup.yaml: duplicate key 'dropout' at line \d+"):
        load_params(str(tmp_path / "dup.yaml"))
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="bin.yaml: not a text file in UTF-8"):
        load_params(str(tmp_path / "bin.yaml"))


def test_yaml_aliases_odd_keys_and_workers_auto(tmp_path, monkeypatch):
    """A 'billion laughs' alias bomb is refused at once, while the document is read and before anything is built
    from it (it took 65 s and 2.5 GB before); so is a key that is a list; `extract.workers` takes auto or a number
    (issue #25, #22)."""
    from pipeline.params import _UniqueKeyLoader
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)

    def expanded(*args, **kwargs):  # where the expansion would happen: reaching it is the failure
        raise AssertionError("the aliases were built before being refused")
    with monkeypatch.context() as m:
        m.setattr(_UniqueKeyLoader, "construct_document", expanded)
        with pytest.raises(UserError, match=r"bomb.yaml: YAML alias \*a at line 2"):
            load_params(str(tmp_path / "bomb.yaml"))
    (tmp_path / "key.yaml").write_text("[1]: 2\n")
    with pytest.raises(UserError, match=r"key.yaml: key \[1\] at line 1 is not a name"):
        load_params(str(tmp_path / "key.yaml"))
    text = (ROOT / "params.yaml").read_text()
    for value, ok in (("auto", "auto"), ("3", 3), ("0", 0)):
        (tmp_path / "w.yaml").write_text(re.sub(r"workers: \S+", f"workers: {value}", text, count=1))
        assert load_params(str(tmp_path / "w.yaml")).extract.workers == ok
    (tmp_path / "w.yaml").write_text(re.sub(r"workers: \S+", "workers: many", text, count=1))
    with pytest.raises(UserError, match="extract.workers='many'"):
        load_params(str(tmp_path / "w.yaml"))


def test_missing_key_and_section():
    raw = base()
    del raw["head"]["dropout"]
    with pytest.raises(UserError, match="missing key 'head.dropout'"):
        parse_params(raw)
    raw = base()
    del raw["cv"]
    with pytest.raises(UserError, match="missing section 'cv'"):
        parse_params(raw)


@pytest.fixture
def store(tmp_path, tiny_weights):
    images = make_images(tmp_path / "imgs", per_class=6)
    run_cli("extract", str(images), "--out", str(tmp_path / "s.h5"), "--backbone", TINY, "--weights", tiny_weights,
            "--no-progress", check=True)
    return tmp_path / "s.h5"


def _params_file(tmp_path, **changes):
    raw = base()
    for dotted, v in changes.items():
        sec, key = dotted.split("__")
        raw[sec][key] = v
    path = tmp_path / f"p-{'-'.join(f'{k}={v}' for k, v in changes.items())}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_cli_errors_are_one_line_exit_2(tmp_path, store):
    cases = [
        (["extract", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.h5")], "no such file or folder"),
        (["extract", str(tmp_path / "imgs"), "--out", str(tmp_path / "x.h5"), "--backbone", "resnet5O"], "unknown backbone"),
        (["train-head", str(tmp_path / "none.h5"), "--out", str(tmp_path / "m"), "--params", PARAMS], "no such store"),
        (["train-head", str(store), "--out", str(tmp_path / "m")], "no params.yaml in this folder; write one with `imgsent init .`"),
        (["train-head", str(store), "--out", str(tmp_path / "m"), "--params", _params_file(tmp_path, head__lr=-1)],
         "head.lr=-1.0: out of range"),
        (["train-head", str(store), "--out", str(tmp_path / "m"), "--params", _params_file(tmp_path, cv__folds=7)],
         "cv.folds=7 exceeds the smallest class count 6"),
        (["evaluate", str(tmp_path / "nomodel"), str(store), "--out", str(tmp_path / "e")], "not a model directory"),
    ]
    for args, msg in cases:
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_empty_and_single_class_inputs(tmp_path, tiny_weights):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    r = run_cli("extract", str(tmp_path / "empty"), "--out", str(tmp_path / "e.h5"))
    assert r.returncode == 2 and "a/: empty class folder: no images" in r.stderr
    one = make_images(tmp_path / "one", per_class=4)
    for d in ("blue", "green"):
        for f in (one / d).iterdir():
            f.unlink()
        (one / d).rmdir()
    run_cli("extract", str(one), "--out", str(tmp_path / "one.h5"), "--backbone", TINY, "--weights", tiny_weights,
            "--no-progress", check=True)
    r = run_cli("train-head", str(tmp_path / "one.h5"), "--out", str(tmp_path / "m"), "--params", PARAMS, cwd=tmp_path)
    assert r.returncode == 2 and "only one class (red)" in r.stderr
    assert (tmp_path / "one.h5").exists()  # nothing already computed is lost


def test_train_refuses_incomplete_store(tmp_path, tiny_weights, ctrl_c_after):
    from features.extract import Interrupted, extract
    images = make_images(tmp_path / "imgs", per_class=6)
    ctrl_c_after(4)
    with pytest.raises(Interrupted):
        extract(images=str(images), out=str(tmp_path / "s.h5"), backbone=TINY, weights=tiny_weights, progress=False,
                workers=0, batch_size=2, commit_every=2)
    r = run_cli("train-head", str(tmp_path / "s.h5"), "--out", str(tmp_path / "m"), "--params", PARAMS, cwd=tmp_path)
    assert r.returncode == 2 and "incomplete store, re-run extract to resume" in r.stderr


def test_train_evaluate_predict_outputs(tmp_path, store, tiny_weights):
    pf = _params_file(tmp_path, cv__folds=3, head__epochs=30)
    run_cli("train-head", str(store), "--out", str(tmp_path / "m"), "--params", pf, check=True)
    m = tmp_path / "m"
    meta = json.loads((m / "model.json").read_text())
    assert meta["class_names"] == ["blue", "green", "red"] and meta["backbones"][0]["backbone"] == TINY
    with np.load(m / "head.npz", allow_pickle=False) as z:
        assert {"mean", "scale", "temperature", "w0", "b0", "card"} <= set(z.files)
    metrics = json.loads((m / "details.json").read_text())
    assert len(metrics["cv"]["per_fold"]) == 3 and metrics["cv"]["macro_f1_mean"] > 0.8  # colours are separable
    rows = list(csv.DictReader(open(m / "oof_predictions.csv")))
    assert len(rows) == 18 and {"path", "label", "predicted", "confidence", "p_blue", "p_green", "p_red"} <= set(rows[0])
    assert abs(sum(float(rows[0][f"p_{c}"]) for c in ("blue", "green", "red")) - 1) < 1e-4
    conf = list(csv.DictReader(open(m / "confusion.csv")))
    assert len(conf) == 18 and set(conf[0]) == {"actual", "predicted"}
    # evaluate on a fresh held-out set of the same classes
    test = make_images(tmp_path / "test", per_class=4, seed=1)
    run_cli("extract", str(test), "--out", str(tmp_path / "t.h5"), "--backbone", TINY, "--weights", tiny_weights,
            "--no-progress", check=True)
    run_cli("evaluate", str(m), str(tmp_path / "t.h5"), "--out", str(tmp_path / "e"), check=True)
    ev = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert ev["test"]["n"] == 12 and ev["test"]["accuracy"] > 0.8
    assert (tmp_path / "e" / "misclassified.csv").exists()
    # predict: files and folders, with an unreadable file reported in its row
    (test / "broken.png").write_text("nope")
    r = run_cli("predict", str(m), str(test / "red"), str(test / "broken.png"), "--out", str(tmp_path / "p.csv"),
                check=True)
    pred = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(pred[0])[:3] == ["path", "predicted", "confidence"] and "error" in pred[0]
    assert len(pred) == 5 and sum(1 for p in pred if p["predicted"] == "red") >= 3
    assert [p for p in pred if p["path"].endswith("broken.png")][0]["error"].startswith("not an image")
    # a store from another backbone is refused by evaluate
    import timm
    import torch
    other = tmp_path / "o.pt"
    torch.manual_seed(9)
    torch.save(timm.create_model(TINY, num_classes=0).state_dict(), other)
    run_cli("extract", str(test), "--out", str(tmp_path / "o.h5"), "--backbone", TINY, "--weights", str(other),
            "--no-progress", check=True)
    r = run_cli("evaluate", str(m), str(tmp_path / "o.h5"), "--out", str(tmp_path / "e2"))
    assert r.returncode == 2 and "do not match the model (weights_sha256" in r.stderr


def test_python_api(tmp_path, store):
    from pipeline import load_model
    from pipeline.stages.train import train_head
    p = load_params(_params_file(tmp_path, cv__folds=2, head__epochs=20))
    train_head(stores=[str(store)], out=str(tmp_path / "m"), params=p, progress=lambda s: None)
    m = load_model(tmp_path / "m", device="cpu")
    test = make_images(tmp_path / "t", per_class=2, seed=3)
    pr = m.predict([str(test)])
    assert pr.probs.shape == (6, 3) and np.allclose(pr.probs.sum(1), 1, atol=1e-5)
    conf = pr.probs.max(1)
    cut = float(np.median(conf))  # the images below the median confidence become 'unsure', the others keep a class
    labels = m.predict([str(test)], min_confidence=cut).labels
    assert [lab == "unsure" for lab in labels] == list(conf < cut) and "unsure" in labels
    assert all(lab in m.class_names for lab, c in zip(labels, conf) if c >= cut)


def test_blank_folder_to_predictions_without_dvc(tmp_path, tiny_weights):
    """Issue #24: from an empty folder, `imgsent init` then extract -> train-head -> predict, stores named on the
    command line, no 'paths:' section anywhere."""
    work = tmp_path / "blank"
    work.mkdir()
    run_cli("init", cwd=work, check=True)
    assert not re.search(r"^paths:", (work / "params.yaml").read_text(), re.M)
    make_images(work / "photos", per_class=6)
    run_cli("extract", "photos", "--out", "s.h5", "--backbone", TINY, "--weights", tiny_weights, "--no-progress",
            cwd=work, check=True)
    r = run_cli("train-head", "s.h5", "--out", "model", cwd=work, check=True)
    assert "3-fold CV on 18 images" in r.stdout
    run_cli("predict", "model", "photos", "--out", "p.csv", "--no-progress", cwd=work, check=True)
    assert len((work / "p.csv").read_text().splitlines()) == 1 + 18
    # the model records its params without a 'paths' section, and the report reads them back (it failed with
    # "model.json params: section 'paths' must be a mapping" when the params had none)
    assert "paths" not in json.loads((work / "model" / "model.json").read_text())["params"]
    run_cli("report", "model", "--out", "report", cwd=work, check=True)
    assert (work / "report" / "index.html").exists()
    meta = json.loads((work / "model" / "model.json").read_text())  # as earlier versions wrote it: paths null
    meta["params"]["paths"] = None
    (work / "model" / "model.json").write_text(json.dumps(meta))
    run_cli("report", "model", "--out", "report", cwd=work, check=True)
    again = run_cli("init", cwd=work)
    assert again.returncode == 2 and "params.yaml exists" in again.stderr
    r = run_cli("train-head", "--out", "m2", cwd=work)  # no stores named and no paths: one line saying so
    assert r.returncode == 2 and "no 'paths' section" in r.stderr


def test_init_template_holds_the_repository_settings(tmp_path):
    from pipeline.stages.init import write_params
    mine = load_params(str(write_params(str(tmp_path))))
    repo = load_params(str(ROOT / "params.yaml"))
    assert mine.paths is None and dataclasses.replace(repo, paths=None) == mine


def test_import_imgsent_gives_the_api_without_importing_torch():
    import subprocess
    import sys
    code = ("import sys, imgsent; assert 'torch' not in sys.modules; "
            "assert callable(imgsent.load_params) and callable(imgsent.train_head) and callable(imgsent.extract); "
            "assert imgsent.load_model.__module__ == 'pipeline.inference.predict'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_params_as_dvc_exp_rewrites_them_mean_the_same():
    """`dvc exp run -S ...` round-trips params.yaml through ruamel: `faces: "off"` loses its quotes (YAML 1.1's
    boolean false to PyYAML) and flow lists become block lists. imgsent must read the same settings."""
    text = re.sub(r"faces: \S+", 'faces: "off"', (ROOT / "params.yaml").read_text(), count=1)
    rewritten = re.sub(r'faces: "off"', "faces: off", text)
    rewritten = re.sub(r"backbones: \[([^\]]+)\]( *#.*)?",
                       lambda m: "backbones:" + (m.group(2) or "") + "".join(f"\n  - {b.strip()}"
                                                                           for b in m.group(1).split(",")),
                       rewritten)
    assert "backbones:\n" in rewritten or "backbones:  " in rewritten
    assert rewritten != text and "faces: off" in rewritten
    a = parse_params(yaml.safe_load(text))
    b = parse_params(yaml.safe_load(rewritten))
    assert a == b and b.extract.faces == "off"


def test_evaluate_on_a_subset_of_the_classes_averages_over_those_present(tmp_path, store, tiny_weights):
    """Issue #25: a held-out store without some class used to average that class in as F1 0."""
    from pipeline.stages.evaluate import evaluate
    from pipeline.stages.train import train_head
    train_head(stores=[str(store)], out=str(tmp_path / "m"), params=load_params(str(ROOT / "params.yaml")),
               progress=lambda s: None)
    part = make_images(tmp_path / "part", per_class=3, seed=5)
    import shutil
    shutil.rmtree(part / "red")
    extract_args = ["extract", str(part), "--out", str(tmp_path / "part.h5"), "--backbone", TINY, "--weights",
                    tiny_weights, "--no-progress"]
    r = run_cli(*extract_args, "--classes", "blue,green,red", check=True)
    assert "--classes red: no image carries it, so it is no class of the store" in r.stdout + r.stderr
    lines = []
    m = evaluate(model_dir=str(tmp_path / "m"), stores=[str(tmp_path / "part.h5")], out=str(tmp_path / "ev"),
                 progress=lines.append)
    t = m["test"]
    assert t["classes_absent"] == ["red"]
    present = [m["per_class"][c]["f1"] for c in ("blue", "green")]
    assert t["macro_f1"] == pytest.approx(sum(present) / 2)
    assert t["macro_f1_all_classes"] == pytest.approx(sum(present) / 3)
    assert "over the 2 classes present (red absent; over all 3:" in lines[-1]


def test_a_torchvision_built_for_another_torch_is_one_line_with_the_reinstall(monkeypatch, capsys):
    """Issue #32: a CPU torch beside a CUDA torchvision made every command fail with 'unexpected RuntimeError:
    operator torchvision::nms does not exist (a bug: please report it ...)'."""
    import pipeline.stages.init as init
    from pipeline.cli import main

    def broken(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")
    monkeypatch.setattr(init, "write_params", broken)
    monkeypatch.setattr(sys, "argv", ["imgsent", "init", "somewhere"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "unexpected" not in err
    assert "do not belong together" in err and "pip install --force-reinstall 'torch==" in err


def test_the_torch_pair_message_names_both_builds_and_reinstalls_them_together():
    """Issue #42: with the CPU index unreachable pip took PyPI's torchvision (built for PyPI's torch); the printed
    fix reinstalled torchvision alone, the same wheel, and failed again."""
    from features.errors import torch_pair_message
    msg = torch_pair_message("2.14.1+cpu", "0.29.1")
    assert msg.startswith("torch 2.14.1+cpu and torchvision 0.29.1 do not belong together: this torch needs "
                          "torchvision 0.29.* built for cpu (+cpu)")
    assert ("pip install --force-reinstall 'torch==2.14.1' 'torchvision==0.29.*' --index-url "
            "https://download.pytorch.org/whl/cpu;") in msg
    assert "both from PyPI instead: pip install --force-reinstall 'torch==2.14.1' 'torchvision==0.29.*' (" in msg
    assert "--no-deps" not in msg and len(msg.splitlines()) == 1
    assert "needs torchvision 0.28.* from PyPI" in torch_pair_message("2.13.0", "0.29.1+cpu")


def test_init_given_a_yaml_name_writes_that_file_not_a_folder(tmp_path):
    """Issue #42: `imgsent init my_params.yaml` made a folder named my_params.yaml."""
    r = run_cli("init", str(tmp_path / "sub" / "my_params.yaml"))
    assert r.returncode == 0 and (tmp_path / "sub" / "my_params.yaml").is_file(), r.stderr
    assert "head:" in (tmp_path / "sub" / "my_params.yaml").read_text()
    r = run_cli("init", str(tmp_path / "sub" / "my_params.yaml"))
    assert r.returncode == 2 and "exists; edit it, or pass --force" in r.stderr
    r = run_cli("train-head", "s.h5", "--out", "m", "--params", str(tmp_path / "sub" / "my_params.yaml"))
    assert "is a folder" not in r.stderr and "my_params.yaml" not in r.stderr, r.stderr  # it reads as params


def test_init_creates_its_folder_names_a_file_and_says_what_extract_takes(tmp_path):
    """Issue #32/#33: `init DIR` refused a folder that did not exist yet, and given a file said 'no such folder';
    its template listed two backbones while the command-line path extracts one, without saying so."""
    r = run_cli("init", str(tmp_path / "new" / "project"))
    assert r.returncode == 0 and (tmp_path / "new" / "project" / "params.yaml").is_file()
    text = (tmp_path / "new" / "project" / "params.yaml").read_text()
    assert "On the command line `imgsent extract` takes" in text and "--backbone (default efficientnet_lite0)" in text
    (tmp_path / "afile").write_text("x")
    r = run_cli("init", str(tmp_path / "afile"))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path / 'afile'}: is a file; imgsent init writes " \
                                                     "FOLDER/params.yaml, pass a folder"
    r = run_cli("train-head", "s.h5", "--out", "m", "--params", str(tmp_path / "new" / "project"))
    assert r.returncode == 2 and f"is a folder; pass {tmp_path / 'new' / 'project' / 'params.yaml'}" in r.stderr


def test_every_registered_transform_is_offered_and_nothing_else():
    """Issue #43: the transforms were listed in four places with nothing checking they agree. Params, the init
    template and params.yaml now read pipeline/transforms.REGISTRY; an unknown name is refused by each."""
    from pipeline.heads.adapt import TRANSFORMS, shift_for
    from pipeline.stages.init import TEMPLATE
    from pipeline.transforms import REGISTRY, transform
    line = next(s for s in TEMPLATE.splitlines() if s.strip().startswith("adapt:"))
    assert f"auto | {' | '.join(REGISTRY)}:" in line
    assert line in (ROOT / "params.yaml").read_text(), "params.yaml's adapt comment lists other transforms: " \
        f"copy this line from `imgsent init` into it: {line.strip()}"
    assert set(TRANSFORMS) == set(REGISTRY)
    text = (ROOT / "params.yaml").read_text()
    for name in REGISTRY:
        assert parse_params(yaml.safe_load(text.replace("adapt: auto", f"adapt: {name}")), "p").head.adapt == name
    with pytest.raises(UserError, match="adapt"):
        parse_params(yaml.safe_load(text.replace("adapt: auto", "adapt: sideways")), "p")
    with pytest.raises(ValueError, match=f"unknown adaptation transform 'sideways': one of {', '.join(REGISTRY)}"):
        transform("sideways")
    with pytest.raises(ValueError, match="unknown adaptation transform"):
        shift_for("sideways", 10, np.zeros(3), np.ones(3), None, np.ones(2) / 2)


def test_images_the_model_was_trained_on_are_never_called_held_out(tmp_path, store, tiny_weights):
    """evaluate on the training store printed '18 held-out images: accuracy 1.000'. The model keeps an id of each
    training image (ood.npz `seen`): a store of nothing else is refused in one line; training images among new
    ones are left out of every number and file (before adaptation), and the line, metrics.json and the report
    say how many."""
    import shutil
    pf = _params_file(tmp_path, cv__folds=3, head__epochs=30, cv__repeats=1)
    m = str(tmp_path / "m")
    run_cli("train-head", str(store), "--out", m, "--params", pf, check=True)
    r = run_cli("evaluate", m, str(store), "--out", str(tmp_path / "e0"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and \
        "all 18 labelled images in it are images the model was trained on, so none is held out" in r.stderr, r.stderr
    assert not (tmp_path / "e0").exists()
    test = make_images(tmp_path / "test", per_class=4, seed=1)
    for name in ("red_00.jpg", "red_01.png"):  # two training images, renamed, among 12 new ones
        shutil.copy(tmp_path / "imgs" / "red" / name, test / "red" / f"again_{name}")
    run_cli("extract", str(test), "--out", str(tmp_path / "t.h5"), "--backbone", TINY, "--weights", tiny_weights,
            "--no-progress", check=True)
    r = run_cli("evaluate", m, str(tmp_path / "t.h5"), "--out", str(tmp_path / "e"), check=True)
    assert "12 held-out images (2 images the model was trained on left out): accuracy" in r.stdout, r.stdout
    assert re.search(r"macro-F1 [01]\.\d{3} \(95% CI [01]\.\d{3}-[01]\.\d{3}\)", r.stdout), r.stdout
    ev = json.loads((tmp_path / "e" / "details.json").read_text())
    assert ev["test"]["n"] == 12 and ev["test"]["trained_on_left_out"] == 2
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert len(rows) == 12 and not any("again_" in row["path"] for row in rows)
    run_cli("report", m, str(tmp_path / "t.h5"), "--out", str(tmp_path / "r"), check=True)
    assert "2 images the model was trained on left out" in (tmp_path / "r" / "index.html").read_text()


def test_a_held_out_score_comes_with_its_interval_over_the_images_drawn():
    """evaluate's line printed 'macro-F1 0.617' on 46 images with nothing beside it. bootstrap_ci: the interval
    holds the score, is as wide as the binomial's for accuracy, and with `classes` averages over those only
    (evaluate's macro-F1 when a class is absent from the held-out images)."""
    from pipeline.analysis.metrics import classification_metrics
    from pipeline.analysis.noise import bootstrap_ci
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 46)
    pred = np.where(rng.random(46) < 0.72, y, (y + 1) % 3)  # (46,) about 72% right
    ci = bootstrap_ci(y, pred, 3)
    acc = float((pred == y).mean())
    lo, hi = ci["accuracy"]
    assert lo < acc < hi and abs((hi - lo) - 2 * 1.96 * np.sqrt(acc * (1 - acc) / 46)) < 0.04, ci
    lo, hi = ci["macro_f1"]
    assert lo < classification_metrics(y, pred, ["a", "b", "c"])["macro_f1"] < hi
    y2, p2 = np.where(y == 2, 0, y), np.where(pred == 2, 0, pred)  # class 2 absent and never predicted
    every, present = bootstrap_ci(y2, p2, 3)["macro_f1"], bootstrap_ci(y2, p2, 3, classes=[0, 1])["macro_f1"]
    f1 = classification_metrics(y2, p2, ["a", "b", "c"])["per_class"]
    assert present[0] < (f1["a"]["f1"] + f1["b"]["f1"]) / 2 < present[1] and every[1] < present[0]
