"""Tests for xcam_assets.evaluate.tables (+ the metric_table GE suite): the long table's rows
on hand-built heatmaps, macro / box-weighted summaries, per-metric ranges, wide table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from xcam_assets.evaluate.diagnostic import (
    confusion_metrics,
    diagnostic_rows,
    macro_diagnostic_rows,
)
from xcam_assets.evaluate.localization import boxes_to_mask, ehr_auc
from xcam_assets.evaluate.tables import (
    BOX_WEIGHTED,
    MACRO,
    METRICS,
    diagnostic_table,
    evaluate_config,
    known_metrics,
    localization_table,
    mean_rows,
    metric_info,
    parse_boxes,
    region_boxes,
    to_frame,
    wide_table,
)
from xcam_assets.expectations import validate_frame
from xcam_assets.stats import bootstrap_ci, bootstrap_mean_ci

SUITE = Path(__file__).resolve().parents[2] / "resources" / "expectations" / "metric_table.yaml"

# three 4x4 images, findings a and b
BOXES = [{"a": [(1, 1, 3, 3)], "b": []},
         {"a": [(2, 2, 4, 4)], "b": []},
         {"a": [], "b": [(0, 0, 1, 1), (3, 3, 4, 4), (0, 3, 1, 4)]}]


def _fixture() -> tuple[np.ndarray, np.ndarray]:
    maps = np.zeros((3, 2, 4, 4))
    maps[0, 0, 2, 2], maps[0, 0, 2, 1], maps[0, 0, 0, 0] = 1.0, 0.9, 0.5
    maps[1, 0, 0, 0], maps[1, 0, 3, 3] = 1.0, 1.0   # argmax (0, 0): first in row-major order
    maps[2, 1, 3, 3], maps[2, 1, 1, 1] = 1.0, 0.2   # b: max inside a box
    regions = np.zeros((3, 2, 4, 4), np.uint8)
    for i, d in enumerate(BOXES):
        for k, f in enumerate("ab"):
            regions[i, k] = boxes_to_mask(d[f], (4, 4))
    return maps, regions


def _value(rows: list[dict], finding: str, metric: str) -> dict:
    hits = [r for r in rows if r["finding"] == finding and r["metric"] == metric]
    assert len(hits) == 1, (finding, metric, hits)
    return hits[0]


def test_localization_table_hand_computed() -> None:
    maps, regions = _fixture()
    rows = localization_table("net", "gradcam", ["a", "b"], maps, regions, n_boot=50, seed=0,
                              tolerance_px=15, boxes=BOXES)
    a = {m: _value(rows, "a", m) for m in
         ("pointing_game", "pointing_game_tol15px", "energy_pointing_game", "ehr_auc",
          "weak_localization_iou", "weak_localization_hit", "weak_localization_hit_iou50",
          "point_localization_accuracy")}
    assert a["pointing_game"]["value"] == 0.5 and a["pointing_game"]["n"] == 2
    # 15 px at 224 px is 15 * 4 / 224 = 0.27 px on these 4 px maps: (0, 0) is 2.8 px from
    # image 1's box -> still a miss (unscaled, 15 px would have made it a hit)
    assert a["pointing_game_tol15px"]["value"] == 0.5
    assert _value(rows, "a", "pointing_tolerance_px")["value"] == pytest.approx(15 * 4 / 224)
    assert _value(rows, "a", "small_box_margin_px")["value"] == pytest.approx(10 * 4 / 224)
    assert _value(rows, "a", "pointing_tolerance_px")["ci_low"] is None
    assert _value(rows, "a", "blank_map_rate")["value"] == 0.0
    # image 0: 1.9 of 2.4 inside; image 1: 1 of 2
    assert a["energy_pointing_game"]["value"] == pytest.approx((1.9 / 2.4 + 0.5) / 2)
    assert a["ehr_auc"]["value"] == pytest.approx(
        (ehr_auc(maps[0, 0], regions[0, 0]) + ehr_auc(maps[1, 0], regions[1, 0])) / 2)
    # image 0: >= 15% of max -> components {(2,1),(2,2)} (area 2) and {(0,0)}: box
    # (1, 2, 3, 3) vs gt (1, 1, 3, 3): IoU 2/4; image 1: box (0, 0, 1, 1): IoU 0
    assert a["weak_localization_iou"]["value"] == pytest.approx(0.25)
    assert a["weak_localization_hit"]["value"] == 0.5
    assert a["weak_localization_hit_iou50"]["value"] == 0.5
    assert a["point_localization_accuracy"]["value"] == 0.5
    b = _value(rows, "b", "point_localization_accuracy")
    assert (b["value"], b["n"]) == (1.0, 1)
    # macro (0.5 + 1) / 2; "box-weighted" by boxed images (PYLON's official code):
    # (0.5 * 2 + 1 * 1) / 3 images (by boxes it would be (0.5 * 2 + 1 * 3) / 5 = 0.8)
    assert _value(rows, MACRO, "point_localization_accuracy")["value"] == 0.75
    assert _value(rows, BOX_WEIGHTED, "point_localization_accuracy")["value"] == \
        pytest.approx(2 / 3)
    for r in rows:
        assert r["architecture"] == "net" and r["cam_method"] == "gradcam"
        assert r["ci_low"] is None or r["ci_low"] <= r["value"] + 1e-12 \
            or np.isnan(r["ci_low"])


def test_boxes_from_masks_when_none_annotated() -> None:
    maps, regions = _fixture()
    from_masks = localization_table("net", "m", ["a", "b"], maps, regions, n_boot=10, seed=0)
    from_boxes = localization_table("net", "m", ["a", "b"], maps, regions, n_boot=10, seed=0,
                                    boxes=BOXES)
    assert [r["value"] for r in from_masks] == [r["value"] for r in from_boxes]
    # components in label (row-major scan) order: (0,0), then row 3's (3,0) and (3,3)
    assert region_boxes(regions[2, 1]) == [(0.0, 0.0, 1.0, 1.0), (0.0, 3.0, 1.0, 4.0),
                                           (3.0, 3.0, 4.0, 4.0)]


def test_parse_boxes_from_manifest_json() -> None:
    got = parse_boxes([json.dumps({"a": [[1, 2, 3, 4]]}), None], ["a", "b"])
    assert got == [{"a": [(1.0, 2.0, 3.0, 4.0)], "b": []}, {"a": [], "b": []}]


def test_mean_rows_drop_nan_and_bootstrap() -> None:
    rows = mean_rows("n", "m", "f", {"aopc": [0.1, np.nan, 0.3], "empty": [np.nan]}, 100, 1)
    assert len(rows) == 1
    assert rows[0]["value"] == pytest.approx(0.2) and rows[0]["n"] == 2
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == bootstrap_mean_ci([0.1, 0.3], 100, 1)


def test_bootstrap_mean_ci_equals_generic_bootstrap() -> None:
    v = np.random.default_rng(2).random(23)
    assert bootstrap_mean_ci(v, n_boot=300, seed=4) == bootstrap_ci(np.mean, v, n_boot=300,
                                                                    seed=4)


# --------------------------------------------------------------------------- diagnostic
def test_macro_diagnostic_rows_hand_computed_and_joint_bootstrap() -> None:
    y = np.array([[1, 1], [1, 0], [0, 1], [0, 0]])
    s = np.array([[0.9, 0.9], [0.8, 0.8], [0.2, 0.3], [0.1, 0.7]])
    rows = {r["metric"]: r for r in macro_diagnostic_rows(y, s, [0.5, 0.5], n_boot=200, seed=3)}
    # finding 0: perfect; finding 1: pred 1,1,0,1 vs 1,0,1,0: tp1 fp2 fn1 tn0
    assert rows["accuracy"]["value"] == pytest.approx((1.0 + 0.25) / 2)
    assert rows["precision"]["value"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert rows["sensitivity"]["value"] == pytest.approx((1.0 + 0.5) / 2)
    assert rows["specificity"]["value"] == pytest.approx((1.0 + 0.0) / 2)
    assert rows["auc"]["value"] == pytest.approx((1.0 + 0.5) / 2)  # finding 1: 2 of 4 pairs
    assert rows["accuracy"]["n"] == 4

    def macro_acc(yy: np.ndarray, ss: np.ndarray) -> float:
        return float(np.mean([confusion_metrics(yy[:, f], ss[:, f] >= 0.5)["accuracy"]
                              for f in range(2)]))

    assert (rows["accuracy"]["ci_low"], rows["accuracy"]["ci_high"]) == pytest.approx(
        bootstrap_ci(macro_acc, y, s, n_boot=200, seed=3))


def test_diagnostic_table_adds_macro_rows_for_several_findings() -> None:
    rng = np.random.default_rng(0)
    frames = []
    for split in ("val", "test"):
        for f in ("a", "b"):
            lab = rng.integers(0, 2, 30)
            frames.append(pl.DataFrame({"image_key": [f"k{i}" for i in range(30)],
                                        "split": split, "finding": f, "label": lab,
                                        "probability": np.clip(lab * 0.3 + rng.random(30) * 0.7,
                                                               0, 1)}))
    rows = diagnostic_table("net", pl.concat(frames), n_boot=20, seed=0)
    macro = [r for r in rows if r["finding"] == MACRO]
    assert [r["metric"] for r in macro] == ["accuracy", "precision", "sensitivity",
                                            "specificity", "f1", "auc"]
    per = {(r["finding"], r["metric"]): r["value"] for r in rows}
    assert macro[-1]["value"] == pytest.approx((per[("a", "auc")] + per[("b", "auc")]) / 2)


# --------------------------------------------------------------------------- config / wide
def test_evaluate_config_merges_defaults_params_profile() -> None:
    cfg = evaluate_config({"evaluate": {"tolerance_px": 10, "faithfulness": {"max_images": 9}}},
                          {"evaluate": {"faithfulness": {"aopc": {"steps": 5}}}})
    assert cfg["tolerance_px"] == 10
    assert cfg["faithfulness"]["max_images"] == 9
    assert cfg["faithfulness"]["aopc"]["steps"] == 5
    assert cfg["faithfulness"]["aopc"]["region_px"] == 34
    assert cfg["faithfulness"]["aopc"]["noise_sd"] == 0.1


def test_wide_table_spreads_diagnostics_onto_method_rows() -> None:
    rows = diagnostic_rows([1, 0, 1, 0], [0.9, 0.2, 0.7, 0.6], 0.5, n_boot=10)
    long = to_frame(
        [{"architecture": "net", "cam_method": None, "finding": "a", **r} for r in rows]
        + mean_rows("net", "gradcam", "a", {"aopc": [0.2, 0.4]}, 10, 0)
        + mean_rows("net", "eigencam", "a", {"aopc": [0.1]}, 10, 0)
        + [{"architecture": "other", "cam_method": None, "finding": "a", **rows[0]}])
    wide = wide_table(long)
    assert wide.columns[:3] == ["architecture", "cam_method", "finding"]
    assert wide.select("architecture", "cam_method").rows() == [
        ("net", "eigencam"), ("net", "gradcam"), ("other", "-")]
    assert wide["accuracy"][0] == wide["accuracy"][1] and wide["accuracy"][0].startswith("0.75")
    assert wide["aopc"][1].startswith("0.3 [")
    assert wide.columns.index("auc") < wide.columns.index("aopc")


# --------------------------------------------------------------------------- GE suite
def _frame(rows: list[tuple[str, float]]) -> pl.DataFrame:
    return pl.DataFrame({"architecture": "net", "cam_method": "m", "finding": "a",
                         "metric": [m for m, _ in rows], "value": [v for _, v in rows],
                         "ci_low": [v for _, v in rows], "ci_high": [v for _, v in rows],
                         "n": 5})


def test_suite_encodes_per_metric_ranges() -> None:
    ok = _frame([("aopc", -0.5), ("road_morf", -0.2), ("auc", 0.9), ("deletion_auc", 0.1),
                 ("pointing_game_tol15px", 1.0)])
    assert validate_frame(ok, SUITE).success
    for metric, value in (("aopc", 1.5), ("deletion_auc", -0.1), ("auc", -0.5),
                          ("masked_out_area", 1.2), ("diffgradcam", 0.5)):
        outcome = validate_frame(_frame([("aopc", 0.1), (metric, value)]), SUITE)
        assert not outcome.success, (metric, value)
    dup = _frame([("aopc", 0.1), ("aopc", 0.2)])
    assert not validate_frame(dup, SUITE).success


def test_suite_and_metrics_registry_agree() -> None:
    spec = yaml.safe_load(SUITE.read_text())
    regex = next(e["kwargs"]["regex"] for e in spec
                 if e["type"] == "expect_column_values_to_match_regex")
    ranged = {}
    for e in spec:
        kw = e["kwargs"]
        if e["type"] == "expect_column_values_to_be_between" and kw.get("column") == "value":
            ranged[(kw["min_value"], kw["max_value"])] = kw["row_condition"]
    for name in known_metrics(15):
        assert re.match(regex, name), name
        lo, hi, _ = metric_info(name)
        cond = ranged[(lo, hi)]
        assert (name in cond) or re.search(r'str\.match\("([^"]+)"\)', cond) and re.match(
            re.search(r'str\.match\("([^"]+)"\)', cond).group(1), name), name
    assert set(METRICS) >= {"aopc", "deletion_auc", "insertion_auc", "masked_out_area",
                            "road_combined", "ehr_auc", "point_localization_accuracy"}
    assert "diffgradcam" not in METRICS
