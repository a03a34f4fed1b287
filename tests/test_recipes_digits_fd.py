"""The digits Frechet distance the recipes report (``kdiff.metrics.digits_frechet_distance``): zero for the
reference against itself, small for real training digits (the floor), between that and clearly degraded digits
for a simple generative model's samples, and it needs no labels."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from scipy.ndimage import gaussian_filter

from kdiff import data, metrics

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def digits():
    train, train_labels = data.digits_arrays(split="train")
    test, _ = data.digits_arrays(split="test")
    return train, train_labels, test, metrics.fit_digits_feature_net()


def gaussian_model_samples(train: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A per-class Gaussian fitted to the training pixels, sampled and quantized: a crude generative model."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = train[labels == i % 10].reshape(-1, 64).astype(np.float64)
        out.append(rng.multivariate_normal(x.mean(0), np.cov(x, rowvar=False) + 1e-3 * np.eye(64)))
    return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8).reshape(n, 8, 8, 1)


def test_reference_against_itself_is_zero_and_the_floor_is_small(digits):
    train, _, test, net = digits
    assert metrics.digits_frechet_distance(test, net=net) == pytest.approx(0.0, abs=1e-6)
    floor = metrics.digits_frechet_floor(net=net)
    assert floor == metrics.digits_frechet_distance(train, net=net)
    assert 0 < floor < 10


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # units that never fire: singular covariances
def test_matches_an_independent_float64_frechet_distance(digits):
    """|mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 sqrtm(S_1 S_2)) with scipy's sqrtm on the same features."""
    train, _, test, net = digits
    a, b = metrics.digits_features(train, net=net), metrics.digits_features(test, net=net)
    assert a.shape == (len(train), metrics.DIGITS_FEATURE_DIM) and a.dtype == np.float64
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert metrics.digits_frechet_distance(train, net=net) == pytest.approx(expected, rel=1e-6)


def test_orders_real_model_and_degraded_digits(digits):
    train, labels, test, net = digits
    floor = metrics.digits_frechet_floor(net=net)
    model = metrics.digits_frechet_distance(gaussian_model_samples(train, labels, 1000, seed=0), net=net)
    shifted = metrics.digits_frechet_distance(np.roll(test, 1, axis=2), net=net)
    blurred = np.stack([gaussian_filter(im[..., 0].astype(np.float64), 0.7) for im in test])
    blurred = metrics.digits_frechet_distance(np.round(blurred).astype(np.uint8)[..., None], net=net)
    assert floor < model < min(shifted, blurred)
    assert min(shifted, blurred) > 5 * floor


def test_errors(digits):
    with pytest.raises(ValueError, match=r"images: expected digits of shape \(N, 8, 8, 1\)"):
        metrics.digits_features(np.zeros((3, 28, 28, 1), np.uint8), net=digits[3])
