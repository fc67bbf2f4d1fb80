"""The localization rules of issue #17, on hand-computed cases: blank maps are failures
for every metric (all images stay in n), one normalisation for ReLU and no-ReLU maps,
tolerances defined at 224 px and scaled, PYLON's IoU, the AOPC block grid, and PYLON's
"box-weighted" average weighted by boxed images."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from aopc_reference import morf_aopc_stepwise

from xcam_assets.evaluate.faithfulness import grid_tiles, morf_aopc, tile_order
from xcam_assets.evaluate.localization import (
    boxes_to_mask,
    ehr_auc,
    energy_pointing_game,
    imagenet_iou_threshold,
    is_blank,
    point_localization_accuracy,
    pointing_game_hit,
    pylon_iou,
    scaled_px,
    weak_localization,
)
from xcam_assets.evaluate.tables import (
    BOX_WEIGHTED,
    MACRO,
    PARAMETERS,
    evaluate_config,
    localization_table,
    mean_rows,
    to_frame,
    wide_table,
)
from xcam_assets.expectations import validate_frame

SUITE = Path(__file__).resolve().parents[2] / "resources" / "expectations" / "metric_table.yaml"


def _regions(boxes: list[dict], findings: str, size: int = 4) -> np.ndarray:
    """(N, F, size, size) masks of each image's boxes per finding."""
    return np.stack([np.stack([boxes_to_mask(d[f], (size, size)) for f in findings])
                     for d in boxes]).astype(np.uint8)


def _rows_of(rows: list[dict], finding: str) -> dict[str, dict]:
    out = {r["metric"]: r for r in rows if r["finding"] == finding}
    assert len(out) == len([r for r in rows if r["finding"] == finding])
    return out


# --------------------------------------------------------------------------- blank maps
def _blank_fixture() -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Four 8x8 images, one finding, box (0, 0, 4, 4) (rows/cols 0-3) on each: two
    informative maps and two blank (all-zero) maps. Before the rule a blank map's argmax
    was pixel (0, 0), inside the box: a pointing-game *hit*, and energy / EHR were nan
    (dropped: n = 2)."""
    maps = np.zeros((4, 1, 8, 8), np.float32)
    maps[0, 0, 1, 1], maps[0, 0, 6, 6] = 1.0, 0.5   # peak inside, some heat outside
    maps[1, 0, 6, 6], maps[1, 0, 1, 1] = 1.0, 0.5   # peak outside, some heat inside
    box = (0.0, 0.0, 4.0, 4.0)
    regions = np.repeat(boxes_to_mask([box], (8, 8))[None, None], 4, axis=0).astype(np.uint8)
    return maps, regions, [{"a": [box]} for _ in range(4)]


def test_blank_maps_are_failures_for_every_metric_and_stay_in_n() -> None:
    maps, regions, boxes = _blank_fixture()
    # the explain stage records the float32 argmax (0, 0) of an all-zero map: still a miss
    peaks = np.array([[[1, 1]], [[6, 6]], [[0, 0]], [[0, 0]]], np.int32)
    rows = localization_table("net", "gradcam", ["a"], maps, regions, n_boot=50, seed=0,
                              boxes=boxes, peaks=peaks)
    a = _rows_of(rows, "a")
    # every metric of the finding rests on the same 4 images
    assert {r["n"] for r in a.values()} == {4}
    assert a["blank_map_rate"]["value"] == 0.5
    assert a["pointing_game"]["value"] == 0.25          # hit, miss, miss, miss
    assert a["pointing_game_tol15px"]["value"] == 0.25  # tolerance 15 * 8 / 224 = 0.54 px
    assert a["point_localization_accuracy"]["value"] == 0.25
    # energy: 1 / 1.5, 0.5 / 1.5, 0, 0 (medians are 0: the maps are unchanged)
    assert a["energy_pointing_game"]["value"] == pytest.approx((2 / 3 + 1 / 3) / 4)
    # EHR: image 0: V = {.5, 1}, t_q = .5 + .5q: ratios 1/2 then 1 x10 -> 0.975;
    # image 1: ratios 1/4 then 0 x10 -> 0.1 * 0.25 / 2 = 0.0125; blanks 0
    assert ehr_auc(maps[0, 0], regions[0, 0]) == pytest.approx(0.975)
    assert ehr_auc(maps[1, 0], regions[1, 0]) == pytest.approx(0.0125)
    assert a["ehr_auc"]["value"] == pytest.approx((0.975 + 0.0125) / 4)
    # weak localization: two equal 1 px components, the first in row-major order (1, 1)
    # wins on both informative maps: IoU 1/16 each; blanks: no box, IoU 0
    assert a["weak_localization_iou"]["value"] == pytest.approx(2 / 16 / 4)
    assert a["weak_localization_hit"]["value"] == 0.0
    # PYLON IoU: image 0 keeps (1, 1) only (0.5 is not > 0.5): 1/16; image 1 keeps (6, 6): 0
    assert a["pylon_iou"]["value"] == pytest.approx(1 / 16 / 4)
    for r in a.values():
        assert np.isfinite(r["value"])


def test_blank_map_metric_functions() -> None:
    blank = np.zeros((4, 4))
    region = boxes_to_mask([(0, 0, 2, 2)], (4, 4))
    assert is_blank(blank) and is_blank(np.full((3, 3), 0.7)) and not is_blank(np.eye(3))
    assert pointing_game_hit(blank, region) is False      # (0, 0) is inside: still a miss
    assert pointing_game_hit(blank, region, tolerance_px=50) is False
    assert energy_pointing_game(blank, region) == 0.0
    assert ehr_auc(np.full((4, 4), 0.3), region) == 0.0
    assert pylon_iou(blank, region) == 0.0
    out = weak_localization(np.full((4, 4), 0.3), (0, 0, 2, 2))
    assert out["box"] is None and out["iou"] == 0.0 and not out["hit"]
    res = point_localization_accuracy([({"A": blank}, {"A": [(0, 0, 2, 2)]})])
    assert res.per_finding["A"].hits == 0 and res.per_finding["A"].n_images == 1


# --------------------------------------------------------------------------- normalisation
def _stored(evidence: np.ndarray, relu: bool) -> np.ndarray:
    """The stored form of a CAM: ReLU (optional), then min-max to [0, 1] (pytorch-grad-cam
    ``scale_cam_image``)."""
    m = np.maximum(evidence, 0.0) if relu else evidence
    return (m - m.min()) / (m.max() - m.min())


def test_relu_and_no_relu_maps_of_the_same_evidence_score_alike() -> None:
    # signed evidence: +1 on the finding (rows/cols 2-3), -1 on a distractor, 0 elsewhere
    e = np.zeros((10, 10))
    e[2:4, 2:4] = 1.0
    e[7:9, 7:9] = -1.0
    region = boxes_to_mask([(2, 2, 4, 4)], (10, 10))
    relu, raw = _stored(e, relu=True), _stored(e, relu=False)
    # literal definitions on the stored maps: 1.0 vs 4 / (4 + 92 * 0.5) = 0.08
    assert energy_pointing_game(relu, region, baseline="none") == 1.0
    assert energy_pointing_game(raw, region, baseline="none") == pytest.approx(0.08)
    assert ehr_auc(raw, region, baseline="none") < 0.5
    # the platform's normalisation (heat above the median, 0.5 on the no-ReLU map): equal
    for fn in (energy_pointing_game, ehr_auc, pylon_iou):
        assert fn(relu, region) == pytest.approx(1.0)
        assert fn(raw, region) == pytest.approx(1.0)
    assert weak_localization(raw, (2, 2, 4, 4))["iou"] == 1.0
    assert weak_localization(relu, (2, 2, 4, 4))["iou"] == 1.0


def test_normalisation_on_graded_evidence() -> None:
    """Graded positive evidence, partly outside the box, and negative evidence: with most
    pixels at zero evidence the two stored forms give the same values (not 1.0)."""
    e = np.zeros((16, 16))
    e[3:7, 3:7] = np.arange(16).reshape(4, 4) / 15.0 + 0.1
    e[5:9, 8] = 0.4                      # positive evidence outside the box
    e[10:13, 10:13] = -0.7               # negative evidence
    e[12, 2] = 0.3
    region = boxes_to_mask([(3, 3, 7, 7)], (16, 16))
    relu, raw = _stored(e, relu=True), _stored(e, relu=False)
    for fn in (energy_pointing_game, ehr_auc, pylon_iou):
        a, b = fn(relu, region), fn(raw, region)
        assert a == pytest.approx(b, abs=1e-12)
        assert 0.0 < a < 1.0
    assert energy_pointing_game(relu, region) == pytest.approx(
        e[region].sum() / np.maximum(e, 0).sum())
    wa, wb = weak_localization(relu, (3, 3, 7, 7)), weak_localization(raw, (3, 3, 7, 7))
    assert wa["box"] == wb["box"] and wa["iou"] == pytest.approx(wb["iou"])


# --------------------------------------------------------------------------- tolerance
def _geometry(size: int, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """A box at [0.5, 0.75) of the image and a single peak ``offset`` (fraction of the
    side) to the left of it, at any size."""
    h = np.zeros((size, size), np.float32)
    h[int(0.6 * size), int(round((0.5 - offset) * size))] = 1.0
    x0, x1 = 0.5 * size, 0.75 * size
    region = boxes_to_mask([(x0, x0, x1, x1)], (size, size))
    return h, region


@pytest.mark.parametrize("offset,hit", [(0.05, True), (0.08, False)])
def test_scaled_tolerance_gives_the_same_hit_at_every_size(offset: float, hit: bool) -> None:
    assert scaled_px(15, 224) == 15.0
    assert scaled_px(15, 128) == pytest.approx(8.5714, abs=1e-4)
    assert scaled_px(15, 512) == pytest.approx(34.2857, abs=1e-4)
    for size in (128, 224, 512):
        h, region = _geometry(size, offset)
        assert pointing_game_hit(h, region, tolerance_px=scaled_px(15, size)) is hit, size
        rows = localization_table("net", "m", ["a"], h[None, None], region[None, None],
                                  n_boot=10, seed=0, tolerance_px=15)
        a = _rows_of(rows, "a")
        assert a["pointing_game_tol15px"]["value"] == float(hit), size
        assert a["pointing_tolerance_px"]["value"] == pytest.approx(15 * size / 224)
        assert a["small_box_margin_px"]["value"] == pytest.approx(10 * size / 224)
        assert a["pointing_tolerance_px"]["ci_low"] is None
    # unscaled, 15 px at 128 px would call the 0.08 geometry (10 px away) a hit
    h, region = _geometry(128, 0.08)
    assert pointing_game_hit(h, region, tolerance_px=15) is True


def test_scaled_small_box_margin_keeps_the_imagenet_bar() -> None:
    # a box of 10% of the side: the same IoU bar at every size once the margin is scaled
    bars = [imagenet_iou_threshold(0.1 * s, 0.1 * s, margin=scaled_px(10, s))
            for s in (128, 224, 512)]
    assert bars == pytest.approx([bars[1]] * 3)
    assert bars[1] == pytest.approx(22.4**2 / 32.4**2)


# --------------------------------------------------------------------------- PYLON IoU
def _iou_map() -> np.ndarray:
    h = np.zeros((4, 4))
    h[0, 1], h[0, 2], h[0, 3], h[1, 2], h[1, 3] = 0.2, 0.6, 1.0, 0.8, 0.4
    h[3, 0] = 0.5  # exactly half of the max: not kept (strictly greater, as PYLON's code)
    return h


def test_pylon_iou_hand_computed() -> None:
    # kept: (0, 2), (0, 3), (1, 2); box rows 0-1, cols 2-3: 4 px -> IoU 3 / 4
    box = boxes_to_mask([(2, 0, 4, 2)], (4, 4))
    assert pylon_iou(_iou_map(), box) == pytest.approx(0.75)
    assert pylon_iou(_iou_map(), box, threshold=0.3) == pytest.approx(4 / 5)  # + (3, 0)
    assert pylon_iou(_iou_map(), boxes_to_mask([(0, 2, 2, 4)], (4, 4))) == 0.0


def test_pylon_iou_rows_per_finding_macro_and_image_weighted() -> None:
    maps = np.zeros((3, 2, 4, 4))
    maps[0, 0] = _iou_map()                 # a: IoU 3/4
    maps[1, 0, 3, 3] = 1.0                  # a: kept (3, 3), box elsewhere: IoU 0
    maps[2, 1, 0:2, 2:4] = 1.0              # b: the box exactly: IoU 1
    boxes = [{"a": [(2, 0, 4, 2)], "b": []}, {"a": [(0, 0, 2, 2)], "b": []},
             {"a": [], "b": [(2, 0, 4, 2)]}]
    regions = _regions(boxes, "ab")
    rows = localization_table("net", "m", ["a", "b"], maps, regions, n_boot=200, seed=0,
                              boxes=boxes)
    a, b = _rows_of(rows, "a")["pylon_iou"], _rows_of(rows, "b")["pylon_iou"]
    assert (a["value"], a["n"]) == (pytest.approx(0.375), 2)
    assert (b["value"], b["n"]) == (1.0, 1)
    assert a["ci_low"] <= a["value"] <= a["ci_high"]
    macro = _rows_of(rows, MACRO)["pylon_iou"]
    weighted = _rows_of(rows, BOX_WEIGHTED)["pylon_iou"]
    assert macro["value"] == pytest.approx((0.375 + 1.0) / 2)
    assert weighted["value"] == pytest.approx((0.75 + 0.0 + 1.0) / 3)  # by boxed images
    assert macro["n"] == weighted["n"] == 3
    assert macro["ci_low"] <= macro["value"] <= macro["ci_high"]


# --------------------------------------------------------------------------- box weighting
def _peak(row: int, col: int) -> np.ndarray:
    h = np.zeros((4, 4))
    h[row, col] = 1.0
    return h


def test_box_weighted_average_weights_findings_by_boxed_images() -> None:
    # A: one image with 3 boxes, a hit; B: two images with one box each, both misses
    images = [({"A": _peak(0, 0)}, {"A": [(0, 0, 1, 1), (2, 2, 3, 3), (3, 3, 4, 4)]}),
              ({"B": _peak(0, 0)}, {"B": [(3, 3, 4, 4)]}),
              ({"B": _peak(0, 0)}, {"B": [(2, 2, 4, 4)]})]
    res = point_localization_accuracy(images)
    assert res.macro == 0.5
    assert res.box_weighted == pytest.approx((1.0 * 1 + 0.0 * 2) / 3)  # not 3/5 by boxes
    assert res.per_finding["A"].n_boxes == 3
    maps = np.stack([np.stack([_peak(0, 0), _peak(0, 0)])] * 3)
    boxes = [{"A": images[0][1]["A"], "B": []}, {"A": [], "B": images[1][1]["B"]},
             {"A": [], "B": images[2][1]["B"]}]
    regions = _regions(boxes, "AB")
    rows = localization_table("net", "m", ["A", "B"], maps, regions, n_boot=50, seed=0,
                              boxes=boxes)
    assert _rows_of(rows, BOX_WEIGHTED)["point_localization_accuracy"]["value"] == \
        pytest.approx(1 / 3)
    assert _rows_of(rows, MACRO)["point_localization_accuracy"]["value"] == 0.5


# --------------------------------------------------------------------------- AOPC grid
def _mean_predictor(batch: np.ndarray) -> np.ndarray:
    return np.asarray(batch, dtype=np.float64).reshape(len(batch), -1).mean(axis=1)


def test_grid_tiles_partition_the_image() -> None:
    assert grid_tiles((6, 6), 3) == [(0, 2, 0, 2), (0, 2, 2, 4), (0, 2, 4, 6),
                                     (2, 4, 0, 2), (2, 4, 2, 4), (2, 4, 4, 6),
                                     (4, 6, 0, 2), (4, 6, 2, 4), (4, 6, 4, 6)]
    # 7 px at grid 3: edges floor(7i / 3) = 0, 2, 4, 7
    assert [t for t in grid_tiles((7, 7), 3) if t[0] == 0] == [(0, 2, 0, 2), (0, 2, 2, 4),
                                                               (0, 2, 4, 7)]
    # 64 px at grid 9 (the tiny profile): eight 7 px blocks and an 8 px one, 81 in all
    tiles = grid_tiles((64, 64), 9)
    assert len(tiles) == 81 and tiles[8] == (0, 7, 56, 64)
    covered = np.zeros((64, 64), int)
    for r0, r1, c0, c1 in tiles:
        covered[r0:r1, c0:c1] += 1
    assert (covered == 1).all()
    with pytest.raises(ValueError):
        grid_tiles((4, 4), 5)


def test_morf_aopc_on_a_grid_hand_computed() -> None:
    # 7x7 ones, grid 3; the hottest block is the 3x3 bottom-right one (rows/cols 4-6), then
    # the 2x3 block above it (rows 2-3, cols 4-6); predictor = image mean, fill 0
    h = np.zeros((7, 7))
    h[4:7, 4:7] = 1.0
    h[2:4, 4:7] = 0.5
    assert tile_order(h, grid=3)[:2] == [(4, 7, 4, 7), (2, 4, 4, 7)]
    res = morf_aopc(_mean_predictor, np.ones((1, 7, 7)), h[None], grid=3, steps=2,
                    perturbation="constant", fill=0.0)
    # f(x_0) = 1, f(x_1) = 1 - 9/49, f(x_2) = 1 - 15/49: AOPC = (9 + 15) / 49 / 3
    np.testing.assert_allclose(res.curves[0], [1.0, 40 / 49, 34 / 49])
    assert res.values[0] == pytest.approx(24 / 49 / 3)
    assert res.params == {"grid": 3, "steps": 2}
    ref = morf_aopc_stepwise(_mean_predictor, np.ones((1, 7, 7)), h[None], grid=3, steps=2,
                             perturbation="constant", fill=0.0)
    np.testing.assert_allclose(ref.values, res.values)
    # every block (L = 9): params record it
    assert morf_aopc(_mean_predictor, np.ones((1, 7, 7)), h[None], grid=3,
                     perturbation="constant").params == {"grid": 3, "steps": 9}
    with pytest.raises(ValueError):
        morf_aopc(_mean_predictor, np.ones((1, 7, 7)), h[None])  # neither region nor grid


def test_aopc_config_defaults_to_the_9x9_grid() -> None:
    cfg = evaluate_config({}, {"evaluate": {"faithfulness": {"aopc": {"steps": 16}}}})
    assert cfg["faithfulness"]["aopc"]["grid"] == 9
    assert cfg["faithfulness"]["aopc"]["steps"] == 16
    square = evaluate_config({}, {"evaluate": {"faithfulness": {"aopc": {"grid": None}}}})
    assert square["faithfulness"]["aopc"]["grid"] is None
    assert square["faithfulness"]["aopc"]["region_px"] == 34


# --------------------------------------------------------------------------- table / suite
def test_wide_table_shows_n_in_every_cell_and_parameters_have_no_ci() -> None:
    long = to_frame(mean_rows("net", "gradcam", "a",
                              {"aopc": [0.2, 0.4], "aopc_grid": [9.0, 9.0],
                               "aopc_steps": [16.0, 16.0]}, 20, 0))
    assert set(PARAMETERS) >= {"aopc_grid", "aopc_steps"}
    grid_row = long.filter(pl.col("metric") == "aopc_grid").row(0, named=True)
    assert grid_row["ci_low"] is None and grid_row["n"] == 2
    wide = wide_table(long)
    assert wide["aopc"][0].startswith("0.3 [") and wide["aopc"][0].endswith("] n=2")
    assert wide["aopc_grid"][0] == "9.0 n=2" and wide["aopc_steps"][0] == "16.0 n=2"


def test_suite_accepts_the_new_rows() -> None:
    maps, regions, boxes = _blank_fixture()
    frame = to_frame(localization_table("net", "gradcam", ["a"], maps, regions, n_boot=20,
                                        seed=0, boxes=boxes))
    assert {"blank_map_rate", "pylon_iou", "pointing_tolerance_px",
            "small_box_margin_px"} <= set(frame["metric"].to_list())
    assert validate_frame(frame, SUITE).success
    bad = frame.with_columns(pl.when(pl.col("metric") == "pointing_tolerance_px")
                             .then(-1.0).otherwise(pl.col("value")).alias("value"))
    assert not validate_frame(bad, SUITE).success
    assert not math.isnan(frame["value"].sum())
