"""Tests for xcam_assets.evaluate.localization: hand-computed cases, edge cases, cross-checks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xcam_assets.evaluate.localization import (
    box_iou,
    boxes_to_mask,
    ehr_auc,
    energy_pointing_game,
    heatmap_argmax,
    imagenet_iou_threshold,
    iou_mask,
    point_localization_accuracy,
    pointing_game_hit,
    scale_boxes,
    weak_localization,
)

# 4x4 heatmap, total 24, maximum 8 at (row 2, col 2).
H4 = np.array(
    [
        [0.0, 1.0, 2.0, 0.0],
        [1.0, 5.0, 3.0, 0.0],
        [0.0, 2.0, 8.0, 1.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
)
CENTER = boxes_to_mask([(1, 1, 3, 3)], (4, 4))  # rows 1-2, cols 1-2: 5+3+2+8 = 18
TOP_LEFT = boxes_to_mask([(0, 0, 2, 2)], (4, 4))  # rows 0-1, cols 0-1: 0+1+1+5 = 7


def _mask(shape: tuple[int, int], pixels: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        m[r, c] = True
    return m


# --------------------------------------------------------------------------- boxes / IoU
def test_boxes_to_mask_exclusive_max() -> None:
    m = boxes_to_mask([(1, 0, 3, 2)], (3, 4))
    expected = np.array(
        [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    )
    np.testing.assert_array_equal(m, expected)


def test_boxes_to_mask_union_fraction_clip_degenerate() -> None:
    m = boxes_to_mask([(0.5, 0.5, 1.2, 1.0), (-2, -2, 1, 1), (3, 3, 3, 4)], (3, 4))
    # fractional box -> cols 0..1, row 0; clipped box -> pixel (0,0); degenerate -> nothing
    np.testing.assert_array_equal(np.argwhere(m), [[0, 0], [0, 1]])
    assert not boxes_to_mask([], (2, 2)).any()


def test_scale_boxes() -> None:
    assert scale_boxes([(100, 200, 300, 400)], (1024, 1024), (256, 256)) == [
        (25.0, 50.0, 75.0, 100.0)
    ]


def test_iou_mask_hand_computed() -> None:
    a = boxes_to_mask([(0, 0, 2, 2)], (3, 3))
    b = boxes_to_mask([(1, 1, 3, 3)], (3, 3))
    assert iou_mask(a, b) == pytest.approx(1 / 7)  # 1 shared pixel, 7 in the union
    assert iou_mask(a, a) == 1.0
    assert iou_mask(a, ~a) == 0.0
    assert math.isnan(iou_mask(np.zeros((2, 2), bool), np.zeros((2, 2), bool)))
    with pytest.raises(ValueError):
        iou_mask(np.zeros((2, 2)), np.zeros((2, 3)))


def test_box_iou_matches_mask_iou_for_integer_boxes() -> None:
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = np.sort(rng.integers(0, 10, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        b = np.sort(rng.integers(0, 10, (2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]]
        ma, mb = boxes_to_mask([a], (10, 10)), boxes_to_mask([b], (10, 10))
        if (ma | mb).any():
            assert box_iou(a, b) == pytest.approx(iou_mask(ma, mb))


# --------------------------------------------------------------------------- pointing game
def test_pointing_game_hand_computed() -> None:
    assert heatmap_argmax(H4) == (2, 2)
    assert pointing_game_hit(H4, CENTER) is True
    assert pointing_game_hit(H4, TOP_LEFT) is False
    # nearest TOP_LEFT pixel to (2,2) is (1,1), at distance sqrt(2) ~ 1.414
    assert pointing_game_hit(H4, TOP_LEFT, tolerance_px=1) is False
    assert pointing_game_hit(H4, TOP_LEFT, tolerance_px=1.5) is True
    # TorchRay convention: strictly less than the tolerance (pixel (2,0) is at distance 2)
    assert pointing_game_hit(H4, _mask((4, 4), [(2, 0)]), tolerance_px=2) is False
    assert pointing_game_hit(H4, _mask((4, 4), [(2, 0)]), tolerance_px=2.01) is True


def test_pointing_game_tie_uses_first_row_major_maximum() -> None:
    h = np.zeros((4, 4))
    h[0, 3] = h[3, 0] = 1.0
    assert heatmap_argmax(h) == (0, 3)
    assert pointing_game_hit(h, _mask((4, 4), [(0, 3)])) is True
    assert pointing_game_hit(h, _mask((4, 4), [(3, 0)])) is False  # Quantus would say True


def test_pointing_game_empty_region_and_bad_input() -> None:
    with pytest.raises(ValueError):
        pointing_game_hit(H4, np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError):
        pointing_game_hit(H4, np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError):
        pointing_game_hit(np.full((2, 2), np.nan), np.ones((2, 2), dtype=bool))
    with pytest.raises(ValueError):
        pointing_game_hit(H4, CENTER, tolerance_px=-1)


def test_pointing_game_tolerance_matches_torchray_rule() -> None:
    """Independent re-statement of TorchRay's rule: any mask pixel with d^2 < tol^2."""
    rng = np.random.default_rng(3)
    for _ in range(30):
        h = rng.random((40, 40))
        x0, y0 = rng.integers(0, 30, 2)
        region = boxes_to_mask([(x0, y0, x0 + 8, y0 + 8)], (40, 40))
        r, c = np.unravel_index(np.argmax(h), h.shape)
        v, u = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
        accept = (v - r) ** 2 + (u - c) ** 2 < 15**2
        assert pointing_game_hit(h, region, tolerance_px=15) == bool((region & accept).any())


# --------------------------------------------------------------------------- PYLON accuracy
def _peak(shape: tuple[int, int], row: int, col: int) -> np.ndarray:
    h = np.zeros(shape)
    h[row, col] = 1.0
    return h


def test_point_localization_accuracy_hand_computed() -> None:
    s = (4, 4)
    images = [
        # A: argmax (1,1) in box -> hit; B has an empty box list -> skipped
        ({"A": _peak(s, 1, 1)}, {"A": [(0, 0, 2, 2)], "B": []}),
        # A: 3 boxes, argmax (0,0) in none -> miss; B: argmax (0,0) in box -> hit
        (
            {"A": _peak(s, 0, 0), "B": _peak(s, 0, 0)},
            {"A": [(2, 2, 4, 4), (0, 3, 1, 4), (3, 0, 4, 1)], "B": [(0, 0, 1, 1)]},
        ),
        # no A box (A heatmap ignored); B: argmax (0,0) outside -> miss
        ({"A": _peak(s, 3, 3), "B": _peak(s, 0, 0)}, {"B": [(3, 3, 4, 4)]}),
        # B: hit
        ({"B": _peak(s, 1, 1)}, {"B": [(0, 0, 2, 2)]}),
    ]
    res = point_localization_accuracy(images)
    a, b = res.per_finding["A"], res.per_finding["B"]
    assert (a.hits, a.n_images, a.n_boxes, a.accuracy) == (1, 2, 4, 0.5)
    assert (b.hits, b.n_images, b.n_boxes) == (2, 3, 3)
    assert b.accuracy == pytest.approx(2 / 3)
    assert res.macro == pytest.approx(7 / 12)  # (1/2 + 2/3) / 2
    # weighted by boxed images (PYLON's official code), not boxes: (1/2 * 2 + 2/3 * 3) / 5
    assert res.box_weighted == pytest.approx(3 / 5)
    rows = res.rows()
    assert [r["finding"] for r in rows] == ["A", "B", "macro_average", "box_weighted_average"]
    assert rows[2]["n_images"] == 5 and rows[3]["n_boxes"] == 7

    # explicit findings: unknown finding gets nan and stays out of the averages
    res2 = point_localization_accuracy(images, findings=["B", "C"])
    assert list(res2.per_finding) == ["B", "C"]
    assert math.isnan(res2.per_finding["C"].accuracy)
    assert res2.macro == pytest.approx(2 / 3) and res2.box_weighted == pytest.approx(2 / 3)


def test_point_localization_accuracy_errors_and_empty() -> None:
    s = (4, 4)
    with pytest.raises(KeyError):
        point_localization_accuracy([({}, {"A": [(0, 0, 1, 1)]})])
    with pytest.raises(ValueError):  # box outside the heatmap frame
        point_localization_accuracy([({"A": _peak(s, 0, 0)}, {"A": [(10, 10, 20, 20)]})])
    empty = point_localization_accuracy([({"A": _peak(s, 0, 0)}, {})])
    assert empty.per_finding == {} and math.isnan(empty.macro) and math.isnan(empty.box_weighted)


# --------------------------------------------------------------------------- energy
def test_energy_pointing_game_hand_computed() -> None:
    # the literal definition on the map (baseline "none")
    assert energy_pointing_game(H4, CENTER, baseline="none") == pytest.approx(18 / 24)
    assert energy_pointing_game(H4, TOP_LEFT, baseline="none") == pytest.approx(7 / 24)
    assert energy_pointing_game(H4, np.ones((4, 4), bool), baseline="none") == 1.0
    # default: the heat above the median (1): [[0,0,1,0],[0,4,2,0],[0,1,7,0],[0,0,0,0]],
    # total 15, CENTER 4 + 2 + 1 + 7 = 14, TOP_LEFT 4
    assert energy_pointing_game(H4, CENTER) == pytest.approx(14 / 15)
    assert energy_pointing_game(H4, TOP_LEFT) == pytest.approx(4 / 15)
    # a signed map is fine with the median baseline (affine invariance)
    assert energy_pointing_game(2 * H4 - 3, CENTER) == pytest.approx(14 / 15)


def test_energy_pointing_game_edge_cases() -> None:
    # blank map: a failure (0), not nan
    assert energy_pointing_game(np.zeros((3, 3)), np.ones((3, 3), bool)) == 0.0
    assert energy_pointing_game(np.zeros((3, 3)), np.ones((3, 3), bool), baseline="none") == 0.0
    with pytest.raises(ValueError):
        energy_pointing_game(H4, np.zeros((4, 4), bool))
    with pytest.raises(ValueError):
        energy_pointing_game(H4 - 1.0, CENTER, baseline="none")


# --------------------------------------------------------------------------- weak localization
def _two_blobs() -> np.ndarray:
    h = np.zeros((8, 8))
    h[1:4, 1:4] = 1.0  # 9 px blob -> box (1, 1, 4, 4)
    h[6, 5:8] = 0.5  # 3 px blob
    h[0, 7] = 0.1  # below 15% of max: dropped
    return h


def test_imagenet_iou_threshold() -> None:
    assert imagenet_iou_threshold(3, 3) == pytest.approx(9 / 169)
    assert imagenet_iou_threshold(100, 100) == 0.5  # 10000/12100 > 0.5


def test_weak_localization_hand_computed() -> None:
    out = weak_localization(_two_blobs(), (2, 2, 5, 5))
    assert out["box"] == (1.0, 1.0, 4.0, 4.0)
    assert out["iou"] == pytest.approx(4 / 14)  # 2x2 overlap, 9 + 9 - 4 union
    assert out["iou_threshold"] == pytest.approx(9 / 169)
    assert out["hit"] is True and out["hit_at_05"] is False
    exact = weak_localization(_two_blobs(), (1, 1, 4, 4))
    assert exact["iou"] == 1.0 and exact["hit"] and exact["hit_at_05"]
    far = weak_localization(_two_blobs(), (5, 5, 8, 8))
    assert far["iou"] == 0.0 and not far["hit"]


def test_weak_localization_uses_8_connectivity_and_inclusive_threshold() -> None:
    h = np.zeros((6, 6))
    h[0, 0] = h[1, 1] = h[2, 2] = 1.0  # diagonal: one 3-px component only with 8-connectivity
    h[5, 3] = h[5, 4] = 0.15  # 2-px component, exactly at 15% of max: kept (>=)
    out = weak_localization(h, (0, 0, 3, 3))
    assert out["box"] == (0.0, 0.0, 3.0, 3.0) and out["iou"] == 1.0
    h2 = np.zeros((6, 6))
    h2[5, 3] = h2[5, 4] = 0.15
    h2[0, 0] = 1.0
    assert weak_localization(h2, (3, 5, 5, 6))["box"] == (3.0, 5.0, 5.0, 6.0)


def test_weak_localization_degenerate() -> None:
    out = weak_localization(np.zeros((4, 4)), (0, 0, 2, 2))
    assert out["box"] is None and out["iou"] == 0.0 and not out["hit"]
    with pytest.raises(ValueError):
        weak_localization(H4, (2, 2, 2, 3))


# --------------------------------------------------------------------------- EHR AUC
def _ehr_reference(heat01: np.ndarray, roi: np.ndarray) -> float:
    """Loop re-statement of the published EffectiveHeatRatios procedure (heat in [0, 1])."""
    heat = heat01.astype(float).copy()
    poi = heat >= 0.1
    heat[~poi] = 0.0
    values = heat[poi]
    qs = np.linspace(0, 1, 11)
    ratios = []
    for q in qs:
        t = min(np.quantile(values, q), heat.max() * 0.99)
        b = heat >= t
        ratios.append(heat[b & roi].sum() / b.sum())
    return float(np.trapezoid(ratios, qs))


def test_ehr_auc_hand_computed() -> None:
    # min-max -> [[0, .25], [.5, 1]]; V = {.25, .5, 1}; t_q = .25, .3, ..., .5 (q <= .5),
    # .6, ..., .9, .99. B_q sizes: 3 (q=0), 2 (q=.1-.5), 1 (q=.6-1).
    h = np.array([[0.0, 1.0], [2.0, 4.0]])
    # the published procedure on the map itself (baseline "none")
    # region = the max pixel: ratios 1/3, 1/2 x5, 1 x5 -> area 0.1*(47/6 - 2/3) = 43/60
    assert ehr_auc(h, _mask((2, 2), [(1, 1)]), baseline="none") == pytest.approx(43 / 60)
    # region = the 0.5 pixel: ratios 1/6, 1/4 x5, 0 x5 -> area 0.1*(1/6 + 5/4 - 1/12) = 2/15
    assert ehr_auc(h, _mask((2, 2), [(1, 0)]), baseline="none") == pytest.approx(2 / 15)
    # region = the zero pixel: no heat inside -> 0
    assert ehr_auc(h, _mask((2, 2), [(0, 0)]), baseline="none") == 0.0
    # affine rescaling does not matter (min-max)
    assert ehr_auc(3 * h + 7, _mask((2, 2), [(1, 1)]), baseline="none") == pytest.approx(43 / 60)
    # default (median 1.5 subtracted): heat [[0, 0], [.2, 1]] after min-max; V = {.2, 1};
    # t_q = .2 + .8q capped at .99: B_q = {.2, 1} at q = 0, {1} after. Max-pixel region:
    # ratios 1/2, then 1 x10 -> area 0.1 * (10.5 - 0.25 - 0.5) = 0.975
    assert ehr_auc(h, _mask((2, 2), [(1, 1)])) == pytest.approx(0.975)
    assert ehr_auc(3 * h + 7, _mask((2, 2), [(1, 1)])) == pytest.approx(0.975)


def test_ehr_auc_floor_zeroes_low_values() -> None:
    # 0.05 < 0.1 is zeroed and excluded from V = {.5, 1}: t_q = .5 + .5q capped at .99
    # region = the 0.5 pixel: ratio .5/2 = .25 at q=0 only, else 0 -> area 0.1 * .25 / 2
    h = np.array([[0.0, 0.05], [0.5, 1.0]])
    assert ehr_auc(h, _mask((2, 2), [(1, 0)]), baseline="none") == pytest.approx(0.0125)
    assert ehr_auc(h, _mask((2, 2), [(0, 1)]), baseline="none") == 0.0


def test_ehr_auc_edge_cases() -> None:
    # blank map: a failure (0), not nan
    assert ehr_auc(np.full((3, 3), 0.7), np.ones((3, 3), bool)) == 0.0
    assert ehr_auc(np.full((3, 3), 0.7), np.ones((3, 3), bool), baseline="none") == 0.0
    with pytest.raises(ValueError):
        ehr_auc(H4, np.zeros((4, 4), bool))


def test_ehr_auc_matches_reference_procedure() -> None:
    rng = np.random.default_rng(5)
    for _ in range(10):
        h = rng.random((16, 16)) ** 2
        h[0, 0], h[15, 15] = 0.0, 1.0  # already in [0, 1]: min-max is the identity
        x0, y0 = rng.integers(0, 10, 2)
        roi = boxes_to_mask([(x0, y0, x0 + 6, y0 + 6)], (16, 16))
        val = ehr_auc(h, roi, baseline="none")
        assert val == pytest.approx(_ehr_reference(h, roi), abs=1e-12)
        assert 0.0 <= val <= 1.0


# --------------------------------------------------------------------------- Quantus
def test_cross_check_against_quantus() -> None:
    try:  # the `crosscheck` extra, installed by `make setup`: missing fails, not skips
        import quantus
    except ModuleNotFoundError as exc:
        pytest.fail(f"{exc}: install xcam's `crosscheck` extra (make setup; see the README)")
    rng = np.random.default_rng(0)
    n, size = 40, 12
    heat = rng.random((n, 1, size, size))  # continuous: no tied maxima
    masks = np.zeros((n, 1, size, size))
    for i in range(n):
        x0, y0 = rng.integers(0, size - 4, 2)
        w, hh = rng.integers(2, 5, 2)
        masks[i, 0, y0 : y0 + hh, x0 : x0 + w] = 1
    # plant a maximum inside the mask for half the images so both outcomes occur
    for i in range(0, n, 2):
        r, c = np.argwhere(masks[i, 0])[0]
        heat[i, 0, r, c] = 2.0
    q_hits = quantus.PointingGame(disable_warnings=True).evaluate_batch(a_batch=heat, s_batch=masks)
    q_energy = quantus.RelevanceMassAccuracy(disable_warnings=True).evaluate_batch(
        a_batch=heat, s_batch=masks
    )
    ours_hits = [pointing_game_hit(heat[i, 0], masks[i, 0]) for i in range(n)]
    ours_energy = [energy_pointing_game(heat[i, 0], masks[i, 0], baseline="none")
                   for i in range(n)]
    np.testing.assert_array_equal(np.asarray(q_hits, dtype=bool), ours_hits)
    np.testing.assert_allclose(np.asarray(q_energy, dtype=float), ours_energy, rtol=1e-12)
    assert 0 < sum(ours_hits) < n
