"""The heads' numerics against references: LinearHead is the logistic regression scikit-learn fits, streamed or
not; the stateless loss's gradient is its derivative; our L-BFGS, Adam, temperature and metrics agree with their
textbook / library versions; `hidden: auto` keeps the better head."""
import json
import re

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_recall_fscore_support

from tests.synthetic import synthetic_store
from pipeline.heads.head import softmax
from pipeline.inference.calibration import fit_temperature
from pipeline.heads.common import standardise
from pipeline.heads.fitting import split_validation
from pipeline.heads.lbfgs import lbfgs, wolfe
from pipeline.heads.linear import LinearHead
from pipeline.heads.loss import linear_loss_gradient
from pipeline.heads.mlp import Adam, MLPHead
from pipeline.analysis.metrics import classification_metrics
from pipeline.data.rows import open_rows
from pipeline.stages.train import train_head
from tests.conftest import ROOT, params


def test_linear_head_is_the_logistic_regression_sklearn_fits(tmp_path):
    """No early-stopping slice, no class weights: our full-batch L-BFGS and scikit-learn's minimise the same
    objective (mean cross-entropy + wd/2 |W|^2 = sklearn's with C = 1 / (wd N)), so the probabilities agree."""
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=1500, dim=40, classes=4, separation=0.3)])
    head = LinearHead(n_classes=4, weight_decay=0.01, max_iter=500, class_weight="none")
    ours = head.fit(rows.features, rows.labels).predict_proba(rows.features)
    assert head.coef_.shape == (4, 40) and head.intercept_.shape == (4,) and head.n_iter_ > 0
    x = (rows.features - rows.features.mean(0)) / rows.features.std(0)
    lr = LogisticRegression(C=1 / (0.01 * len(x)), tol=1e-8, max_iter=5000).fit(x, rows.labels)
    assert np.abs(ours - lr.predict_proba(x)).max() < 2e-3


def test_linear_head_streamed_equals_in_memory_and_beats_chance(tmp_path):
    store = synthetic_store(tmp_path / "s.h5", n=6000, dim=48, classes=5, separation=0.2, groups=6)
    head = {"hidden": [], "min_val_images": 100}
    quiet = lambda s: None  # noqa: E731
    mem, st = (train_head(stores=[store], out=str(tmp_path / name), progress=quiet,
                          params=params(head=head, cv={"folds": 3, "memory_budget_mb": mb}))
               for name, mb in (("mem", 1000), ("st", 1)))
    assert mem["mode"] == "in-memory" and st["mode"] == "streamed"
    assert abs(mem["cv"]["macro_f1_mean"] - st["cv"]["macro_f1_mean"]) < 0.01
    assert mem["cv"]["macro_f1_mean"] > 0.6  # chance = 0.2


def test_linear_head_early_stopping_keeps_the_best_validation_point(tmp_path):
    """Few rows, many dimensions: training loss keeps falling while validation loss turns; the head returned
    is no worse on the validation slice than the fully converged one."""
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=600, dim=300, classes=3, separation=0.15)])
    train = np.ones(len(rows), bool)
    base = {"hidden": [], "weight_decay": 0.0, "min_val_images": 50, "val_fraction": 0.25, "class_weight": "none"}
    fit, val = split_validation(labels=rows.labels, train=train, params=params(head=base).head, random_state=0)
    x, y = rows.features, rows.labels
    yv = torch.from_numpy(y[val])

    def val_loss(early_stop: bool, max_iter: int = 60):
        h = LinearHead(n_classes=3, weight_decay=0.0, max_iter=max_iter, class_weight="none")
        h.fit(x[fit], y[fit], val=(x[val], y[val]) if early_stop else None)
        return float(torch.nn.functional.cross_entropy(torch.from_numpy(h.head_.logits(x[val])), yv))

    early, converged = val_loss(True), val_loss(False, max_iter=1000)
    assert early < converged - 0.05, (early, converged)


def test_lbfgs_finds_the_minimum_of_rosenbrock():
    def f(x):
        v = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        return float(v), np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])

    x, iterations = lbfgs(f, np.array([-1.2, 1.0]), max_iter=500, gtol=1e-6, ftol=0.0)
    assert np.allclose(x, [1.0, 1.0], atol=1e-3) and 10 < iterations < 500, (x, iterations)


def test_our_adam_matches_torch_adam():
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_(True) for p in a]
    ours, ref = Adam(a, lr=0.01, weight_decay=0.1), torch.optim.Adam(b, lr=0.01, weight_decay=0.1)
    for step in range(20):
        for ps, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            loss = (ps[0].sum(1) * ps[1].sin().sum() - step).pow(2).sum()
            loss.backward()
            opt.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t_true", [0.3, 1.0, 4.0])
def test_temperature_recovers_a_planted_temperature(t_true):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 6)) * 3
    p = softmax(z, t_true)
    y = (p.cumsum(1) < rng.random((len(z), 1))).sum(1)  # a label drawn from each row's softmax(z / T)
    assert abs(fit_temperature(z, y) / t_true - 1) < 0.05


def test_metrics_equal_sklearns():
    rng = np.random.default_rng(0)
    for _ in range(100):
        c, n = int(rng.integers(2, 8)), int(rng.integers(1, 40))
        y, pred = rng.integers(0, c, n), rng.integers(0, c, n)
        m = classification_metrics(y, pred, [str(i) for i in range(c)])
        assert m["macro_f1"] == pytest.approx(f1_score(y, pred, labels=range(c), average="macro", zero_division=0))
        pr, rc, f, s = precision_recall_fscore_support(y, pred, labels=range(c), zero_division=0)
        assert np.allclose([m["per_class"][str(i)]["precision"] for i in range(c)], pr)
        assert np.allclose([m["per_class"][str(i)]["recall"] for i in range(c)], rc)
        assert m["accuracy"] == pytest.approx((y == pred).mean())


def test_linear_train_head_never_imports_torch(tmp_path):
    """The linear head is numpy from fit to head.npz: train-head with hidden: [] pays nothing for torch's import
    (1.7 s, half of a 100-class run); the model it writes loads and predicts without torch too."""
    import subprocess
    import sys
    store = synthetic_store(tmp_path / "s.h5", n=300, dim=16, classes=3, separation=0.5)
    code = (
        "import sys, dataclasses\n"
        "from pipeline.params import load_params\n"
        "from pipeline.stages.train import train_head\n"
        "from pipeline.inference.modeldir import load_model_dir\n"
        "import numpy as np\n"
        f"p = load_params({str(ROOT / 'params.yaml')!r})\n"
        "p = dataclasses.replace(p, head=dataclasses.replace(p.head, hidden=()))\n"
        f"train_head(stores=[{store!r}], out={str(tmp_path / 'm')!r}, params=p, progress=lambda s: None)\n"
        f"head, info = load_model_dir({str(tmp_path / 'm')!r})\n"
        "assert head(np.zeros((2, 16), np.float32)).shape == (2, 3)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_slice_when_a_class_would_put_too_few_images_in_it():
    """100 classes x 80 images: a 10% slice holds 800 images (over min_val_images) but 8 a class, fewer than
    min_val_per_class: no slice, every image trains. 7 classes x 4000: the slice is carved, stratified."""
    p = params().head
    assert p.min_val_per_class == 20 and p.min_val_images == 200
    few = np.repeat(np.arange(100), 80)
    fit, val = split_validation(labels=few, train=np.ones(len(few), bool), params=p, random_state=0)
    assert fit.all() and not val.any()
    many = np.repeat(np.arange(7), 4000)
    fit, val = split_validation(labels=many, train=np.ones(len(many), bool), params=p, random_state=0)
    assert val.sum() == 2800 and (np.bincount(many[val]) == 400).all() and not (fit & val).any()


def test_mlp_without_a_slice_stops_once_its_training_loss_converges(tmp_path, monkeypatch):
    """No validation slice: the hidden-layer head stops when its mean training loss improves by less than `tol`
    over `patience` checks, long before a huge `epochs` budget."""
    import pipeline.heads.mlp as mlp
    epochs = []
    real = mlp._epoch
    monkeypatch.setattr(mlp, "_epoch", lambda *a, **k: (epochs.append(1), real(*a, **k))[1])
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=400, dim=16, classes=3, separation=0.5)])
    head = MLPHead(n_classes=3, hidden=(32,), epochs=100000).fit(rows.features, rows.labels)
    assert 3 < len(epochs) < 2000, len(epochs)
    assert (head.predict_proba(rows.features).argmax(1) == rows.labels).mean() > 0.6  # chance: 0.33


def test_a_fit_the_epochs_cap_stopped_says_so_and_train_head_notes_it(tmp_path):
    """Both estimators flag a fit that ran every epoch (L-BFGS iteration) head.epochs allows before its stop rule
    decided (scikit-learn warns the same); train-head counts the chosen head's in details.json and says it on
    stderr. A fit its rule stopped is not flagged."""
    import subprocess
    import sys
    import yaml
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=400, dim=16, classes=3, separation=0.5)])
    x, y = rows.features, rows.labels
    assert MLPHead(n_classes=3, hidden=(32,), epochs=2).fit(x, y).head_.capped
    assert not MLPHead(n_classes=3, hidden=(32,), epochs=100000).fit(x, y).head_.capped
    assert LinearHead(n_classes=3, max_iter=2).fit(x, y).head_.capped
    assert not LinearHead(n_classes=3, max_iter=1000).fit(x, y).head_.capped
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for epochs, hidden, cut in ((1, [], True), (2, [32], True), (60, [], False), (600, [32], False)):
        raw["head"] |= {"epochs": epochs, "hidden": hidden}
        raw["cv"] |= {"repeats": 1}
        (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
        out = tmp_path / f"m{epochs}{hidden}"
        r = subprocess.run([sys.executable, "-c", "from pipeline.cli import main; main()", "train-head",
                            str(tmp_path / "s.h5"), "--out", str(out), "--params", str(tmp_path / "p.yaml")],
                           capture_output=True, text=True, cwd=ROOT)
        choice = json.loads((out / "details.json").read_text())["head_choice"]
        said = f"3 of 3 CV fits and the final fit ran all head.epochs ({epochs}) before early stopping"
        assert (said in r.stderr) == cut == (said in choice.get("capped", "")), (epochs, r.stderr)
    # hidden: auto: the candidate that lost is flagged too (its score is of a capped fit: the choice may rest on it)
    from pipeline.stages.train import notes
    for epochs, cut in ((1, True), (600, False)):
        m = train_head(stores=[str(tmp_path / "s.h5")], out=str(tmp_path / f"auto{epochs}"), progress=lambda _: None,
                       params=params(head={"epochs": epochs, "hidden": "auto"}, cv={"repeats": 1}))
        lost = "[]" if m["head_choice"]["chosen"] == [256] else "[256]"
        said = re.compile(re.escape(lost) + rf" lost with (\d) of its \1 CV fits cut short by head.epochs \({epochs}\) "
                          "before its stop rule decided")  # its CV may have stopped early, clearly behind
        assert cut == bool(said.search(m["head_choice"].get("capped_rivals", ""))) == \
            any(said.search(n) for n in notes(m)), m["head_choice"]


def test_predictions_csv_is_what_csv_writer_writes(tmp_path):
    """write_predictions formats its numbers in blocks; the file must read back as csv.writer's would, odd path
    names (commas, quotes, line breaks, non-ASCII) and class names included."""
    import csv
    from pipeline.analysis.metrics import write_predictions
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 5000).astype(np.float32)
    names = ["a", "b,c", 'd"e', "ü"]
    paths = [f"img/{i}.png" for i in range(5000)]
    paths[1], paths[4097] = 'we,ird "x"\nname.png', "ünï cödé.jpg"
    labels = [names[i % 4] for i in range(5000)]
    sources = ["s,1", 's"2', "s3"]  # repeated values, formatted once each (metrics._fields)
    write_predictions(tmp_path / "p.csv", paths=paths, labels=labels, probs=probs, class_names=names,
                      extra={"fold": [i % 3 for i in range(5000)], "source": [sources[i % 3] for i in range(5000)]})
    write_predictions(tmp_path / "a.csv", paths=paths, labels=labels, probs=probs, class_names=names,  # as arrays
                      extra={"fold": np.arange(5000) % 3, "source": np.array(sources)[np.arange(5000) % 3]})
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "p.csv").read_bytes()
    with open(tmp_path / "ref.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "predicted", "confidence", "fold", "source"] + [f"p_{c}" for c in names])
        for i in range(5000):
            w.writerow([paths[i], labels[i], names[probs[i].argmax()], f"{probs[i].max():.6f}", i % 3, sources[i % 3]]
                       + [f"{v:.6f}" for v in probs[i]])
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    back = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert back[1]["path"] == paths[1] and back[4097]["p_b,c"] == f"{probs[4097][1]:.6f}"


def test_fixed_6_spells_numbers_as_percent_format():
    """fixed_6 builds '%.6f' text in numpy: it must give the same characters for float32 and float64, values
    0 and 1, exact and near rounding ties (x.xxxxxx5), and fall back for values outside [0, 1] or not finite."""
    from pipeline.analysis.metrics import fixed_6
    rng = np.random.default_rng(1)
    ties = (rng.integers(0, 10 ** 6, 300) + 0.5) / 1e6  # float64 near-ties, the hard case for rounding
    for p in (rng.dirichlet(np.ones(50), 400).astype(np.float32), rng.dirichlet(np.ones(50), 400),
              ties.reshape(30, 10), np.float32([[0.0, 1.0, 0.5e-6, 1.5e-6, 2.5e-6]]),
              np.array([[0.25, np.nan, -0.0], [1.5, -1e-9, np.inf], [1e-7, 5e-7, 0.9999995]])):
        assert fixed_6(p) == [",".join(f"{v:.6f}" for v in row) for row in p], p.dtype
    assert fixed_6(np.zeros((0, 3))) == [] and fixed_6(np.zeros((2, 0))) == ["", ""]


def test_wolfe_step_extrapolates_to_a_far_minimum_and_meets_both_conditions():
    """f(t) = (t - 100)^2 from t = 0: backtracking from t = 1 would stop at 1; the strong-Wolfe search goes out
    and returns a step with sufficient decrease and a flat enough slope."""
    phi = lambda t: ((t - 100.0) ** 2, 2 * (t - 100.0))  # noqa: E731
    f0, g0 = phi(0.0)
    t = wolfe(phi, f0, g0)
    f, g = phi(t)
    assert f <= f0 + 1e-3 * t * g0 and abs(g) <= 0.9 * abs(g0) and 10 < t < 190, t
    assert wolfe(lambda t: (1.0 + t, 1.0), 1.0, -1.0) == 0.0  # the loss rises everywhere: no step


def test_linear_gradient_is_the_derivative_of_its_loss():
    """The stateless objective: its gradient against central differences, with class weights and l2."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)).astype(np.float32), rng.integers(0, 3, 50)
    w = rng.uniform(0.5, 2, 50).astype(np.float32)
    coef = rng.normal(size=3 * 7) * 0.3
    blocks = [x[:20], x[20:]]  # two blocks: the sum over blocks is the whole
    loss, grad = linear_loss_gradient(coef, blocks, y, w, 0.1, 3)
    assert abs(loss - linear_loss_gradient(coef, [x], y, w, 0.1, 3)[0]) < 1e-9
    eps = 1e-3
    for i in rng.choice(len(coef), 8, replace=False):
        e = np.zeros_like(coef)
        e[i] = eps
        numeric = (linear_loss_gradient(coef + e, blocks, y, w, 0.1, 3)[0] -
                   linear_loss_gradient(coef - e, blocks, y, w, 0.1, 3)[0]) / (2 * eps)
        assert abs(numeric - grad[i]) < 1e-3, (i, numeric, grad[i])


def test_streamed_blocks_standardise_and_fit_as_the_array_does():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(900, 8)) * [1, 5, 0.01, 1, 1, 1, 1, 30] + 3).astype(np.float32)
    y = (x[:, 0] > 3).astype(int) + (x[:, 1] > 3)
    (a,), mean_a, scale_a = standardise(x)
    b, mean_b, scale_b = standardise([x[:300], x[300:700], x[700:]])
    assert np.allclose(mean_a, mean_b, atol=1e-5) and np.allclose(scale_a, scale_b, rtol=1e-5)
    assert np.allclose(np.concatenate(list(b)), a, atol=1e-4)
    one = LinearHead(n_classes=3).fit(x, y)
    three = LinearHead(n_classes=3).fit([x[:300], x[300:700], x[700:]], y)
    assert np.allclose(one.predict_proba(x), three.predict_proba(x), atol=1e-4)


def test_the_training_loss_checked_is_a_mean_per_row_not_per_batch():
    """133 rows are mini-batches of 128 and 5: the check must weigh the 5 rows' loss as 5 rows, not as a batch
    (a mean of the two batch losses stopped heads at 0.66-0.88 training accuracy when the stop was relative)."""
    from pipeline.heads.mlp import SeenLoss
    seen = SeenLoss()
    seen.add(0.1, 128)
    seen.add(3.0, 5)
    assert seen.take() == pytest.approx((0.1 * 128 + 3.0 * 5) / 133)
    seen.add(0.2, 7)  # taken: it starts again
    assert seen.take() == pytest.approx(0.2)


def test_mlp_on_a_few_rows_fits_its_training_rows():
    """On 133 rows (batches of 128 and 5) the head is not stopped by the noise of its checks before it fits the
    rows it trains on (one of them may be left at the 60-epoch cap, as a seed's initial weights decide)."""
    accuracy = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        centres = rng.normal(size=(7, 256))
        y = rng.choice(7, 133, p=[.35, .1, .1, .1, .1, .1, .15])
        x = (0.1 * centres[y] + rng.normal(size=(133, 256))).astype(np.float32)  # (133, 256)
        head = MLPHead(n_classes=7, hidden=(256,), random_state=seed).fit(x, y)
        accuracy.append(float((head.predict_proba(x).argmax(1) == y).mean()))
    assert min(accuracy) >= 0.99, accuracy


@pytest.mark.parametrize("Head", [LinearHead, MLPHead])
def test_integer_sample_weights_equal_repeated_rows(Head):
    """sample_weight=2 on a row is that row twice (the loss is a weighted mean), for both estimators' objective;
    checked exactly for the full-batch linear head and in outcome for the MLP."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=300) > 0).astype(int)
    w = rng.integers(1, 3, 300)
    kw = {"class_weight": "none"} if Head is LinearHead else {"class_weight": "none", "hidden": (8,), "epochs": 30,
                                                              "lr": 0.01}  # a head that learns: not two near chance
    a = Head(n_classes=2, **kw).fit(x, y, sample_weight=w)
    b = Head(n_classes=2, **kw).fit(np.repeat(x, w, 0), np.repeat(y, w))
    if Head is LinearHead:  # same objective up to the standardisation (weighted vs repeated rows' statistics)
        assert (a.predict_proba(x).argmax(1) == b.predict_proba(x).argmax(1)).mean() > 0.97
    unweighted = Head(n_classes=2, **kw).fit(x, y)
    heavy = w == 2
    assert (a.predict_proba(x[heavy]).argmax(1) == y[heavy]).mean() >= \
        (unweighted.predict_proba(x[heavy]).argmax(1) == y[heavy]).mean() - 0.02


def test_hidden_auto_keeps_the_preferred_head_unless_the_other_wins_beyond_the_noise(tmp_path):
    """`hidden: auto` cross-validates [256] and [] on the same folds and keeps [256] unless [] beats it by more than
    the noise of their per-fold differences (issue #31: a tie decided by noise chose the head that
    generalised worse); the model, its CV score, metrics.json and the printed line agree with that rule."""
    from pipeline.analysis.noise import paired_difference
    from pipeline.inference.modeldir import load_model_dir
    store = synthetic_store(tmp_path / "s.h5", n=1500, dim=32, classes=20, separation=0.35)
    lines = []
    m = train_head(stores=[store], out=str(tmp_path / "m"), progress=lines.append,
                   params=params(head={"hidden": "auto", "epochs": 20, "adapt": "none"}, cv={"folds": 3}))
    folds = m["head_choice"]["cv_macro_f1_per_fold"]
    diff, noise = paired_difference(folds["[]"], folds["[256]"])
    want = "[]" if diff > noise else "[256]"  # both ways of the rule are in test_prefer_...
    assert m["head_choice"]["chosen"] == json.loads(want)
    assert abs(m["cv"]["macro_f1_mean"] - np.mean(folds[want])) < 1e-4
    head, info = load_model_dir(tmp_path / "m")
    assert list(head.hidden) == list(info.hidden) == json.loads(want)
    said = (f"[] beat [256] by {diff:.3f}, more than the noise ({noise:.3f})" if want == "[]" else
            f"a tie: [256] was ahead of [] by {-diff:.3f}" if -noise <= diff < 0 else
            f"[256] scored highest, ahead of [] by {-diff:.3f}" if diff < 0 else
            "a tie: [256] and [] scored the same" if diff == 0 else f"a tie: [] was ahead of [256] by {diff:.3f}")
    assert any(said in line for line in lines), lines
    caveat = "without a group column CV saw only sources like the training ones"  # the store has no groups
    assert (caveat in m["head_choice"]["why"]) == (want == "[]"), m["head_choice"]["why"]


@pytest.mark.parametrize("groups", [None, 3])
def test_a_linear_head_chosen_without_groups_says_what_cv_could_not_see(tmp_path, monkeypatch, groups):
    """Without a group column, CV's folds mix the training sources: when [] wins there, train-head says that on new
    sources [256] generalised better and asks for the group (issue #31: never silently pick the head that
    generalises worse); with groups CV saw new sources and says nothing of the kind."""
    import pipeline.selection.heads as selection
    monkeypatch.setattr(selection, "prefer",  # what CV found: not this test's
                        lambda options, worst=None: ("[]", "[] beat [256]"))
    store = synthetic_store(tmp_path / "s.h5", n=240, dim=8, groups=groups)
    lines = []
    m = train_head(stores=[store], out=str(tmp_path / "m"), progress=lines.append,
                   params=params(head={"hidden": "auto", "epochs": 5, "adapt": "none"}, cv={"folds": 3, "repeats": 1}))
    assert m["head_choice"]["chosen"] == []
    caveat = "without a group column CV saw only sources like the training ones, and on new ones [256] generalised"
    assert (caveat in m["head_choice"]["why"]) == (groups is None)
    assert any(caveat in line for line in lines) == (groups is None), lines


def test_prefer_keeps_the_first_option_on_a_tie_and_says_why():
    from pipeline.selection.rules import prefer
    # issue #42: equal scores were reported as a win ("[256] scored highest")
    name, why = prefer([("[256]", [1.0, 1.0, 1.0]), ("[]", [1.0, 1.0, 1.0])])
    assert name == "[256]" and why == "a tie: [256] and [] scored the same (1.000); [256] by the tie rule", why
    name, why = prefer([("affine", [0.99, 1.0, 0.98]), ("scale", [0.99, 0.97, 0.99]), ("none", [0.98, 0.99, 0.97])])
    assert name == "affine" and why.startswith("a tie: affine was ahead of scale by 0.007, within the noise"), why
    name, why = prefer([("[256]", [0.80, 0.82, 0.81]), ("[]", [0.70, 0.71, 0.72])])
    assert why.startswith("[256] scored highest, ahead of [] by 0.100, more than the noise"), why
    assert prefer([("[256]", [0.70, 0.60, 0.65]), ("[]", [0.72, 0.58, 0.69])])[0] == "[256]"  # +0.013 +- 0.04
    name, why = prefer([("[256]", [0.70, 0.60, 0.65]), ("[]", [0.75, 0.66, 0.70])])  # +0.053 every fold
    assert name == "[]" and why.startswith("[] beat [256] by 0.053")
    # ahead by 0.02, 0.05, 0.08: a tie, since with 3 folds the noise is t(2 df) = 4.30 standard errors (0.075);
    # two standard errors (0.035) would call it a win
    name, why = prefer([("[256]", [0.70, 0.60, 0.65]), ("[]", [0.72, 0.65, 0.73])])
    assert name == "[256]" and why.startswith("a tie: [] was ahead of [256] by 0.050, within the noise (0.075)"), why
    name, why = prefer([("affine", [0.5, 0.6]), ("none", [0.53, 0.58])])
    assert name == "affine" and why.startswith("a tie: none was ahead of affine by 0.005")


def test_the_noise_quantile_is_students_t():
    from scipy.stats import t
    from pipeline.analysis.noise import t975
    for df in range(1, 300):
        assert abs(t975(df) - t.ppf(0.975, df)) < 0.001, df


def test_a_transform_that_clearly_loses_on_stress_batches_is_refused():
    """Refused only when its loss against none is beyond STRESS_TOLERANCE by more than the batch-to-batch noise."""
    from pipeline.selection.crossval import Candidate
    from pipeline.selection.rules import choose_transform
    f1 = {"none": [{"macro_f1": v} for v in (0.5, 0.5, 0.5)], "scale": [{"macro_f1": v} for v in (0.6, 0.6, 0.6)],
          "affine": [{"macro_f1": v} for v in (0.7, 0.7, 0.7)]}
    rng = np.random.default_rng(0)
    none = list(rng.uniform(0.5, 0.9, 40))
    near = [v - 0.03 + rng.normal(0, 0.05) for v in none]  # 0.03 worse, noisy: not clearly beyond 0.02
    far = [v - 0.10 for v in none]  # 0.10 worse on every batch
    cand = Candidate(None, {t: None for t in f1}, f1, stress={"none": {"two classes": none},
                                                              "scale": {"two classes": near},
                                                              "affine": {"two classes": far}})
    name, why = choose_transform(cand)
    assert name == "scale" and "affine refused: 0.100 less accuracy than none on 'two classes' batches" in why
    cand.stress["affine"] = {"two classes": near}
    assert choose_transform(cand)[0] == "affine"

def test_torch_threads_wait_passively_unless_the_user_says_otherwise():
    """Issue #32: beside busy processes the hidden-layer head's spinning OpenMP threads made a fit take 37x its time
    alone (benchmarks/contention.py); the packages ask for sleeping threads before torch loads."""
    import os
    import subprocess
    import sys
    code = "import os, pipeline.heads.mlp, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "PYTHONPATH": str(ROOT)})
    assert r.stdout.strip() == "PASSIVE", r.stderr
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "ACTIVE"})
    assert r.stdout.strip() == "ACTIVE", r.stderr


def test_numpy_arrays_are_not_advised_onto_huge_pages_unless_the_user_says_otherwise():
    """The packages ask numpy, before it is imported, not to advise its big arrays onto huge pages (a first touch
    could wait for the kernel to compact memory: features/__init__.py); a user's NUMPY_MADVISE_HUGEPAGE wins."""
    import os
    import subprocess
    import sys
    code = ("import pipeline, numpy; core = getattr(numpy, '_core', None) or numpy.core; "
            "print(core.multiarray._get_madvise_hugepage())")
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    for given, advised in ((None, "False"), ("1", "True")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**env, "PYTHONPATH": str(ROOT), **({"NUMPY_MADVISE_HUGEPAGE": given} if given else {})})
        assert r.stdout.strip() == advised, r.stderr
