"""FID and KID against independent computations: closed forms, scipy's sqrtm, np.cov, exact population MMD."""

import warnings

import numpy as np
import pytest
import scipy.linalg

from kdjax.evaluation import fid as fid_lib


def _gaussian_samples(rng, n, mu, q, variances):
    """n samples of N(mu, Q diag(variances) Q^T)."""
    return mu + (rng.standard_normal((n, len(mu))) * np.sqrt(variances)) @ q.T


def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(0)
    x = 1e4 + rng.standard_normal((1000, 6)) * np.arange(1, 7)  # a large mean: cancellation check
    stats = fid_lib.FeatureStats()
    for chunk in np.array_split(x, 7):
        stats.update(chunk)
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-9)


def test_fid_of_a_set_against_itself_is_zero_and_warns_at_small_n():
    feats = np.random.default_rng(1).standard_normal((600, 32))
    with pytest.warns(UserWarning, match="biased"):
        out = fid_lib.fid(feats, feats)
    assert abs(out["fid"]) < 1e-8
    assert out["num_real"] == 600 and out["num_fake"] == 600


def test_no_warning_at_large_n():
    feats = np.random.default_rng(2).standard_normal((fid_lib.SMALL_N, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid_lib.fid(fid_lib.FeatureStats.from_features(feats), feats)


def test_frechet_distance_matches_scipy_sqrtm_on_generic_covariances():
    rng = np.random.default_rng(3)
    d = 20
    a, b = rng.standard_normal((d, 2 * d)), rng.standard_normal((d, 3 * d))
    s1, s2 = a @ a.T / (2 * d), b @ b.T / (3 * d)  # non-commuting SPD matrices
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * np.real(covmean))
    assert fid_lib.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_closed_form_with_singular_commuting_covariances():
    rng = np.random.default_rng(4)
    d = 16
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    va, vb = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    va[:5] = 0.0  # rank-deficient, as a covariance from fewer samples than dimensions
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    got = fid_lib.frechet_distance(mu1, q @ np.diag(va) @ q.T, mu2, q @ np.diag(vb) @ q.T)
    assert got == pytest.approx(expected, rel=1e-7)


def test_fid_from_samples_approaches_the_gaussian_closed_form():
    rng = np.random.default_rng(5)
    d = 8
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # shared eigenbasis: sqrt is elementwise
    va, vb = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    mu1, mu2 = rng.standard_normal(d) * 0.5, rng.standard_normal(d) * 0.5
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    errors = []
    for n in (100, 1000, 50_000):
        errs = []
        for _ in range(3):
            x, y = _gaussian_samples(rng, n, mu1, q, va), _gaussian_samples(rng, n, mu2, q, vb)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                errs.append(abs(fid_lib.fid(x, y)["fid"] - closed))
        errors.append(np.mean(errs))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * closed


def _poly_kernel(x, y):
    return (np.einsum("id,jd->ij", x, y) / x.shape[1] + 1.0) ** 3


def test_kid_is_unbiased_for_identical_distributions():
    rng = np.random.default_rng(6)
    m, d, trials = 16, 4, 400
    unbiased, biased = [], []
    for seed in range(trials):
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        out = fid_lib.kid(x, y, num_subsets=1, subset_size=m, seed=seed)
        assert out["subset_size"] == m and out["num_real"] == m
        unbiased.append(out["kid_mean"])
        # The V-statistic (diagonals included), computed independently: biased upwards by O(1/m).
        biased.append(_poly_kernel(x, x).mean() + _poly_kernel(y, y).mean() - 2 * _poly_kernel(x, y).mean())
    unbiased, biased = np.array(unbiased), np.array(biased)
    se = unbiased.std(ddof=1) / np.sqrt(trials)
    assert abs(unbiased.mean()) < 3 * se
    assert biased.mean() > 6 * se  # the test can tell a biased estimator apart


def test_kid_matches_the_population_mmd_of_known_discrete_distributions():
    rng = np.random.default_rng(7)
    d, m, trials = 3, 200, 100
    support_p = rng.standard_normal((5, d))
    support_q = rng.standard_normal((4, d)) + 0.7
    # Exact MMD^2 of the uniform distributions on the two supports (independent copies may coincide).
    population = (_poly_kernel(support_p, support_p).mean() + _poly_kernel(support_q, support_q).mean()
                  - 2 * _poly_kernel(support_p, support_q).mean())
    estimates = []
    for seed in range(trials):  # fresh samples each time: the mean estimates the expectation
        x, y = support_p[rng.integers(0, 5, m)], support_q[rng.integers(0, 4, m)]
        estimates.append(fid_lib.kid(x, y, num_subsets=1, subset_size=m, seed=seed)["kid_mean"])
    se = np.std(estimates, ddof=1) / np.sqrt(trials)
    assert abs(np.mean(estimates) - population) < 4 * se
    assert se < 0.02 * population  # tight enough to mean something
    out = fid_lib.kid(x, y, num_subsets=5, subset_size=1000, seed=0)
    assert (out["num_real"], out["num_fake"], out["subset_size"], out["num_subsets"]) == (m, m, m, 5)


def test_kid_near_zero_for_samples_of_one_distribution():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((1000, 16)), rng.standard_normal((1000, 16))
    shifted = rng.standard_normal((1000, 16)) + 0.5
    same = fid_lib.kid(x, y, num_subsets=10, subset_size=500)
    different = fid_lib.kid(x, shifted, num_subsets=10, subset_size=500)
    assert abs(same["kid_mean"]) < 0.02  # seen: |KID| <= 0.006 over seeds; the shifted set gives ~1
    assert different["kid_mean"] > 0.5


@pytest.mark.parametrize("which", ["real", "fake"])
def test_non_finite_features_are_refused_naming_the_set_and_the_rows(which):
    rng = np.random.default_rng(9)
    sets = {"real": rng.standard_normal((300, 8)), "fake": rng.standard_normal((250, 8))}
    sets[which][5, 0] = np.nan
    sets[which][9, 3] = np.inf
    n = len(sets[which])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small-N warning
        with pytest.raises(ValueError, match=rf"{which} features: 2 of {n} rows hold NaN or inf"):
            fid_lib.fid(sets["real"], sets["fake"])
    with pytest.raises(ValueError, match=rf"{which} features: 2 of {n} rows hold NaN or inf"):
        fid_lib.kid(sets["real"], sets["fake"], num_subsets=2, subset_size=50)
    stats = fid_lib.FeatureStats(which)  # streaming: the batch that brings the bad rows is refused
    stats.update(sets[which][:5])
    with pytest.raises(ValueError, match=rf"{which} features: 2 of 20 rows"):
        stats.update(sets[which][5:25])
    with pytest.raises(ValueError, match="sigma1 holds NaN or inf"):
        fid_lib.frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))
