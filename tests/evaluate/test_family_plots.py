"""The beyond-accuracy families as plots: one per family present in the table, none else."""

from __future__ import annotations

import cv2
import numpy as np
import polars as pl

from xcam_assets.evaluate.family_plots import family_plots

SCHEMA = {"architecture": pl.Utf8, "cam_method": pl.Utf8, "finding": pl.Utf8,
          "metric": pl.Utf8, "value": pl.Float64, "ci_low": pl.Float64,
          "ci_high": pl.Float64, "n": pl.Int64}


def _rows() -> list[tuple]:
    rows = [("r18", None, "A", "auc", 0.8, 0.7, 0.9, 100),
            ("r18", None, "A", "auc@sex=F", 0.7, 0.6, 0.8, 50),
            ("r18", None, "A", "auc@sex=M", 0.9, 0.8, 0.95, 50),
            ("r18", "gradcam", "A", "randomization_max_spearman", 0.5, None, None, 4)]
    for step, v in enumerate([0.9, 0.4, 0.1], start=1):
        rows.append(("r18", "gradcam", "A", f"randomization_spearman@step={step}", v,
                     v - 0.1, v + 0.1, 4))
    rows += [("r18", "gradcam", "A", "stability_spearman@perturbation=shift", 0.8, 0.7,
              0.9, 4),
             ("r18", "gradcam", "A", "method_agreement_spearman@with=eigencam", 0.3, 0.2,
              0.4, 20),
             ("r18", "eigencam", "A", "method_agreement_spearman@with=gradcam", 0.3, 0.2,
              0.4, 20)]
    return rows


def _decodes(png: bytes) -> tuple[int, int]:
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img.shape[:2]


def test_one_plot_per_family_present_and_each_is_a_png() -> None:
    long = pl.DataFrame(_rows(), orient="row", schema=SCHEMA)
    plots = family_plots(long, "A")
    assert set(plots) == {"sanity_randomization", "subgroups_A", "stability",
                          "method_agreement_A"}
    for png in plots.values():
        h, w = _decodes(png)
        assert h > 50 and w > 100


def test_a_table_without_the_families_gets_none_of_their_plots() -> None:
    long = pl.DataFrame([r for r in _rows() if r[3] == "auc"], orient="row", schema=SCHEMA)
    assert family_plots(long, "A") == {}
