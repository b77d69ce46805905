"""PolynomialBasis (the lecture's phi) and the two-circle data generator."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.data import make_circles, train_test_split
from chainrule.features import PolynomialBasis


def test_defaults_give_the_lecture_phi_in_order():
    x = np.array([[2.0, 3.0], [-1.0, 0.5]])
    phi = PolynomialBasis().fit_transform(x)
    np.testing.assert_array_equal(phi, [[1, 2, 3, 4, 9], [1, -1, 0.5, 1, 0.25]])
    assert list(PolynomialBasis().fit(x).get_feature_names_out()) == ["1", "x0", "x1", "x0^2", "x1^2"]


def test_cross_terms_give_the_full_polynomial():
    x = np.array([[2.0, 3.0]])
    np.testing.assert_array_equal(PolynomialBasis(cross_terms=True).fit_transform(x), [[1, 2, 3, 4, 6, 9]])
    cubic = PolynomialBasis(degree=3, cross_terms=True, include_bias=False).fit(x)
    assert list(cubic.get_feature_names_out(["a", "b"])) == \
        ["a", "b", "a^2", "a b", "b^2", "a^3", "a^2 b", "a b^2", "b^3"]
    np.testing.assert_array_equal(cubic.transform(x), [[2, 3, 4, 6, 9, 8, 12, 18, 27]])
    no_bias = PolynomialBasis(degree=3, include_bias=False).fit_transform(np.array([[2.0, 3.0, 5.0]]))
    np.testing.assert_array_equal(no_bias, [[2, 3, 5, 4, 9, 25, 8, 27, 125]])


def test_dtype_and_transform_without_fit():
    x32 = np.ones((3, 2), np.float32)
    assert PolynomialBasis().transform(x32).dtype == np.float32
    assert PolynomialBasis().transform(np.ones((3, 2), np.int64)).dtype == np.float64


def test_matches_scikit_learn_and_works_in_a_pipeline():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.base import clone
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import PolynomialFeatures

    X, y = make_circles(200, noise=0.05, factor=0.5, seed=0)
    for degree in (1, 2, 3):
        ours = PolynomialBasis(degree=degree, cross_terms=True).fit_transform(X)
        np.testing.assert_allclose(ours, PolynomialFeatures(degree).fit_transform(X), rtol=1e-14)
    basis = clone(PolynomialBasis(degree=2))
    assert basis.get_params() == {"degree": 2, "cross_terms": False, "include_bias": True}
    pipe = make_pipeline(PolynomialBasis(), LogisticRegression()).fit(X, y)
    assert pipe.score(X, y) > 0.95
    assert sklearn.__version__


def test_basis_errors():
    with pytest.raises(ValueError, match=r"PolynomialBasis\.fit: degree must be an integer >= 0; got -1"):
        PolynomialBasis(degree=-1).fit(np.ones((2, 2)))
    fitted = PolynomialBasis().fit(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"PolynomialBasis\.transform: X has 3 features; fit saw 2"):
        fitted.transform(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"PolynomialBasis\.transform: X contains NaN or inf"):
        fitted.transform(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match=r"PolynomialBasis\.fit: X must be 2-D of shape \(n, d\); got shape \(3,\)"):
        PolynomialBasis().fit(np.ones(3))
    with pytest.raises(ValueError, match=r"PolynomialBasis\.set_params: unknown parameter 'order'"):
        PolynomialBasis().set_params(order=2)


def test_make_circles_is_seeded_and_shaped():
    X, y = make_circles(101, noise=0.1, factor=0.5, seed=3)
    X2, y2 = make_circles(101, noise=0.1, factor=0.5, seed=3)
    assert X.shape == (101, 2) and X.dtype == np.float64 and y.dtype == np.int64
    assert X.tobytes() == X2.tobytes() and y.tobytes() == y2.tobytes()
    assert (y == 0).sum() == 50 and (y == 1).sum() == 51
    clean, labels = make_circles(40, factor=0.3, shuffle=False)
    r = np.hypot(clean[:, 0], clean[:, 1])
    np.testing.assert_allclose(r[labels == 0], 1.0)
    np.testing.assert_allclose(r[labels == 1], 0.3)
    with pytest.raises(ValueError, match=r"make_circles: factor must be in \(0, 1\); got 1\.5"):
        make_circles(10, factor=1.5)


def test_make_circles_matches_scikit_learn_without_noise():
    pytest.importorskip("sklearn")
    from sklearn.datasets import make_circles as sk_circles

    ours = make_circles(30, factor=0.4, shuffle=False)
    theirs = sk_circles(30, factor=0.4, shuffle=False)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-15)
    np.testing.assert_array_equal(ours[1], theirs[1])


def test_train_test_split():
    X, y = np.arange(20).reshape(10, 2), np.arange(10)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, seed=0)
    assert len(Xte) == 3 and len(Xtr) == 7 and sorted(np.concatenate([ytr, yte])) == list(range(10))
    np.testing.assert_array_equal(Xtr[:, 0] // 2, ytr)
    with pytest.raises(ValueError, match=r"train_test_split: X has 10 samples but y has 9"):
        train_test_split(X, y[:9])
