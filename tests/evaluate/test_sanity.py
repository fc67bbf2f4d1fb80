"""Model-parameter randomization test (xcam_assets.evaluate.sanity): an edge detector that
ignores the model fails, Grad-CAM on a small CNN passes, EigenCAM (blind to the output
layer) fails at step 1; the cascade and the similarities."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from xcam_assets.evaluate.sanity import (
    cascade_cuts,
    parameter_layers,
    randomization_test,
    randomize_layers,
    spearman_similarity,
    ssim_similarity,
)
from xcam_assets.explain.cams import compute_heatmaps


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _images(n: int = 4, size: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    out = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        x0, y0 = rng.integers(2, size - 12, 2)
        out[i, y0:y0 + 10, x0:x0 + 10] = 200
        out[i] = np.clip(out[i] + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    return out


def _model() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet().eval()


def edges(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """A 'method' that returns the input's edges whatever the weights."""
    out = []
    for im in images:
        g = np.hypot(cv2.Sobel(im.astype(np.float32), cv2.CV_32F, 1, 0),
                     cv2.Sobel(im.astype(np.float32), cv2.CV_32F, 0, 1))
        out.append(g / g.max())
    return np.stack(out)


def cam(method: str):
    def fn(model: nn.Module, images: np.ndarray) -> np.ndarray:
        return compute_heatmaps(model, [model.features[3]], images, method, 0)
    return fn


def test_cascade_goes_from_the_top_down() -> None:
    assert cascade_cuts(10, 4) == [1, 2, 5, 10]
    assert cascade_cuts(10, 1) == [1]
    assert cascade_cuts(2, 5) == [1, 2]
    names = parameter_layers(_model())
    assert names == ["features.0", "features.1", "features.3", "fc"]


def test_randomize_changes_only_the_named_layers_and_is_seeded() -> None:
    a, b = _model(), _model()
    randomize_layers(a, ["fc"], seed=1)
    randomize_layers(b, ["fc", "features.3"], seed=1)
    assert torch.equal(a.fc.weight, b.fc.weight)           # same draw at every step
    assert not torch.equal(a.features[3].weight, b.features[3].weight)
    assert torch.equal(a.features[0].weight, _model().features[0].weight)


def test_edge_detector_fails_whatever_the_weights() -> None:
    res = randomization_test(_model(), edges, _images(), n_steps=3, seed=0)
    assert np.allclose(res.spearman, 1.0) and np.allclose(res.ssim, 1.0)
    assert res.failed(check_step=1, max_spearman=0.5)
    assert res.layers == [1, 2, 4] and res.lowest[0] == "fc"


def test_gradcam_passes_and_eigencam_ignores_the_output_layer() -> None:
    model, images = _model(), _images()
    grad = randomization_test(model, cam("gradcam-norelu"), images, n_steps=3, seed=0)
    eig = randomization_test(model, cam("eigencam"), images, n_steps=3, seed=0)
    # EigenCAM reads the target layer's activations only: randomizing fc changes nothing
    assert np.nanmean(eig.spearman[0]) == pytest.approx(1.0, abs=1e-6)
    assert eig.failed()
    # Grad-CAM's channel weights come from fc: a random fc gives a different map
    assert np.nanmean(grad.spearman[0]) < 0.5 and not grad.failed()
    assert torch.equal(model.fc.weight, _model().fc.weight)  # the caller's model untouched


def test_similarities() -> None:
    a = np.linspace(0, 1, 64).reshape(8, 8)
    assert spearman_similarity(a, a ** 2) == pytest.approx(1.0)
    assert spearman_similarity(a, np.zeros((8, 8))) == 0.0
    assert np.isnan(spearman_similarity(np.zeros((8, 8)), a))
    assert ssim_similarity(a, a) == pytest.approx(1.0)
    assert ssim_similarity(a, 1 - a) < 0.5


class IgnoresItsTop(TinyNet):
    """A model whose output ignores its last (registered) layer."""

    def __init__(self) -> None:
        super().__init__()
        self.unused_head = nn.Linear(1, 1)


def test_a_model_whose_output_ignores_its_last_layer_fails_at_step_one() -> None:
    torch.manual_seed(0)
    model = IgnoresItsTop().eval()
    assert parameter_layers(model)[-1] == "unused_head"
    res = randomization_test(model, cam("gradcam-norelu"), _images(), n_steps=3, seed=0)
    assert np.nanmean(res.spearman[0]) == pytest.approx(1.0, abs=1e-6) and res.failed()
    assert np.nanmean(res.spearman[-1]) < 0.5  # every layer randomized: the map is gone
