"""The evaluate stage's glue for issue #18 (xcam_assets.evaluate.beyond): rows in the
long table's format that pass the metric-table suite, on synthetic predictions, a tiny CNN
and hand-made heatmaps; no identifier in the rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from torch import nn

from xcam_assets.evaluate.beyond import (
    agreement_table,
    calibration_table,
    inventory_facts,
    pointing_subgroup_table,
    randomization_table,
    stability_table,
    subgroup_table,
)
from xcam_assets.evaluate.tables import CI_PATIENTS, metric_info, to_frame, wide_table
from xcam_assets.expectations import validate_frame
from xcam_assets.explain.cams import parse_method

SUITE = Path(__file__).resolve().parents[2] / "resources" / "expectations" / "metric_table.yaml"
CFG = {"calibration": {"bins": 15, "temperature_scaling": True},
       "subgroups": {"min_images": 5},
       "randomization": {"max_images": 3, "n_steps": 3, "check_step": 1, "max_spearman": 0.5},
       "stability": {"max_images": 3, "perturbations": ["hflip", "shift", "noise"],
                     "shift_px": 8, "noise_sd": 0.02}}


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def _data(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    keys = [f"I{i:04d}secretkey" for i in range(n)]
    patients = {k: f"P{i // 2:04d}secretpatient" for i, k in enumerate(keys)}
    y = (np.arange(n) % 2).astype(int)
    rows = []
    for split in ("val", "test"):
        p = np.clip(0.3 * y + rng.uniform(0, 0.7, n), 0, 1)
        rows.append(pl.DataFrame({"image_key": keys, "split": split, "finding": "a",
                                  "label": y, "probability": p}))
    inv = pl.DataFrame({"image_key": keys, "status": "ok",
                        "patient_sex": ["F", "F", "M", "M"] * (n // 4),
                        "age_band": ["40-59"] * (n // 2) + ["80+"] * (n // 2),
                        "view_position": ["PA"] * n})
    return keys, patients, pl.concat(rows), inv, y


def test_rows_pass_the_suite_and_hold_no_identifier() -> None:
    keys, patients, preds, inv, y = _data()
    facts = inventory_facts(inv, ["sex", "age", "view", "manufacturer"])
    assert set(facts) == {"sex", "age", "view"}  # no manufacturer column: no rows for it
    rows, curves = calibration_table("net", preds, ["a"], CFG["calibration"], 100, 0, patients)
    assert set(curves) == {"a"} and len(curves["a"][0]) == len(keys)
    rows += subgroup_table("net", preds, {"a": 0.5}, facts, CFG["subgroups"], 100, 0, patients)
    groups = np.asarray([patients[k] for k in keys], dtype=object)
    size = 16
    maps = np.random.default_rng(1).uniform(0, 1, (len(keys), 1, size, size)).astype(np.float32)
    regions = np.zeros((len(keys), 1, size, size), np.uint8)
    regions[y > 0, 0, 4:12, 4:12] = 1
    rows += pointing_subgroup_table("net", "gradcam", ["a"], maps, regions, keys, facts,
                                    CFG["subgroups"], 100, 0, groups)
    pos = [maps[y > 0, 0]]
    rows += agreement_table("net", {"gradcam": pos, "eigencam": [p ** 2 for p in pos]},
                            y[:, None], ["a"], 15, 100, 0, groups)
    frame = to_frame(rows, ci_method=CI_PATIENTS)
    names = set(frame["metric"].to_list())
    assert {"ece", "brier", "ece_temperature_scaled", "temperature", "auc@sex=F",
            "sensitivity@age=80+", "pointing_game@sex=M",
            "method_agreement_spearman@with=gradcam"} <= names, names
    assert any(m.startswith("auc_gap@age=") for m in names)
    assert not any("view" in m for m in names)  # one view only: no subgroup rows
    assert frame.filter(pl.col("metric") == "method_agreement_spearman@with=gradcam"
                        )["value"][0] == pytest.approx(1.0)  # monotone: same ranking
    for name in names:
        metric_info(name)
    ok = validate_frame(frame.with_columns(pl.col("cam_method").fill_null("-")), SUITE)
    assert ok.success, ok.summary()
    assert "secret" not in frame.write_csv()
    assert not any("@" in c for c in wide_table(frame).columns)


def tiny_case():  # noqa: ANN201 - a test fixture's tuple
    """A seeded TinyNet, its zoo entry, 6 images (5 patients), labels and a CAM method."""
    torch.manual_seed(0)
    model = TinyNet().eval()
    zoo = {"tiny": {"timm_name": "tiny", "target_layer": "features.2"}}
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (6, 32, 32)).astype(np.uint8)
    y = np.array([[1], [1], [0], [1], [0], [1]])
    groups = np.array(["p1", "p1", "p2", "p3", "p4", "p5"], dtype=object)
    spec = parse_method("gradcam-norelu")
    return model, zoo, x, y, groups, spec


def test_randomization_and_stability_tables_on_a_tiny_cnn() -> None:
    model, zoo, x, y, groups, spec = tiny_case()
    rows = randomization_table("tiny", spec, model, zoo, x, y, ["a"], CFG["randomization"],
                               50, 0, groups)
    rows += stability_table("tiny", spec, model, zoo, x, y, ["a"], CFG["stability"], 15, 50,
                            0, groups)
    frame = to_frame(rows, ci_method=CI_PATIENTS)
    names = set(frame["metric"].to_list())
    assert {"randomization_spearman@step=1", "randomization_ssim@step=3",
            "randomization_layers@step=1", "randomization_test_failed",
            "stability_spearman@perturbation=hflip", "stability_pointing@perturbation=shift",
            "stability_shift_px"} <= names, names
    assert frame.filter(pl.col("metric") == "randomization_layers@step=1")["value"][0] == 1
    assert set(frame["n"].to_list()) == {3}
    # 8 px at 224 px is 1.14 px at 32 px: a 1 px shift
    assert frame.filter(pl.col("metric") == "stability_shift_px")["value"][0] == 1
    ok = validate_frame(frame.with_columns(pl.col("cam_method").fill_null("-")), SUITE)
    assert ok.success, ok.summary()
