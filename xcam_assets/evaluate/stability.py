"""Stability of heatmaps: agreement of a method's maps under small input perturbations, and
agreement between CAM methods on the same model. Pure numpy, no Dagster.

Perturbations (of the stored uint8 test image; the perturbed image's map is mapped back
into the original image's frame before comparing):

* ``hflip``: the image mirrored left-right; its map mirrored back.
* ``shift``: the image translated by ``s`` px right and down (``s`` = ``shift_px`` at the
  224 px reference, scaled to the image size like the pointing tolerance, at least 1); the
  uncovered top rows / left columns repeat the image's edge. The maps are compared on the
  region both cover: the original's ``[0, H - s) x [0, W - s)`` against the shifted map's
  ``[s, H) x [s, W)``.
* ``noise``: additive Gaussian noise, standard deviation ``noise_sd`` of the full intensity
  range (seeded), clipped to [0, 255].

Scores per image (:func:`map_agreement`): **Spearman** rank correlation of the two maps'
pixels (0 when the second map is constant), and **pointing agreement**: 1 when the two
maps' maxima lie within ``tolerance_px`` of each other (the pointing-game tolerance, 15 px
at 224 px, scaled), else 0 (a constant second map: 0). An image whose reference map is
constant is left out (nan). A heatmap method that is equivariant to the perturbation scores
1 on both; CAMs on a stride-32 feature map are not exactly shift-equivariant, and the
scores say how much a small, label-preserving change moves the explanation.

**Inter-method agreement**: the same two scores between two methods' maps of the same
images and model (rows ``method_agreement_*@with=<other method>`` of the method first in
alphabetical order): the agreement matrix of the methods, one row per pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from xcam_assets.evaluate.sanity import spearman_similarity

__all__ = ["PERTURBATIONS", "map_agreement", "perturb", "stability_scores", "unperturb"]

PERTURBATIONS = ("hflip", "shift", "noise")


def _crop(maps: np.ndarray, kind: str, s: int, perturbed: bool) -> np.ndarray:
    if kind != "shift":
        return maps
    return maps[..., s:, s:] if perturbed else maps[..., :maps.shape[-2] - s, :maps.shape[-1] - s]


def perturb(images_u8: np.ndarray, kind: str, shift: int = 4, noise_sd: float = 0.02,
            seed: int = 0) -> np.ndarray:
    """The perturbed images (N, H, W) uint8 (module docstring)."""
    x = np.asarray(images_u8)
    if kind == "hflip":
        return np.ascontiguousarray(x[..., ::-1])
    if kind == "shift":
        s = int(shift)
        if not 0 < s < min(x.shape[-2:]):
            raise ValueError(f"shift {s} px does not fit {x.shape[-2:]} images")
        return np.pad(x[..., :x.shape[-2] - s, :x.shape[-1] - s], ((0, 0), (s, 0), (s, 0)),
                      mode="edge")
    if kind == "noise":
        rng = np.random.default_rng(seed)
        noisy = x.astype(np.float64) + rng.normal(0.0, 255.0 * float(noise_sd), x.shape)
        return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    raise ValueError(f"unknown perturbation {kind!r}: use one of {PERTURBATIONS}")


def unperturb(maps: np.ndarray, kind: str) -> np.ndarray:
    """A perturbed image's maps in the original frame (hflip mirrored back; a shifted map
    is cropped by :func:`stability_scores`)."""
    return np.ascontiguousarray(maps[..., ::-1]) if kind == "hflip" else maps


def _argmax(m: np.ndarray) -> np.ndarray:
    return np.asarray(np.unravel_index(int(np.argmax(m)), m.shape), dtype=np.float64)


def map_agreement(a: np.ndarray, b: np.ndarray, tolerance_px: float
                  ) -> tuple[float, float]:
    """(Spearman, pointing agreement) of two maps of one image (module docstring)."""
    rho = spearman_similarity(a, b)
    if np.isnan(rho):
        return float("nan"), float("nan")
    if float(np.ptp(b)) == 0.0:
        return rho, 0.0
    close = np.linalg.norm(_argmax(a) - _argmax(b)) <= float(tolerance_px)
    return rho, float(close)


def stability_scores(heatmaps: Callable[[np.ndarray], np.ndarray], images_u8: np.ndarray,
                     perturbations: Sequence[str] = PERTURBATIONS, shift: int = 4,
                     noise_sd: float = 0.02, tolerance_px: float = 15.0, seed: int = 0,
                     original: np.ndarray | None = None
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """perturbation -> (Spearman per image, pointing agreement per image) between the maps
    of the images and of the perturbed images mapped back. ``heatmaps``: images (N, H, W)
    uint8 -> maps (N, H, W); ``original``: the unperturbed maps, when known."""
    base = np.asarray(heatmaps(images_u8) if original is None else original, np.float64)
    out = {}
    for kind in perturbations:
        maps = unperturb(np.asarray(heatmaps(perturb(images_u8, kind, shift, noise_sd, seed)),
                                    np.float64), kind)
        a, b = _crop(base, kind, shift, False), _crop(maps, kind, shift, True)
        pairs = [map_agreement(a[i], b[i], tolerance_px) for i in range(len(images_u8))]
        out[kind] = (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs]))
    return out
