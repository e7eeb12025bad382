"""Precision/recall and density/coverage: limiting cases, known expectations, and a brute-force reference."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from kdjax.evaluation import prdc as prdc_lib


def _reference(real, fake, k):
    """All four metrics from full scipy distance matrices, written from the papers' definitions."""
    d_rr, d_ff, d_rf = cdist(real, real), cdist(fake, fake), cdist(real, fake)
    r_real = np.sort(d_rr, axis=1)[:, k]  # column 0 is the point itself
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside = d_rf <= r_real[:, None]
    return {
        "precision": np.mean([inside[:, j].any() for j in range(len(fake))]),
        "recall": np.mean([(d_rf[i] <= r_fake).any() for i in range(len(real))]),
        "density": inside.sum() / (k * len(fake)),
        "coverage": np.mean(d_rf.min(axis=1) <= r_real),
    }


def test_blocked_computation_matches_brute_force():
    rng = np.random.default_rng(0)
    real, fake = rng.standard_normal((203, 5)), rng.standard_normal((151, 5)) * 1.3 + 0.2
    got = prdc_lib.prdc(real, fake, k=3, block_size=17)
    want = _reference(real, fake, 3)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert (got["num_real"], got["num_fake"], got["k"]) == (203, 151, 3)


def test_knn_radii_match_sorted_distances():
    x = np.random.default_rng(1).standard_normal((50, 4))
    np.testing.assert_allclose(prdc_lib.knn_radii(x, k=3, block_size=7), np.sort(cdist(x, x), axis=1)[:, 3],
                               rtol=1e-9)


def test_identical_sets():
    x = np.random.default_rng(2).standard_normal((500, 8))
    out = prdc_lib.prdc(x, x)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0
    # Each ball holds its centre and its k neighbours: density = N (k + 1) / (k N) exactly.
    assert out["density"] == pytest.approx(4 / 3)


def test_disjoint_far_apart_sets():
    rng = np.random.default_rng(3)
    real = rng.standard_normal((300, 8))
    fake = rng.standard_normal((300, 8)) + 100.0
    out = prdc_lib.prdc(real, fake)
    assert out["precision"] == 0.0 and out["recall"] == 0.0
    assert out["density"] == 0.0 and out["coverage"] == 0.0


def test_mode_dropping_subset_has_full_precision_and_low_recall():
    real = np.random.default_rng(4).standard_normal((1000, 4))
    fake = real[real[:, 0] > 0.5]  # one region of the real data only
    out = prdc_lib.prdc(real, fake)
    assert out["precision"] == 1.0
    assert out["recall"] < 0.6 and out["coverage"] < 0.6


def test_same_distribution_matches_the_expected_density_and_coverage():
    # Naeem et al. 2020: for equal distributions E[density] = 1 and, with N = M, E[coverage] ->
    # 1 - 1/2^k, exactly 1 - prod_{i=1..k} (N - i) / (2N - i).
    rng = np.random.default_rng(5)
    n, k = 2000, 3
    out = prdc_lib.prdc(rng.standard_normal((n, 6)), rng.standard_normal((n, 6)), k=k)
    expected_coverage = 1 - np.prod([(n - i) / (2 * n - i) for i in range(1, k + 1)])
    assert out["coverage"] == pytest.approx(expected_coverage, abs=0.03)
    assert out["density"] == pytest.approx(1.0, abs=0.08)
    assert out["precision"] > 0.6 and out["recall"] > 0.6


@pytest.mark.parametrize("which, bad_value", [("fake", np.inf), ("real", np.nan), ("fake", -np.inf)])
def test_non_finite_features_are_refused_naming_the_set_and_the_rows(which, bad_value):
    rng = np.random.default_rng(6)
    sets = {"real": rng.standard_normal((200, 5)), "fake": rng.standard_normal((150, 5))}
    clean = prdc_lib.prdc(sets["real"], sets["fake"])
    sets[which][[3, 77], 2] = bad_value  # two rows
    with pytest.raises(ValueError, match=rf"{which} features: 2 of {len(sets[which])} rows hold NaN or inf"):
        prdc_lib.prdc(sets["real"], sets["fake"])
    assert 0.0 < clean["precision"] <= 1.0  # the clean sets give numbers; only the bad rows are refused
