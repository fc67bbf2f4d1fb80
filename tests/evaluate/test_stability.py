"""Heatmap stability (xcam_assets.evaluate.stability): an equivariant toy map scores 1 under
shifts and flips, a map that ignores the image content does not; inter-method agreement."""

from __future__ import annotations

import numpy as np
import pytest

from xcam_assets.evaluate.stability import map_agreement, perturb, stability_scores, unperturb


def _images(n: int = 3, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, size, size)).astype(np.uint8)


def identity_map(images: np.ndarray) -> np.ndarray:
    """Translation- and flip-equivariant: the map is the image."""
    return images.astype(np.float64) / 255.0


def fixed_map(images: np.ndarray) -> np.ndarray:
    """Always the same map (a bright top-left corner), whatever the image."""
    size = images.shape[-1]
    yy, xx = np.mgrid[:size, :size]
    return np.broadcast_to(1.0 - (yy + xx) / (2 * size), images.shape).copy()


def test_equivariant_toy_map_scores_one() -> None:
    res = stability_scores(identity_map, _images(), ["hflip", "shift"], shift=3,
                           tolerance_px=0.0)
    for kind in ("hflip", "shift"):
        rho, point = res[kind]
        assert np.allclose(rho, 1.0) and np.all(point == 1.0), kind


def test_a_map_blind_to_the_image_is_not_stable_under_flips() -> None:
    rho, point = stability_scores(fixed_map, _images(), ["hflip"], tolerance_px=2.0)["hflip"]
    assert np.all(rho < 0.1) and np.all(point == 0.0)


def test_noise_and_perturbations() -> None:
    x = _images()
    assert np.array_equal(unperturb(perturb(x, "hflip"), "hflip"), x)
    s = perturb(x, "shift", shift=2)
    assert np.array_equal(s[:, 2:, 2:], x[:, :-2, :-2]) and np.array_equal(s[:, 0, 2:], x[:, 0, :-2])
    n1, n2 = perturb(x, "noise", noise_sd=0.02, seed=1), perturb(x, "noise", noise_sd=0.02, seed=1)
    assert np.array_equal(n1, n2) and not np.array_equal(n1, x)
    rho, _ = stability_scores(identity_map, x, ["noise"], noise_sd=0.02)["noise"]
    assert np.all((rho > 0.95) & (rho < 1.0))
    with pytest.raises(ValueError):
        perturb(x, "rotate")


def test_map_agreement() -> None:
    a = np.zeros((8, 8))
    a[2, 2] = 1.0
    b = np.zeros((8, 8))
    b[2, 4] = 1.0
    assert map_agreement(a, b, 2.0)[1] == 1.0 and map_agreement(a, b, 1.5)[1] == 0.0
    assert map_agreement(a, np.zeros((8, 8)), 2.0) == (0.0, 0.0)
    assert all(np.isnan(v) for v in map_agreement(np.zeros((8, 8)), a, 2.0))
