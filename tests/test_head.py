"""The head's numerics against references: the linear head (hidden: []) is the logistic regression scikit-learn
fits, streamed or not; our L-BFGS, Adam, temperature and metrics agree with their textbook / library versions."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, precision_recall_fscore_support

from features.synthetic import synthetic_store
from pipeline.calibration import fit_temperature, softmax
from pipeline.head import fit_head, head_logits, split_validation
from pipeline.mlp import Adam
from pipeline.optim import Plain, lbfgs
from pipeline.metrics import classification_metrics
from pipeline.rows import open_rows
from pipeline.train import train_head
from tests.conftest import ROOT, params


def test_linear_head_is_the_logistic_regression_sklearn_fits(tmp_path):
    """No early-stopping slice, no class weights: our full-batch L-BFGS and scikit-learn's minimise the same
    objective (mean cross-entropy + wd/2 |W|^2 = sklearn's with C = 1 / (wd N)), so the probabilities agree."""
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=1500, dim=40, classes=4, separation=0.3)])
    p = params(head={"hidden": [], "epochs": 500, "class_weight": "none", "val_fraction": 0.0,
                     "weight_decay": 0.01}).head
    train = np.ones(len(rows), bool)
    head = fit_head(rows=rows, train=train, val=~train, n_classes=4, params=p, random_state=0)
    ours = softmax(head_logits(head, rows))
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
    y = torch.from_numpy(rows.labels[val])

    def val_loss(stop_on: np.ndarray, **head):
        h = fit_head(rows=rows, train=fit, val=stop_on, n_classes=3, params=params(head={**base, **head}).head,
                     random_state=0)
        return float(torch.nn.functional.cross_entropy(torch.from_numpy(head_logits(h, rows, val)), y))

    early, converged = val_loss(val), val_loss(np.zeros_like(val), epochs=1000)
    assert early < converged - 0.05, (early, converged)


def test_lbfgs_finds_the_minimum_of_rosenbrock():
    def f(x):
        v = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        return float(v), np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2), 200 * (x[1] - x[0] ** 2)])

    x = lbfgs(Plain(f), np.array([-1.2, 1.0]), max_iter=500, gtol=1e-6, ftol=0.0)
    assert np.allclose(x, [1.0, 1.0], atol=1e-3), x


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
        "from pipeline.train import train_head\n"
        "from pipeline.modeldir import load_model_dir\n"
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
    """No validation slice: the hidden-layer head stops when an epoch's mean training loss improves by less than
    `tol` over `patience` epochs, long before a huge `epochs` budget."""
    import pipeline.mlp as mlp
    epochs = []
    real = mlp._epoch
    monkeypatch.setattr(mlp, "_epoch", lambda *a, **k: (epochs.append(1), real(*a, **k))[1])
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=400, dim=16, classes=3, separation=0.5)])
    p = params(head={"hidden": [32], "epochs": 100000, "val_fraction": 0.0}).head
    train = np.ones(len(rows), bool)
    head = fit_head(rows=rows, train=train, val=~train, n_classes=3, params=p, random_state=0)
    assert 3 < len(epochs) < 2000, len(epochs)
    assert (head_logits(head, rows).argmax(1) == rows.labels).mean() > 0.6  # chance: 0.33


def test_predictions_csv_is_what_csv_writer_writes(tmp_path):
    """write_predictions formats its numbers in blocks; the file must read back as csv.writer's would, odd path
    names (commas, quotes, line breaks, non-ASCII) and class names included."""
    import csv
    from pipeline.metrics import write_predictions
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), 5000).astype(np.float32)
    names = ["a", "b,c", 'd"e', "ü"]
    paths = [f"img/{i}.png" for i in range(5000)]
    paths[1], paths[4097] = 'we,ird "x"\nname.png', "ünï cödé.jpg"
    labels = [names[i % 4] for i in range(5000)]
    write_predictions(tmp_path / "p.csv", paths=paths, labels=labels, probs=probs, class_names=names,
                      extra={"fold": [i % 3 for i in range(5000)]})
    with open(tmp_path / "ref.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "predicted", "confidence", "fold"] + [f"p_{c}" for c in names])
        for i in range(5000):
            w.writerow([paths[i], labels[i], names[probs[i].argmax()], f"{probs[i].max():.6f}", i % 3]
                       + [f"{v:.6f}" for v in probs[i]])
    assert (tmp_path / "p.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()
    back = list(csv.DictReader(open(tmp_path / "p.csv", newline="")))
    assert back[1]["path"] == paths[1] and back[4097]["p_b,c"] == f"{probs[4097][1]:.6f}"


def test_pool_rows_give_the_fit_the_same_standardisation_loss_and_gradient(tmp_path):
    """A linear fit on a Pool (rows standardised once, grouped by fold; the fit's own standardisation folded into
    the weights; its early-stopping slice left in place with weight 0) must see what a fit on its own copy
    (Standardised) sees: the same mean and scale, loss and gradient at any weights, and the same head."""
    from pipeline.head import Pool, Standardised, _Softmax, class_weights
    from pipeline.params import HeadParams
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=600, dim=12, classes=4, separation=0.4)])
    rows.features[:, 3] = rows.features[:, 3] * 40 + 7  # a dimension far from unit scale
    rng = np.random.default_rng(0)
    fold = rng.integers(0, 3, len(rows))
    labelled = rng.random(len(rows)) > 0.05  # a few unlabelled rows stay out of the pool
    pool = Pool(rows, labelled, fold)
    val = labelled & (fold != 1) & (rng.random(len(rows)) < 0.15)
    none = np.zeros(len(rows), bool)
    for train, held in ((labelled & (fold != 1) & ~val, val), (labelled, none)):  # a CV fold minus its slice; final
        ours, ref = pool.rows_of(train, held), Standardised(rows, train)
        assert np.allclose(ours.mean, ref.mean, rtol=1e-5, atol=1e-5) and np.allclose(ours.scale, ref.scale,
                                                                                       rtol=1e-5)
        w = class_weights(rows.labels[train], 4, "balanced")
        theta = rng.normal(size=4 * 13).astype(np.float32) * 0.3
        (la, ga), (lb, gb) = (_Softmax(d, w, 1e-2, 4, 12).start(theta) for d in (ours, ref))
        assert abs(la - lb) < 1e-5 * max(1, abs(lb)) and np.allclose(ga, gb, atol=2e-5), (la, lb)
    p = params(head={"hidden": [], "min_val_images": 10, "min_val_per_class": 1}).head
    fit = labelled & (fold != 1) & ~val
    a = fit_head(rows=rows, train=fit, val=val, n_classes=4, params=p, random_state=0, pool=pool)
    b = fit_head(rows=rows, train=fit, val=val, n_classes=4, params=p, random_state=0)
    assert np.allclose(head_logits(a, rows), head_logits(b, rows), atol=1e-3)
    test = labelled & (fold == 1)  # one run of the pool: its logits are read in place
    assert np.allclose(pool.logits(a, test), head_logits(a, rows, test), atol=1e-4)
    assert pool.logits(a, labelled & (fold != 1)) is None and pool.logits(a, ~labelled) is None  # two runs; none


def test_final_fit_from_the_folds_average_reaches_the_same_head(tmp_path, monkeypatch):
    """Without an early-stopping slice the final linear fit starts from the CV heads' average map (fewer
    iterations); the objective is strictly convex, so it must end where a fit from 0 ends."""
    from pipeline.head import Standardised, _Softmax, mean_linear_head, on_standardised, raw_map
    steps, accept = [], _Softmax.accept
    monkeypatch.setattr(_Softmax, "accept", lambda self, t: steps.append(t) or accept(self, t))
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=900, dim=16, classes=5, separation=0.3)])
    p = params(head={"hidden": [], "val_fraction": 0}).head
    fold = np.arange(len(rows)) % 3
    none = np.zeros(len(rows), bool)
    heads = [fit_head(rows=rows, train=fold != j, val=none, n_classes=5, params=p, random_state=j) for j in range(3)]
    start = mean_linear_head(heads)
    a, c = raw_map(start)
    assert np.allclose(head_logits(start, rows), rows.features @ a.T + c, atol=1e-4)  # the average, as a Head
    data = Standardised(rows, np.ones(len(rows), bool))
    w, b = on_standardised(start, data)
    z = (rows.features - data.mean) / data.scale @ w.T + b
    assert np.allclose(z, head_logits(start, rows), atol=1e-4)  # the same map on the fit's standardisation
    all_rows = np.ones(len(rows), bool)
    steps.clear()
    warm = fit_head(rows=rows, train=all_rows, val=none, n_classes=5, params=p, random_state=0, init=start)
    n_warm = len(steps)
    cold = fit_head(rows=rows, train=all_rows, val=none, n_classes=5, params=p, random_state=0)
    assert n_warm < len(steps) - n_warm, (n_warm, len(steps) - n_warm)  # the start was mapped right: it is close
    zw, zc = head_logits(warm, rows), head_logits(cold, rows)
    assert np.abs(zw - zc).max() < 0.02 * np.abs(zc).max() and (zw.argmax(1) == zc.argmax(1)).mean() > 0.995
    assert mean_linear_head([]) is None


def test_fixed_6_spells_numbers_as_percent_format():
    """fixed_6 builds '%.6f' text in numpy: it must give the same characters for float32 and float64, values
    0 and 1, exact and near rounding ties (x.xxxxxx5), and fall back for values outside [0, 1] or not finite."""
    from pipeline.metrics import fixed_6
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
    from pipeline.optim import wolfe
    phi = lambda t: ((t - 100.0) ** 2, 2 * (t - 100.0))  # noqa: E731
    f0, g0 = phi(0.0)
    t = wolfe(phi, f0, g0)
    f, g = phi(t)
    assert f <= f0 + 1e-3 * t * g0 and abs(g) <= 0.9 * abs(g0) and 10 < t < 190, t
    assert wolfe(lambda t: (1.0 + t, 1.0), 1.0, -1.0) == 0.0  # the loss rises everywhere: no step


def test_linear_objective_line_shortcut_matches_a_full_evaluation(tmp_path):
    """The linear head's line search evaluates loss and slope from cached logits (Z + t dZ); they must equal the
    loss of a full pass at theta + t d and the directional derivative from its gradient."""
    from pipeline.head import Standardised, _Softmax, class_weights
    rows = open_rows([synthetic_store(tmp_path / "s.h5", n=500, dim=12, classes=4, separation=0.4)])
    train = np.ones(len(rows), bool)
    data = Standardised(rows, train)
    w = class_weights(rows.labels, 4, "balanced")
    rng = np.random.default_rng(0)
    theta, d = (rng.normal(size=4 * 13).astype(np.float32) * s for s in (0.3, 0.5))
    prob = _Softmax(data, w, 1e-2, 4, 12)
    prob.start(theta)
    phi = prob.along(d)
    for t in (0.0, 0.4, 2.0):
        loss, slope = phi(t)
        full, grad = _Softmax(data, w, 1e-2, 4, 12).start(theta + t * d)
        assert abs(loss - full) < 1e-5 * max(1, abs(full)) and abs(slope - float(grad @ d)) < 1e-4 * max(1, abs(slope))
    loss, grad = prob.accept(0.4)  # not the last trial: the logits are moved
    full, grad_full = _Softmax(data, w, 1e-2, 4, 12).start(theta + 0.4 * d)
    assert abs(loss - full) < 1e-5 and np.allclose(grad, grad_full, atol=1e-5)
    prob.along(d)(0.7)  # the last trial is the step taken: its logits and d/dlogits are reused
    loss, grad = prob.accept(0.7)
    full, grad_full = _Softmax(data, w, 1e-2, 4, 12).start(theta + 1.1 * d)
    assert abs(loss - full) < 1e-5 and np.allclose(grad, grad_full, atol=1e-5)
