"""Tests for xcam_assets.evaluate.faithfulness: hand-computed curves and scores, batched ==
step-by-step, forward-call bounds, and cross-checks against Quantus and pytorch-grad-cam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from aopc_reference import morf_aopc_stepwise
from torch import nn

from xcam_assets.evaluate.faithfulness import (
    CountingPredictor,
    aopc_from_curves,
    blurred,
    curve_auc,
    deletion_scores,
    faithfulness_values,
    insertion_scores,
    masked_out_area,
    masked_out_areas,
    morf_aopc,
    morf_noise,
    path_predictions,
    pixel_ranks,
    region_size_px,
    road_scores,
    tile_order,
    tile_ranks,
    torch_predictor,
)
from xcam_assets.evaluate.tables import EVALUATE_DEFAULTS


def mean_predictor(batch: np.ndarray) -> np.ndarray:
    """'probability' = mean intensity: every perturbation's effect is hand-computable."""
    return batch.reshape(len(batch), -1).astype(np.float64).mean(axis=1)


def corner_predictor(batch: np.ndarray) -> np.ndarray:
    """'probability' = the top-left pixel."""
    return batch[:, 0, 0].astype(np.float64)


# 4x4 heatmap whose 2x2 tiles have means 4, 3, 2, 1 (top-left, top-right, bottom-left, ...)
H = np.array([[4, 4, 3, 3],
              [4, 4, 3, 3],
              [2, 2, 1, 1],
              [2, 2, 1, 1]], dtype=np.float64)


# --------------------------------------------------------------------------- orderings
def test_pixel_ranks_descending_with_row_major_ties() -> None:
    h = np.array([[1.0, 3.0], [3.0, 0.0]])
    np.testing.assert_array_equal(pixel_ranks(h), [[2, 0], [1, 3]])


def test_region_size_scales_34_px_from_224() -> None:
    assert [region_size_px(s) for s in (224, 128, 64, 256, 8)] == [34, 19, 10, 39, 1]


def test_tile_order_by_mean_and_edge_tiles() -> None:
    assert tile_order(H, 2) == [(0, 2, 0, 2), (0, 2, 2, 4), (2, 4, 0, 2), (2, 4, 2, 4)]
    # 3 px image, region 2: edge tiles of 1 px; the lone corner pixel (mean 9) comes first
    h = np.array([[0, 0, 1], [0, 0, 1], [5, 5, 9]], dtype=float)
    assert tile_order(h, 2)[0] == (2, 3, 2, 3)
    np.testing.assert_array_equal(tile_ranks(H, 2), [[0, 0, 1, 1], [0, 0, 1, 1],
                                                     [2, 2, 3, 3], [2, 2, 3, 3]])


# --------------------------------------------------------------------------- AOPC
def test_aopc_from_curves_hand_computed() -> None:
    # 1/(L+1) * sum_k (f0 - fk): (0 + 0.5 + 0.75) / 3 and (0 - 0.5 + 0) / 3
    np.testing.assert_allclose(aopc_from_curves(np.array([[1.0, 0.5, 0.25], [0.5, 1.0, 0.5]])),
                               [1.25 / 3, -0.5 / 3])


def test_morf_aopc_constant_fill_hand_computed() -> None:
    # ones, each step zeroes a 2x2 tile (4 of 16 px): curve 1, .75, .5, .25, 0
    res = morf_aopc(mean_predictor, np.ones((1, 4, 4)), H[None], region=2,
                    perturbation="constant", fill=0.0)
    np.testing.assert_allclose(res.curves, [[1.0, 0.75, 0.5, 0.25, 0.0]])
    assert res.values[0] == pytest.approx(2.5 / 5)  # (0 + .25 + .5 + .75 + 1) / 5
    # only 2 steps: (0 + .25 + .5) / 3
    res2 = morf_aopc(mean_predictor, np.ones((1, 4, 4)), H[None], region=2, steps=2,
                     perturbation="constant", fill=0.0)
    assert res2.values[0] == pytest.approx(0.25)


def test_morf_aopc_gaussian_noise_uses_the_fixed_field() -> None:
    x = np.full((2, 4, 4), 0.5)
    res = morf_aopc(mean_predictor, x, np.stack([H, H[::-1]]), region=2, seed=7)
    for i, h in enumerate((H, H[::-1])):
        noise = morf_noise((4, 4), i, seed=7, mean=0.0, sd=0.1)
        expected = [0.5]
        for r0, r1, c0, c1 in tile_order(h, 2):
            expected.append(expected[-1] + noise[r0:r1, c0:c1].sum() / 16)
        np.testing.assert_allclose(res.curves[i], expected, atol=1e-6)
    assert np.std(morf_noise((200, 200), 0, seed=1)) == pytest.approx(0.1, abs=0.002)


def test_batched_equals_stepwise_with_bounded_forward_calls() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 1)).eval()
    predict = torch_predictor(model, 0)
    rng = np.random.default_rng(0)
    x = rng.random((5, 12, 12)).astype(np.float32)
    h = rng.random((5, 12, 12))
    batched = morf_aopc(predict, x, h, region=4, batch_size=7, seed=3)
    step = morf_aopc_stepwise(predict, x, h, region=4, seed=3)
    n, steps = 5, 9
    assert batched.forward_calls == math.ceil(n * (steps + 1) / 7) == 8
    assert step.forward_calls == n * (steps + 1)
    np.testing.assert_allclose(batched.curves, step.curves, atol=1e-6)
    np.testing.assert_allclose(batched.values, step.values, atol=1e-7)


def test_path_predictions_per_image_thresholds() -> None:
    base, end = np.zeros((2, 1, 2)), np.ones((2, 1, 2))
    ranks = np.array([[[0, 1]], [[1, 0]]])
    counter = CountingPredictor(mean_predictor)
    out = path_predictions(counter, base, end, ranks, np.array([[0, 1, 2], [2, 2, 0]]),
                           batch_size=4)
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    assert counter.calls == 2 and counter.rows == 6


# --------------------------------------------------------------------------- deletion / insertion
def test_curve_auc_trapezoid() -> None:
    assert curve_auc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert curve_auc([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)
    np.testing.assert_allclose(curve_auc(np.array([[0.0, 1.0], [1.0, 1.0]])), [0.5, 1.0])
    with pytest.raises(ValueError):
        curve_auc([1.0])


def test_deletion_hand_computed() -> None:
    x = np.ones((1, 2, 2))
    h = np.array([[[4.0, 3.0], [2.0, 1.0]]])
    res = deletion_scores(mean_predictor, x, h, steps=4, fill=0.0)
    np.testing.assert_allclose(res.curves, [[1.0, 0.75, 0.5, 0.25, 0.0]])
    assert res.values[0] == pytest.approx(0.5)
    # the corner pixel is the most relevant: the probability drops at once -> AUC 1/8
    res = deletion_scores(corner_predictor, x, h, steps=4, fill=0.0)
    assert res.values[0] == pytest.approx(0.125)
    # ... and when it is the least relevant, it survives until the end: (3 + 0/2 - 1/2)/4
    res = deletion_scores(corner_predictor, x, h[:, ::-1, ::-1], steps=4, fill=0.0)
    assert res.values[0] == pytest.approx(0.875)


def test_insertion_hand_computed() -> None:
    # a constant image blurs to itself: curve constant 0.3 -> AUC 0.3
    res = insertion_scores(mean_predictor, np.full((1, 8, 8), 0.3), np.random.default_rng(0)
                           .random((1, 8, 8)), steps=4)
    assert res.values[0] == pytest.approx(0.3, abs=1e-6)
    # corner pixel 1, rest 0, heatmap points at the corner: curve b, 1, 1, 1, 1
    x = np.zeros((1, 8, 8))
    x[0, 0, 0] = 1.0
    h = np.zeros((1, 8, 8))
    h[0, 0, 0] = 1.0
    b = float(blurred(x[0])[0, 0])
    res = insertion_scores(corner_predictor, x, h, steps=4)
    np.testing.assert_allclose(res.curves[0], [b, 1, 1, 1, 1], atol=1e-7)
    assert res.values[0] == pytest.approx((b / 2 + 3 + 0.5) / 4, abs=1e-7)
    assert 0.0 < b < 1.0


# --------------------------------------------------------------------------- masked-out area
def test_masked_out_area_hand_computed() -> None:
    x = np.ones((10, 10))
    h = np.arange(100, dtype=float).reshape(10, 10)
    # 5% (5 px) per step, mean drops 0.05 per step: 0.95, 0.90 (not < 0.9), 0.85 -> flip
    assert masked_out_area(mean_predictor, x, h, threshold=0.9, step=0.05, fill=0.0) == 0.15
    # never flips -> censored at 1; not positive to begin with -> nan
    assert masked_out_area(mean_predictor, x, h, threshold=0.0, step=0.05, fill=0.5) == 1.0
    assert math.isnan(masked_out_area(mean_predictor, x * 0.5, h, threshold=0.9))
    # 0.5% steps on 100 px: ceil(k * 0.5) px after k steps. The corner predictor flips when
    # pixel (0, 0) is masked: most relevant -> first step, 1 px; least relevant (rank 99)
    # -> step 199 masks 100 px (over several chunks of 16 steps)
    assert masked_out_area(corner_predictor, x, h[::-1, ::-1], 0.5, fill=0.0) == 0.01
    assert masked_out_area(corner_predictor, x, h, 0.5, fill=0.0, batch_size=16) == 1.0
    h_98 = h.copy()
    h_98[0, 0], h_98[0, 1] = 1.0, 0.0  # corner now rank 98: 99 px masked at step 197
    assert masked_out_area(corner_predictor, x, h_98, 0.5, fill=0.0, batch_size=16) == 0.99
    res = masked_out_areas(mean_predictor, np.stack([x, x]), np.stack([h, h]), 0.9, step=0.05,
                           fill=0.0)
    np.testing.assert_allclose(res.values, [0.15, 0.15])
    # one forward for f(x_0) of both images, one for their first chunk of 8 steps each
    assert res.forward_calls == 2


# --------------------------------------------------------------------------- ROAD
def test_road_constant_model_scores_zero_and_matches_grad_cam_combined() -> None:
    from pytorch_grad_cam.metrics.road import ROADCombined

    from xcam_assets.evaluate.faithfulness import SigmoidTarget
    from xcam_assets.train.loop import MEAN, STD

    class Constant(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.b = nn.Parameter(torch.tensor([0.3]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b.expand(len(x), 1)

    rng = np.random.default_rng(0)
    x = rng.random((2, 12, 12)).astype(np.float32)
    h = rng.random((2, 12, 12))
    out = road_scores(Constant(), x, h, 0, percentiles=[50])
    for key in ("road_morf", "road_lerf", "road_combined"):
        np.testing.assert_array_equal(out[key], [0.0, 0.0])

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1),
                          nn.Flatten(), nn.Linear(3, 1)).eval()
    ours = road_scores(model, x, h, 0, percentiles=[20, 80], seed=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        ref = ROADCombined(percentiles=[20, 80])(
            ((torch.from_numpy(x) - MEAN) / STD).unsqueeze(1), h.astype(np.float32),
            [SigmoidTarget(0)] * 2, model)
    np.testing.assert_allclose(ours["road_combined"], ref, atol=1e-6)


def test_faithfulness_values_runs_every_configured_metric() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 1)).eval()
    cfg = {**EVALUATE_DEFAULTS["faithfulness"]}
    cfg.update(deletion={"steps": 4, "fill": 0.5}, insertion={"steps": 4, "blur_ksize": 3,
                                                              "blur_sigma": 1.0},
               road={"percentiles": [50], "max_images": 1})
    rng = np.random.default_rng(1)
    out = faithfulness_values(model, 0, rng.random((2, 16, 16)), rng.random((2, 16, 16)),
                              threshold=0.0, config=cfg)
    assert set(out) == {"aopc", "deletion_auc", "insertion_auc", "masked_out_area",
                        "road_morf", "road_lerf", "road_combined", "aopc_grid", "aopc_steps"}
    assert len(out["aopc"]) == 2 and len(out["road_morf"]) == 1
    # the default 9x9 block grid, every region perturbed (L = 81), recorded per image
    assert out["aopc_grid"].tolist() == [9.0, 9.0] and out["aopc_steps"].tolist() == [81.0] * 2
    assert (out["masked_out_area"] == 1.0).all()  # threshold 0: nothing flips
    assert faithfulness_values(model, 0, np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), 0.5,
                               cfg) == {}


# --------------------------------------------------------------------------- Quantus
class SigmoidModel(nn.Module):
    """Single-output probability model in the input space Quantus perturbs ([0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x))


def _quantus():  # noqa: ANN202
    """Quantus comes with xcam's `crosscheck` extra, which `make setup` installs: missing is
    a broken install, so the cross-checks fail instead of skipping."""
    try:
        import quantus
    except ModuleNotFoundError as exc:
        pytest.fail(f"{exc}: install xcam's `crosscheck` extra (make setup; see the README)")
    return quantus


def _ours(model: nn.Module):  # noqa: ANN202
    def predict(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(batch).float().unsqueeze(1))[:, 0].double().numpy()
    return predict


def test_cross_check_aopc_curve_against_quantus_region_perturbation() -> None:
    quantus = _quantus()
    model = SigmoidModel().eval()
    rng = np.random.default_rng(3)
    x = rng.random((3, 1, 16, 16)).astype(np.float32)
    a = rng.random((3, 1, 16, 16)).astype(np.float32)  # no ties
    q = quantus.RegionPerturbation(
        patch_size=4, regions_evaluation=16, order="morf",
        perturb_func=quantus.perturb_func.batch_baseline_replacement_by_indices,
        perturb_baseline=0.0, disable_warnings=True, display_progressbar=False)
    q_curves = np.asarray(q(model=model, x_batch=x, y_batch=np.zeros(3, int), a_batch=a,
                            device="cpu", softmax=False, channel_first=True))
    ours = morf_aopc(_ours(model), x[:, 0], a[:, 0], region=4, perturbation="constant",
                     fill=0.0)
    # Quantus stores f(x_0) - f(x_k) for k = 1..L
    np.testing.assert_allclose(q_curves, ours.curves[:, :1] - ours.curves[:, 1:], atol=1e-5)


def test_cross_check_deletion_curve_against_quantus_pixel_flipping() -> None:
    quantus = _quantus()
    model = SigmoidModel().eval()
    rng = np.random.default_rng(4)
    x = rng.random((2, 1, 8, 8)).astype(np.float32)
    a = rng.random((2, 1, 8, 8)).astype(np.float32)
    q = quantus.PixelFlipping(
        features_in_step=4, perturb_func=quantus.perturb_func.batch_baseline_replacement_by_indices,
        perturb_baseline=0.0, disable_warnings=True, display_progressbar=False)
    q_curves = np.asarray(q(model=model, x_batch=x, y_batch=np.zeros(2, int), a_batch=a,
                            device="cpu", softmax=False, channel_first=True))
    ours = deletion_scores(_ours(model), x[:, 0], a[:, 0], steps=16, fill=0.0)
    # Quantus records the points after each step (k = 1..n), ours also k = 0
    np.testing.assert_allclose(q_curves, ours.curves[:, 1:], atol=1e-5)


def test_cross_check_noise_aopc_against_quantus_region_perturbation() -> None:
    """The AOPC the study reports (Gaussian-noise MoRF, N(0, 0.1)) against Quantus's
    RegionPerturbation: Quantus ranks the 4x4 patches (by attribution sum), perturbs them
    cumulatively and runs the model; its perturbation adds, at each patch's pixels, the
    documented fixed noise field of the image (``default_rng([seed, i])``, drawn here, not by
    xcam), so a patch keeps its noise once perturbed. AOPC = sum_k (f0 - fk) / (L + 1)."""
    quantus = _quantus()
    model = SigmoidModel().eval()
    rng = np.random.default_rng(5)
    n, size, region, seed, mean, sd = 3, 16, 4, 11, 0.0, 0.1
    x = rng.random((n, 1, size, size)).astype(np.float32)
    a = rng.random((n, 1, size, size)).astype(np.float32)  # continuous: no tied patches
    noise = np.stack([np.random.default_rng([seed, i]).normal(mean, sd, (size, size))
                      .astype(np.float32) for i in range(n)]).reshape(n, -1)

    def add_fixed_noise(arr: np.ndarray, indices: np.ndarray, **_: object) -> np.ndarray:
        # arr: (N, H * W) (one channel, no padding as 16 % 4 == 0); indices: (N, patch px)
        rows = np.arange(len(arr))[:, None]
        out = arr.copy()
        out[rows, indices] = arr[rows, indices] + noise[rows, indices]
        return out

    for steps in (16, 5):  # every patch, and a truncated path
        q = quantus.RegionPerturbation(
            patch_size=region, regions_evaluation=steps, order="morf",
            perturb_func=add_fixed_noise, disable_warnings=True, display_progressbar=False)
        q_drops = np.asarray(q(model=model, x_batch=x, y_batch=np.zeros(n, int), a_batch=a,
                               device="cpu", softmax=False, channel_first=True))
        assert q_drops.shape == (n, steps)
        ours = morf_aopc(_ours(model), x[:, 0], a[:, 0], region=region,
                         steps=None if steps == 16 else steps, perturbation="gaussian_noise",
                         noise_mean=mean, noise_sd=sd, seed=seed, batch_size=5)
        np.testing.assert_allclose(ours.curves[:, :1] - ours.curves[:, 1:], q_drops, atol=1e-6)
        # the k = 0 term of the AOPC sum is 0
        np.testing.assert_allclose(ours.values, q_drops.sum(axis=1) / (steps + 1), atol=1e-7)
        assert np.abs(q_drops).max() > 1e-4  # the noise does move the prediction
