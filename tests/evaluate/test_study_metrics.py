"""The NIH study's additions, on hand-computed cases: AUC within each view, point
localization from float32 peaks (no float16 ties), heatmaps of the positives only, and the
derived `Abnormal` finding of the NIH adapter."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
from real_data import shared_data
from torch import nn

from xcam_assets.evaluate.localization import boxes_to_mask
from xcam_assets.evaluate.tables import localization_table, metric_info, view_auc_rows
from xcam_assets.explain.cams import heatmap_stack
from xcam_assets.ingest.adapters.nih import ABNORMAL, read_nih


def _preds() -> pl.DataFrame:
    keys = [f"k{i}" for i in range(8)]
    return pl.DataFrame({
        "image_key": keys, "split": ["test"] * 7 + ["val"], "finding": "Abnormal",
        "label": [0, 1, 0, 1, 0, 1, 1, 1],
        "probability": [0.1, 0.9, 0.2, 0.8, 0.6, 0.5, 0.7, 0.3]})


def test_view_auc_rows_hand_computed() -> None:
    views = {"k0": "PA", "k1": "PA", "k2": "PA", "k3": "PA", "k4": "AP", "k5": "AP",
             "k6": "AP", "k7": "AP"}
    rows = {r["metric"]: r for r in view_auc_rows("net", _preds(), views, "Abnormal",
                                                  n_boot=200, seed=0)}
    assert set(rows) == {"auc_view_AP", "auc_view_PA"}
    assert rows["auc_view_PA"]["value"] == 1.0 and rows["auc_view_PA"]["n"] == 4
    # AP: positives 0.5, 0.7 against the negative 0.6: one of two pairs ordered -> 0.5
    assert rows["auc_view_AP"]["value"] == 0.5 and rows["auc_view_AP"]["n"] == 3
    assert rows["auc_view_AP"]["ci_low"] <= 0.5 <= rows["auc_view_AP"]["ci_high"]
    assert metric_info("auc_view_AP") == metric_info("auc")


def test_a_view_with_one_class_gives_no_row() -> None:
    views = {"k0": "PA", "k1": "AP", "k2": "PA", "k3": "AP", "k4": "AP", "k5": "AP",
             "k6": "AP"}
    rows = view_auc_rows("net", _preds(), views, "Abnormal", n_boot=50, seed=0)
    assert [r["metric"] for r in rows] == ["auc_view_AP"]  # PA holds negatives only


def test_point_localization_uses_the_float32_peak() -> None:
    """Two maxima tie in the stored map (first one, outside the box, wins the argmax); the
    float32 peak recorded before storage lies in the box: a hit with peaks, a miss without."""
    maps = np.zeros((1, 1, 8, 8), np.float32)
    maps[0, 0, 0, 0] = maps[0, 0, 5, 5] = 1.0
    box = [(4.0, 4.0, 7.0, 7.0)]
    regions = boxes_to_mask(box, (8, 8))[None, None].astype(np.uint8)
    boxes = [{"a": box}]

    def plc(peaks: np.ndarray | None) -> float:
        rows = localization_table("net", "pylon", ["a"], maps, regions, n_boot=10, seed=0,
                                  boxes=boxes, peaks=peaks)
        return next(r["value"] for r in rows if r["finding"] == "a"
                    and r["metric"] == "point_localization_accuracy")

    assert plc(None) == 0.0
    assert plc(np.array([[[5, 5]]], np.int32)) == 1.0
    assert plc(np.array([[[-1, -1]]], np.int32)) == 0.0  # no recorded peak: the map's own


class _Gap(nn.Module):
    """Logit k = mean of channel k of a 1x1 conv: a model pytorch-grad-cam can explain."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(-2, -1))


def test_heatmap_stack_positives_only_and_peaks() -> None:
    torch.manual_seed(0)
    model = _Gap().eval()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 16, 16), dtype=np.uint8)
    only = np.array([[True, False], [False, False], [True, True]])
    full = heatmap_stack(model, [model.conv], images, "gradcam-norelu", 2, batch_size=2)
    peaks = np.zeros((3, 2, 2), np.int32)
    part = heatmap_stack(model, [model.conv], images, "gradcam-norelu", 2, batch_size=2,
                         only=only, peaks=peaks)
    assert np.array_equal(part[only], full[only])
    assert not part[~only].any()
    assert (peaks[~only] == -1).all()
    for i, k in zip(*np.nonzero(only), strict=True):
        r, c = peaks[i, k]
        assert full[i, k, r, c] == full[i, k].max()


def test_nih_adapter_derives_abnormal(tmp_path) -> None:
    table = tmp_path / "Data_Entry_2017_v2020.csv"
    table.write_text("Image Index,Finding Labels,Patient ID\n"
                     "a.png,No Finding,1\nb.png,Mass|Nodule,1\nc.png,Hernia,2\n")
    rows = read_nih(table, abnormal=True).filter(pl.col("finding") == ABNORMAL).sort("file")
    assert rows["present"].to_list() == [False, True, True]
    assert rows["patient_id"].to_list() == ["1", "1", "2"]
    plain = read_nih(table)
    assert ABNORMAL not in plain["finding"].to_list()
    assert read_nih(table, abnormal=True).height == plain.height + 3


def test_nih_adapter_abnormal_on_the_real_table() -> None:
    root = shared_data("nih-cxr14")
    rows = read_nih(root / "Data_Entry_2017_v2020.csv", abnormal=True)
    flags = rows.filter(pl.col("finding") == ABNORMAL)["present"]
    # the data README: 496 `No Finding` among 1,948 images
    assert (flags.len(), int((~flags).sum())) == (1948, 496)


def test_view_rows_pass_the_metric_table_suite() -> None:
    """The blocking GE suite knows the per-view AUC rows (an unknown metric would block)."""
    from pathlib import Path

    from xcam_assets.evaluate.tables import to_frame
    from xcam_assets.expectations import validate_frame

    views = {"k0": "PA", "k1": "PA", "k2": "PA", "k3": "PA", "k4": "AP", "k5": "AP",
             "k6": "AP"}
    rows = view_auc_rows("net", _preds(), views, "Abnormal", n_boot=50, seed=0)
    suite = Path(__file__).resolve().parents[2] / "resources" / "expectations" / \
        "metric_table.yaml"
    assert validate_frame(to_frame(rows), suite).success
    bad = to_frame(rows).with_columns(pl.lit(1.5).alias("value"))
    assert not validate_frame(bad, suite).success


def test_localization_summary_is_pylons_table() -> None:
    from xcam_assets.evaluate.tables import BOX_WEIGHTED, MACRO, localization_summary, to_frame

    rows = [
        {"architecture": "pylon", "cam_method": "pylon", "finding": f, "metric": m,
         "value": v, "ci_low": lo, "ci_high": hi, "n": n}
        for f, m, v, lo, hi, n in [
            ("Mass", "point_localization_accuracy", 0.5, 0.2, 0.8, 4),
            ("Nodule", "point_localization_accuracy", 0.25, 0.0, 0.6, 4),
            (MACRO, "point_localization_accuracy", 0.375, 0.1, 0.6, 8),
            (BOX_WEIGHTED, "point_localization_accuracy", 0.375, 0.1, 0.6, 8),
            ("Mass", "pointing_game", 0.9, 0.8, 1.0, 4)]]
    table = localization_summary(to_frame(rows))
    assert table.columns == ["architecture", "cam_method", "Mass", "Nodule", MACRO,
                             BOX_WEIGHTED]
    ours = table.row(0, named=True)
    assert ours["Mass"] == "0.5 [0.2, 0.8] n=4" and ours[MACRO] == "0.38 [0.1, 0.6] n=8"
    paper = {r["cam_method"]: r for r in table.iter_rows(named=True)
             if r["architecture"] == "PYLON paper (NIH)"}
    assert paper["PYLON"][MACRO] == "0.60" and paper["Grad-CAM"][MACRO] == "0.44"
    assert paper["PYLON"]["Mass"] == "-"  # the paper's per-finding rows are not quoted
    assert localization_summary(to_frame(rows), reference=False).height == 1
