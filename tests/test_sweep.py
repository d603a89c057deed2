"""`imgsent sweep`: each config's CV numbers are exactly what train-head gives for it (same folds, same seeds),
rows are ranked best first, best/ is a normal model directory, and bad grids are refused before any work."""
import csv
import json

import pytest

import pipeline.stages.sweep as sweep_stage
from tests.synthetic import synthetic_store
from pipeline.inference.modeldir import load_model_dir
from pipeline.stages.train import train_head
from tests.conftest import ROOT, params, run_cli


@pytest.fixture
def store(tmp_path):
    return synthetic_store(tmp_path / "s.h5", n=1200, dim=24, classes=4, separation=0.25)


def _params_file(tmp_path, text_replacements):
    text = (ROOT / "params.yaml").read_text()
    for a, b in text_replacements:
        assert a in text
        text = text.replace(a, b)
    p = tmp_path / "params.yaml"
    p.write_text(text)
    return p


def test_sweep_ranks_configs_exactly_as_train_head_scores_them(tmp_path, store):
    pf = _params_file(tmp_path, [("epochs: 60", "epochs: 15"), ("min_val_images: 200", "min_val_images: 50")])
    r = run_cli("sweep", store, "--out", str(tmp_path / "sw"), "--params", str(pf), "--no-progress",
                "--grid", "head.hidden=[],[16]", "--grid", "head.lr=0.001,0.01", check=True)
    assert "4 configs x 3 folds" in r.stdout and "/best" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [int(x["rank"]) for x in rows] == [1, 2, 3, 4]
    f1 = [float(x["macro_f1_mean"]) for x in rows]
    assert f1 == sorted(f1, reverse=True)
    assert {(x["head.hidden"], x["head.lr"]) for x in rows} == {("[]", "0.001"), ("[]", "0.01"), ("[16]", "0.001"),
                                                              ("[16]", "0.01")}
    for x in rows:  # each config on its own through train-head: the same numbers
        hidden = json.loads(x["head.hidden"])
        m = train_head(stores=[store], out=str(tmp_path / f"m{x['rank']}"), progress=lambda s: None,
                       params=params(head={"hidden": hidden, "lr": float(x["head.lr"]), "epochs": 15,
                                           "min_val_images": 50}))
        assert m["cv"]["macro_f1_mean"] == pytest.approx(float(x["macro_f1_mean"]), abs=1e-4)
        assert m["cv"]["accuracy_std"] == pytest.approx(float(x["accuracy_std"]), abs=1e-4)
    head, info = load_model_dir(tmp_path / "sw" / "best")  # best/ is a model directory predict etc. accept
    best = json.loads((tmp_path / "sw" / "best" / "metrics.json").read_text())
    assert best["cv"]["macro_f1_mean"] == pytest.approx(float([x for x in rows if x["chosen"] == "1"][0]
                                                                ["macro_f1_mean"]), abs=1e-4)
    chosen = [x for x in rows if x["chosen"] == "1"]
    assert len(chosen) == 1 and list(info.hidden) == json.loads(chosen[0]["head.hidden"])
    # a second sweep replaces its own folder
    run_cli("sweep", store, "--out", str(tmp_path / "sw"), "--params", str(pf), "--no-progress",
            "--grid", "head.dropout=0.1,0.2", check=True)
    assert len(list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))) == 2


def test_sweep_and_train_head_choose_the_same_head_on_a_tie(tmp_path):
    """Issue #43: sweep kept the highest mean (on equal means the first in the grid), train-head kept [256] unless
    [] won beyond the noise: on the same folds they chose differently. Planted: classes so far apart that both
    heads score 1.000 on every fold, and the grid lists [] first."""
    store = synthetic_store(tmp_path / "s.h5", n=240, dim=16, classes=3, separation=3.0)
    pf = _params_file(tmp_path, [("epochs: 60", "epochs: 10"), ("repeats: 3 ", "repeats: 1 ")])
    r = run_cli("sweep", store, "--out", str(tmp_path / "sw"), "--params", str(pf), "--no-progress",
                "--grid", "head.hidden=[],[256]", check=True)
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [float(x["macro_f1_mean"]) for x in rows] == [1.0, 1.0]
    chosen = [json.loads(x["head.hidden"]) for x in rows if x["chosen"] == "1"]
    m = train_head(stores=[store], out=str(tmp_path / "m"), progress=lambda s: None,
                   params=params(head={"hidden": "auto", "epochs": 10}, cv={"repeats": 1}))
    assert chosen == [m["head_choice"]["chosen"]] == [[256]], (chosen, m["head_choice"])
    assert "a tie: head.hidden=[256] and head.hidden=[] scored the same (1.000)" in r.stdout, r.stdout
    assert list(load_model_dir(tmp_path / "sw" / "best")[1].hidden) == [256]


def test_sweep_keeps_the_preferred_head_when_the_other_leads_inside_the_noise(tmp_path, monkeypatch, store):
    """Issue #43, the planted near-tie: [] ahead of [256] by 0.007 on the mean, inside the fold-to-fold noise. The
    highest mean is [], the rule train-head applies (prefer) keeps [256], and sweep must do the same."""
    import pipeline.stages.sweep as sweep_stage
    from pipeline.selection.rules import prefer
    planted = {(): [0.81, 0.80, 0.82], (16,): [0.80, 0.81, 0.80]}
    real = sweep_stage.choose_head

    def choose(rows, fold, p, *args, **kw):
        choice = real(rows, fold, p, *args, **kw)
        for f, v in zip(choice.cv.per_fold[choice.transform], planted[tuple(choice.params.head.hidden)]):
            f["macro_f1"] = v
        return choice
    monkeypatch.setattr(sweep_stage, "choose_head", choose)
    import pipeline.selection.rules as rules  # the planted scores are per fold; the worst source (a tie-break,
    monkeypatch.setattr(rules, "worst_source", lambda *a, **k: None)  # tests/test_selection.py) would read the
    # real predictions, which the planting does not change
    monkeypatch.setattr(sweep_stage, "AUTO_CANDIDATES", ((16,), ()))  # the preference order hidden: auto keeps
    assert prefer([("[16]", planted[(16,)]), ("[]", planted[()])])[0] == "[16]"  # train-head's verdict
    lines = []
    results = sweep_stage.sweep(stores=[store], out=str(tmp_path / "sw"), grid=["head.hidden=[],[16]"], bar=False,
                                params=params(head={"epochs": 5, "adapt": "none"}, cv={"repeats": 1}),
                                progress=lines.append)
    assert results[0]["head.hidden"] == []  # the highest mean...
    rows = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert [x["head.hidden"] for x in rows if x["chosen"] == "1"] == ["[16]"]  # ...is not the one kept
    assert list(load_model_dir(tmp_path / "sw" / "best")[1].hidden) == [16]
    assert "a tie: head.hidden=[] was ahead of head.hidden=[16] by 0.007, within the noise" in lines[-1], lines


def test_a_config_clearly_behind_the_best_so_far_stops_its_cv_and_says_so(tmp_path, store):
    """Planted: lr 1e-6 leaves the [16] head near chance, far behind lr 0.01 on every fold. Its 5-fold CV stops
    once the gap is beyond the noise at 99% (crossval.behind: after 3 folds here), it cannot be chosen, and
    sweep.csv and the summary line say so; the config ahead runs every fold."""
    lines = []
    sweep_stage.sweep(stores=[store], out=str(tmp_path / "sw"), grid=["head.lr=0.01,0.000001"], bar=False,
                      params=params(head={"hidden": (16,), "epochs": 10, "adapt": "none"},
                                    cv={"folds": 5, "repeats": 1}), progress=lines.append)
    good, bad = list(csv.DictReader(open(tmp_path / "sw" / "sweep.csv")))
    assert (good["head.lr"], good["folds"], good["stopped"], good["chosen"]) == ("0.01", "5", "", "1")
    assert bad["head.lr"] == "1e-06" and int(bad["folds"]) < 5 and bad["chosen"] == "0"
    assert bad["stopped"].startswith(f"its CV stopped after {bad['folds']} of 5 folds, head.lr=0.01 ahead by "), bad
    assert float(good["macro_f1_mean"]) > float(bad["macro_f1_mean"]) + 0.2
    assert "1 config stopped early, clearly behind the best so far" in lines[-1], lines


def test_the_linear_head_runs_first_and_stops_a_preferred_config_clearly_behind_it(tmp_path, store, monkeypatch):
    """Configs run fewest hidden layers first, as choose_head runs its candidates: the linear head's CV is cheap,
    and as the best so far it stops a clearly worse config's CV early, even one preferred on a tie. Planted: lr
    1e-6 leaves the [16] head near chance (the linear head, fitted by L-BFGS, has no lr), and [16] comes first in
    preference order. It used to run first, every fold, with nothing ahead of it to stop it."""
    monkeypatch.setattr(sweep_stage, "AUTO_CANDIDATES", ((16,), ()))  # [16] preferred on a tie
    rows = sweep_stage.sweep(stores=[store], out=str(tmp_path / "sw"), grid=["head.hidden=[16],[]"], bar=False,
                             params=params(head={"lr": 1e-6, "epochs": 10, "adapt": "none"},
                                           cv={"folds": 5, "repeats": 1}), progress=lambda s: None)
    linear, mlp = rows
    assert (linear["head.hidden"], linear["folds"], linear["stopped"]) == ([], 5, "")
    assert mlp["head.hidden"] == [16] and mlp["folds"] < 5 and mlp["stopped"].startswith("its CV stopped after")
    assert list(load_model_dir(tmp_path / "sw" / "best")[1].hidden) == []


def test_a_sweep_gives_the_same_rows_and_choice_on_any_number_of_workers(tmp_path, store, monkeypatch):
    """sweep queues the next config's folds behind those of the config it reads, on one FoldPool: on 3 workers
    they run while the config before them is read, on 1 each runs in the reader's thread when read, one config
    after another. Either way each config is read against the best so far once the one before it is done: the
    same rows, the same stops (lr 1e-6 is clearly behind) and the same choice."""
    from pipeline.selection import foldwork
    out = {}
    for n in (1, 3):
        monkeypatch.setattr(foldwork, "workers_for", lambda rows, params, n=n: n)
        rows = sweep_stage.sweep(stores=[store], out=str(tmp_path / f"sw{n}"), bar=False, progress=lambda s: None,
                                 grid=["head.lr=0.01,0.000001,0.003"],
                                 params=params(head={"hidden": (16,), "epochs": 10, "adapt": "affine"},
                                               cv={"folds": 5, "repeats": 1}))
        out[n] = [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
        out[n].append((tmp_path / f"sw{n}" / "best" / "head.npz").read_bytes())
    assert out[1] == out[3]
    assert out[1][-2]["head.lr"] == 1e-06 and out[1][-2]["stopped"], out[1]


@pytest.mark.parametrize("grid, message", [
    (["cv.folds=2,3"], "only head keys can be swept"),
    (["head.nope=1,2"], "only head keys can be swept"),
    (["head.lr"], "expected head.KEY=V1,V2"),
    (["head.lr=fast"], "head.lr='fast': expected float"),
    (["head.dropout=0.1,0.99"], "head.dropout=0.99: out of range"),
    (["head.hidden=[0]"], "every size must be in"),
    (["head.lr=0.1", "head.lr=0.2"], "given twice"),
    (["head.lr=0.001,0.003,1e-3"], "head.lr: 0.001 and \"1e-3\" are the same value"),
    (["head.epochs=5,6,5"], "head.epochs: 5 and 5 are the same value"),
    (["head.hidden=[],[256],[ 256 ]"], "head.hidden: [256] and [256] are the same value"),
    ([f"head.{k}={','.join(str(i + 1) for i in range(11))}" for k in ("epochs", "patience", "min_val_images")],
     "1331 combinations; at most 1000"),
])
def test_bad_grids_are_refused_before_any_work(tmp_path, store, grid, message):
    args = [a for g in grid for a in ("--grid", g)]
    r = run_cli("sweep", store, "--out", str(tmp_path / "sw"), "--params", str(ROOT / "params.yaml"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "sw").exists()


def test_sweep_never_replaces_a_users_folder(tmp_path, store):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    r = run_cli("sweep", store, "--out", str(d), "--params", str(ROOT / "params.yaml"), "--grid", "head.lr=0.1")
    assert r.returncode == 2 and "notes.txt" not in r.stdout and (d / "notes.txt").read_text() == "keep me"


def test_a_config_whose_fits_the_epochs_cap_cut_short_says_so(tmp_path, store):
    """sweep.csv's `capped`: the CV fits of a config that ran all head.epochs before their stop rule decided (as
    train-head's note counts them); the summary line counts such configs."""
    pf = _params_file(tmp_path, [("repeats: 3", "repeats: 1")])
    r = run_cli("sweep", store, "--out", str(tmp_path / "sw"), "--params", str(pf), "--no-progress",
                "--grid", "head.hidden=[]", "--grid", "head.epochs=1,200", check=True)
    rows = {x["head.epochs"]: x for x in csv.DictReader(open(tmp_path / "sw" / "sweep.csv"))}
    assert (rows["1"]["capped"], rows["200"]["capped"]) == (rows["1"]["folds"], "0"), rows
    assert "1 config with fits head.epochs cut short before their stop rule decided (sweep.csv: capped)" in r.stdout
