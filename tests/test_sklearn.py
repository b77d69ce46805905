"""chainrule.sklearn: scikit-learn's estimator checks, exactness against
scikit-learn's own MLP, meta-estimators, pickling and bad input."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn")

import sklearn.neural_network as skn  # noqa: E402
from sklearn.base import clone  # noqa: E402
from sklearn.datasets import (  # noqa: E402
    load_digits,
    make_classification,
    make_multilabel_classification,
    make_regression,
)
from sklearn.exceptions import ConvergenceWarning, NotFittedError  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils._param_validation import InvalidParameterError  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import chainrule.sklearn as crs  # noqa: E402
from chainrule.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# Short fits stop at max_iter on purpose; the warning is the expected outcome.
no_convergence_warning = pytest.mark.filterwarnings(
    "ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@pytest.fixture(scope="module")
def regression():
    X, y = make_regression(n_samples=200, n_features=8, n_targets=3, noise=0.1, random_state=0)
    return X, y / 100.0


# --------------------------------------------------------------------------
# scikit-learn's estimator checks
# --------------------------------------------------------------------------

@no_convergence_warning
@parametrize_with_checks([
    MLPClassifier(max_iter=100, random_state=0),
    MLPClassifier(solver="lbfgs", max_iter=100, random_state=0),
    MLPRegressor(max_iter=100, random_state=0),
    MLPRegressor(solver="sgd", max_iter=100, random_state=0),
])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


# --------------------------------------------------------------------------
# Same trajectory as scikit-learn's MLP (same seed, same draws)
# --------------------------------------------------------------------------

def _fit_both(name, params, X, y, **fit_params):
    sk = getattr(skn, name)(**params).fit(X, y, **fit_params)
    cr = getattr(crs, name)(**params).fit(X, y, **fit_params)
    return sk, cr


def _assert_same_fit(sk, cr, rtol):
    assert cr.n_iter_ == sk.n_iter_
    assert cr.t_ == sk.t_
    assert cr.n_layers_ == sk.n_layers_ and cr.n_outputs_ == sk.n_outputs_
    assert cr.out_activation_ == sk.out_activation_
    for a, b in zip(cr.coefs_ + cr.intercepts_, sk.coefs_ + sk.intercepts_):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    if hasattr(sk, "loss_curve_"):  # stochastic solvers
        np.testing.assert_allclose(cr.loss_curve_, sk.loss_curve_, rtol=rtol)
        if sk.best_loss_ is None:
            assert cr.best_loss_ is None
        else:
            assert cr.best_loss_ == pytest.approx(sk.best_loss_, rel=rtol)
        if sk.validation_scores_ is None:
            assert cr.validation_scores_ is None and cr.best_validation_score_ is None
        else:
            np.testing.assert_allclose(cr.validation_scores_, sk.validation_scores_, rtol=rtol)
            assert cr.best_validation_score_ == pytest.approx(sk.best_validation_score_, rel=rtol)
    np.testing.assert_allclose(cr.loss_, sk.loss_, rtol=rtol)


CLASSIFIER_CASES = {
    "adam": dict(hidden_layer_sizes=(32,)),
    "adam_tanh_two_layers": dict(hidden_layer_sizes=(24, 12), activation="tanh",
                                 batch_size=64),
    "sgd_nesterov_invscaling": dict(hidden_layer_sizes=(32, 16), solver="sgd",
                                    learning_rate="invscaling", learning_rate_init=0.1),
    "sgd_momentum_adaptive": dict(hidden_layer_sizes=(32,), solver="sgd", activation="logistic",
                                  nesterovs_momentum=False, learning_rate="adaptive",
                                  tol=0.5, n_iter_no_change=1, max_iter=8),
    "sgd_no_momentum_no_shuffle": dict(hidden_layer_sizes=(16,), solver="sgd", momentum=0.0,
                                       shuffle=False, activation="identity"),
    "early_stopping": dict(hidden_layer_sizes=(16,), early_stopping=True, max_iter=12),
    "lbfgs": dict(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=30),
}


@no_convergence_warning
@pytest.mark.parametrize("case", sorted(CLASSIFIER_CASES))
def test_classifier_follows_sklearn_exactly(case, digits):
    X, y = digits
    params = dict(max_iter=5, random_state=0) | CLASSIFIER_CASES[case]
    _assert_same_fit(*_fit_both("MLPClassifier", params, X, y), rtol=1e-9)


@no_convergence_warning
@pytest.mark.parametrize("target", ["binary", "multilabel", "string_labels"])
def test_classifier_targets_follow_sklearn(target, digits):
    X, y = digits
    if target == "binary":
        y = y > 4
    elif target == "multilabel":
        X, y = make_multilabel_classification(300, 10, n_classes=4, random_state=0)
    else:
        y = np.array(["zero", "one", "two"])[y % 3]
    params = dict(hidden_layer_sizes=(16,), max_iter=5, random_state=0)
    sk, cr = _fit_both("MLPClassifier", params, X, y)
    _assert_same_fit(sk, cr, rtol=1e-9)
    np.testing.assert_array_equal(cr.classes_, sk.classes_)
    np.testing.assert_array_equal(cr.predict(X), sk.predict(X))
    np.testing.assert_allclose(cr.predict_proba(X), sk.predict_proba(X), rtol=1e-9)


@no_convergence_warning
def test_sample_weight_follows_sklearn(digits):
    X, y = digits
    w = np.random.RandomState(0).uniform(0.1, 2.0, len(y))
    params = dict(hidden_layer_sizes=(16,), max_iter=4, random_state=0, early_stopping=True)
    _assert_same_fit(*_fit_both("MLPClassifier", params, X, y, sample_weight=w), rtol=1e-9)


@no_convergence_warning
@pytest.mark.parametrize("case", [
    dict(),
    dict(solver="sgd", learning_rate_init=0.01, batch_size=32),
    dict(solver="lbfgs", max_iter=20),
    dict(early_stopping=True, max_iter=8),
    dict(loss="poisson"),
    dict(loss="poisson", solver="lbfgs", max_iter=20),
], ids=["adam", "sgd", "lbfgs", "early_stopping", "poisson", "poisson_lbfgs"])
@pytest.mark.parametrize("n_targets", [1, 3])
def test_regressor_follows_sklearn_exactly(case, n_targets, regression):
    X, y = regression
    y = y[:, 0] if n_targets == 1 else y
    if case.get("loss") == "poisson":
        X, y = X / 10.0, np.exp(y)
    params = dict(hidden_layer_sizes=(16,), max_iter=5, random_state=0) | case
    _assert_same_fit(*_fit_both("MLPRegressor", params, X, y), rtol=1e-9)


@no_convergence_warning
def test_float32_stays_float32_and_tracks_sklearn(digits):
    X, y = digits
    X32 = X.astype(np.float32)
    params = dict(hidden_layer_sizes=(32,), max_iter=5, random_state=0)
    sk, cr = _fit_both("MLPClassifier", params, X32, y)
    assert all(c.dtype == np.float32 for c in cr.coefs_ + cr.intercepts_)
    assert cr.predict_proba(X32).dtype == np.float32
    _assert_same_fit(sk, cr, rtol=2e-5)
    # Integers become float64, as in scikit-learn.
    cr64 = MLPClassifier(**params).fit((X * 16).astype(np.int64), y)
    assert cr64.coefs_[0].dtype == np.float64


@no_convergence_warning
def test_warm_start_and_partial_fit_follow_sklearn(digits):
    X, y = digits
    params = dict(hidden_layer_sizes=(16,), max_iter=3, random_state=0, warm_start=True)
    sk, cr = _fit_both("MLPClassifier", params, X, y)
    sk.fit(X, y)
    cr.fit(X, y)
    assert len(cr.loss_curve_) == 6
    _assert_same_fit(sk, cr, rtol=1e-9)

    classes = np.unique(y)
    sk = skn.MLPClassifier(hidden_layer_sizes=(16,), random_state=0)
    cr = MLPClassifier(hidden_layer_sizes=(16,), random_state=0)
    for lo in (0, 600, 1200):
        sk.partial_fit(X[lo:lo + 600], y[lo:lo + 600], classes=classes)
        cr.partial_fit(X[lo:lo + 600], y[lo:lo + 600], classes=classes)
    _assert_same_fit(sk, cr, rtol=1e-9)


@no_convergence_warning
@pytest.mark.parametrize("solver", ["adam", "sgd", "lbfgs"])
def test_accuracy_close_to_sklearn(solver, digits):
    X, y = digits
    Xa, Xb, ya, yb = X[:1200], X[1200:], y[:1200], y[1200:]
    params = dict(hidden_layer_sizes=(64,), max_iter=60, random_state=1, solver=solver,
                  learning_rate_init=0.01 if solver == "sgd" else 0.001)
    sk, cr = _fit_both("MLPClassifier", params, Xa.astype(np.float32), ya)
    assert cr.score(Xb, yb) > 0.85
    assert abs(cr.score(Xb, yb) - sk.score(Xb, yb)) < 0.02


# --------------------------------------------------------------------------
# Behaviours and extras
# --------------------------------------------------------------------------

def test_convergence_warning_at_max_iter(digits):
    X, y = digits
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(2\) reached"):
        MLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        MLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=2,
                      random_state=0).fit(X, y)


def test_stops_on_tol_without_warning(digits):
    X, y = digits
    params = dict(hidden_layer_sizes=(8,), tol=10.0, n_iter_no_change=2, random_state=0)
    clf = MLPClassifier(**params).fit(X, y)
    # best_loss_ starts at inf, so epochs 2, 3 and 4 fail to improve by tol.
    assert clf.n_iter_ == skn.MLPClassifier(**params).fit(X, y).n_iter_ == 4


@no_convergence_warning
def test_extras_validation_loss_and_grad_norms(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(32, 16), early_stopping=True, max_iter=15,
                        random_state=0).fit(X, y)
    assert len(clf.validation_loss_curve_) == len(clf.validation_scores_) == clf.n_iter_
    assert clf.validation_loss_curve_[-1] < clf.validation_loss_curve_[0]
    norms = np.array(clf.grad_norms_curve_)
    assert norms.shape == (clf.n_iter_, 3)
    assert np.all(norms > 0) and np.all(np.isfinite(norms))

    plain = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    assert plain.validation_loss_curve_ is None and plain.validation_scores_ is None
    # Equal batches and a negligible step: the epoch's mean mini-batch
    # gradient is the full-batch gradient at the initial weights.
    one = MLPClassifier(hidden_layer_sizes=(8,), max_iter=1, shuffle=False, solver="sgd",
                        learning_rate_init=1e-12, momentum=0.0, alpha=0.0, batch_size=599,
                        random_state=0).fit(X, y)
    step = one._make_step(np.ascontiguousarray(X),
                          one._plan_targets(one._label_binarizer.transform(y)), None)
    step(None, float(len(y)))
    full = [np.linalg.norm(g) for g in one._split_layers(one._grads)]
    np.testing.assert_allclose(one.grad_norms_curve_[0], full, rtol=1e-6)


@no_convergence_warning
def test_coefs_are_views_and_replacements_are_seen(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    proba = clf.predict_proba(X)
    clf.coefs_[1][:] = 0.0
    clf.intercepts_[1][:] = 0.0
    np.testing.assert_allclose(clf.predict_proba(X), 0.1)
    clf.coefs_ = [np.ones_like(c) for c in clf.coefs_]
    clf.intercepts_ = [np.zeros_like(b) for b in clf.intercepts_]
    assert not np.allclose(clf.predict_proba(X), proba)
    sk = skn.MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    sk.coefs_ = [np.ones_like(c) for c in sk.coefs_]
    sk.intercepts_ = [np.zeros_like(b) for b in sk.intercepts_]
    np.testing.assert_allclose(clf.predict_proba(X), sk.predict_proba(X), rtol=1e-9)
    with pytest.raises(ValueError, match=r"coefs_\[0\].shape is \(2, 2\); expected \(64, 8\)"):
        clf.coefs_ = [np.ones((2, 2)), clf.coefs_[1]]
        clf.predict(X)


@no_convergence_warning
def test_sparse_input_matches_dense(digits):
    sparse = pytest.importorskip("scipy.sparse")
    X, y = digits
    dense = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, y)
    sp = MLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(
        sparse.csr_matrix(X), y)
    np.testing.assert_allclose(sp.predict_proba(sparse.csc_matrix(X)), dense.predict_proba(X))


def test_verbose_prints(digits, capsys):
    X, y = digits
    MLPClassifier(hidden_layer_sizes=(4,), max_iter=5, tol=10.0, n_iter_no_change=1,
                  verbose=True, random_state=0).fit(X, y)
    out = capsys.readouterr().out
    assert "Iteration 1, loss = " in out and "Stopping." in out


# --------------------------------------------------------------------------
# Meta-estimators, clone, pickle
# --------------------------------------------------------------------------

@no_convergence_warning
def test_pipeline_and_cross_val_score(digits):
    X, y = digits
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(32,), max_iter=30,
                                                         random_state=0))
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8


@no_convergence_warning
def test_grid_search_two_jobs():
    X, y = make_classification(n_samples=200, n_features=10, random_state=0)
    grid_params = {"hidden_layer_sizes": [(8,), (16,)], "alpha": [1e-4, 1.0]}
    grid = GridSearchCV(MLPClassifier(max_iter=30, learning_rate_init=0.01, random_state=0),
                        grid_params, cv=2, n_jobs=2).fit(X, y)
    sk_grid = GridSearchCV(skn.MLPClassifier(max_iter=30, learning_rate_init=0.01,
                                             random_state=0), grid_params, cv=2).fit(X, y)
    assert isinstance(grid.best_estimator_, MLPClassifier)
    assert grid.best_params_ == sk_grid.best_params_
    np.testing.assert_allclose(grid.cv_results_["mean_test_score"],
                               sk_grid.cv_results_["mean_test_score"])
    assert grid.score(X, y) > 0.8


def test_clone_keeps_params_untouched():
    clf = MLPClassifier(hidden_layer_sizes=[7, 5], solver="sgd", n_iter_no_change=np.inf)
    clone_ = clone(clf)
    assert clone_.get_params() == clf.get_params()
    sk = skn.MLPClassifier().get_params()
    assert MLPClassifier().get_params() == sk
    assert MLPRegressor().get_params() == skn.MLPRegressor().get_params()


@no_convergence_warning
@pytest.mark.parametrize("Estimator", [MLPClassifier, MLPRegressor])
def test_pickle_round_trip_predicts_and_keeps_training(Estimator, digits):
    X, y = digits
    est = Estimator(hidden_layer_sizes=(8,), max_iter=2, random_state=0)
    est.partial_fit(X, y, classes=np.unique(y)) if Estimator is MLPClassifier \
        else est.partial_fit(X, y)
    copy = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(copy.predict(X), est.predict(X))
    assert np.shares_memory(copy.coefs_[0], copy._params)
    est.partial_fit(X, y)
    copy.partial_fit(X, y)
    for a, b in zip(est.coefs_, copy.coefs_):
        np.testing.assert_array_equal(a, b)
    assert pickle.loads(pickle.dumps(Estimator())).get_params() == Estimator().get_params()


# --------------------------------------------------------------------------
# Bad input: scikit-learn's messages
# --------------------------------------------------------------------------

@no_convergence_warning
def test_bad_input_errors(digits):
    X, y = digits
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0)
    X_nan = X.copy()
    X_nan[3, 5] = np.nan
    with pytest.raises(ValueError, match="Input X contains NaN"):
        clf.fit(X_nan, y)
    X_inf = X.copy()
    X_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="Input X contains infinity"):
        clf.fit(X_inf, y)
    with pytest.raises(ValueError, match="Found input variables with inconsistent numbers"):
        clf.fit(X, y[:-1])
    with pytest.raises(NotFittedError, match="This MLPClassifier instance is not fitted"):
        clf.predict(X)
    clf.fit(X, y)
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 64"):
        clf.predict(X[:, :3])
    with pytest.raises(ValueError, match=r"Found array with 0 sample\(s\)"):
        clf.predict(X[:0])
    with pytest.raises(ValueError, match="Unknown label type"):
        MLPClassifier(max_iter=2).fit(X, y + 0.5)
    with pytest.raises(ValueError, match="could not convert string to float"):
        MLPRegressor(max_iter=2).fit(X, np.array(["a"] * len(X)))


@pytest.mark.parametrize("params, error, match", [
    (dict(hidden_layer_sizes=0), InvalidParameterError, "'hidden_layer_sizes' parameter"),
    (dict(hidden_layer_sizes=[4, 0]), ValueError, r"hidden_layer_sizes must be > 0, got \[4, 0\]"),
    (dict(solver="newton"), InvalidParameterError, "'solver' parameter"),
    (dict(activation="softmax"), InvalidParameterError, "'activation' parameter"),
    (dict(learning_rate_init=0.0), InvalidParameterError, "'learning_rate_init' parameter"),
    (dict(momentum=1.5), InvalidParameterError, "'momentum' parameter"),
    (dict(batch_size="big"), InvalidParameterError, "'batch_size' parameter"),
])
def test_bad_parameters(params, error, match):
    X, y = make_classification(n_samples=50, n_features=4, random_state=0)
    with pytest.raises(error, match=match):
        MLPClassifier(max_iter=2, **params).fit(X, y)


@no_convergence_warning
def test_partial_fit_and_warm_start_errors(digits):
    X, y = digits
    for est in (MLPClassifier(solver="lbfgs"), MLPRegressor(solver="lbfgs")):
        assert not hasattr(est, "partial_fit")
        with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as info:
            est.partial_fit(X, y)
        assert "partial_fit is only available for stochastic" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="The validation set is too small"):
        MLPRegressor(early_stopping=True, validation_fraction=0.01).fit(X[:100], y[:100])
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        MLPClassifier().partial_fit(X, y)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=np.unique(y))
    clf = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2).partial_fit(X, y, classes=range(10))
    with pytest.raises(ValueError, match="`y` has classes not in `self.classes_`"):
        clf.partial_fit(X, y + 1)
    warm = MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, warm_start=True).fit(X, y)
    with pytest.raises(ValueError, match="warm_start can only be used where `y` has the same"):
        warm.fit(X, y % 3)
    warm.set_params(hidden_layer_sizes=(5,))
    with pytest.raises(ValueError, match=r"layer sizes are \[64, 5, 10\] but the fitted model"):
        warm.fit(X, y)
    with pytest.warns(UserWarning, match="It is going to be clipped"):
        MLPClassifier(hidden_layer_sizes=(4,), batch_size=5000, max_iter=1).fit(X, y)


def test_import_chainrule_does_not_need_sklearn():
    code = ("import sys; sys.modules['sklearn'] = None; import chainrule, chainrule.kernels; "
            "assert 'chainrule.sklearn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
