"""Subgroup analysis (xcam_assets.evaluate.subgroups): a planted gap is found with a CI
excluding 0, the values are the subgroup's own, and no identifier enters the rows."""

from __future__ import annotations

import numpy as np
import pytest

from xcam_assets.evaluate.subgroups import (
    diagnostic_subgroup_rows,
    largest_gap,
    pointing_subgroup_rows,
    subgroup_labels,
)
from xcam_assets.stats import roc_auc


def _planted(n: int = 200, seed: int = 0):
    """Two patients' images per patient; the model separates the classes in group A and
    guesses in group B."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 2 * n)
    group = np.array(["A"] * n + ["B"] * n, dtype=object)
    s = np.where(group == "A", 0.35 * y + rng.uniform(0, 0.65, 2 * n), rng.uniform(0, 1, 2 * n))
    patients = np.array([f"P{i // 2:05d}-secret" for i in range(2 * n)], dtype=object)
    return y, s, group, patients


def _by(rows):
    return {r["metric"]: r for r in rows}


def test_planted_gap_is_found_with_ci_excluding_zero() -> None:
    y, s, group, patients = _planted()
    rows = _by(diagnostic_subgroup_rows(y, s, 0.5, group, "sex", n_boot=300, seed=0,
                                        groups=patients))
    a, b = rows["auc@sex=A"], rows["auc@sex=B"]
    assert a["value"] == pytest.approx(roc_auc(y[group == "A"], s[group == "A"]))
    assert a["n"] == 200 and a["ci_low"] <= a["value"] <= a["ci_high"]
    gap = rows["auc_gap@sex=A_vs_B"]
    assert gap["value"] == pytest.approx(a["value"] - b["value"]) and gap["value"] > 0.3
    assert gap["ci_low"] > 0 and gap["n"] == 400
    for m in ("sensitivity", "specificity"):
        assert any(k.startswith(f"{m}_gap@sex=") for k in rows), m
        sub = group == "A"
        want = ((s[sub] >= 0.5)[y[sub] == 1].mean() if m == "sensitivity"
                else (s[sub] < 0.5)[y[sub] == 0].mean())
        assert rows[f"{m}@sex=A"]["value"] == pytest.approx(want)


def test_no_gap_gives_ci_across_zero() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    s = 0.3 * y + rng.uniform(0, 0.7, 400)
    group = np.array(["F", "M"] * 200, dtype=object)
    rows = diagnostic_subgroup_rows(y, s, 0.5, group, "sex", n_boot=300, seed=0)
    gap = next(r for r in rows if r["metric"].startswith("auc_gap@"))
    assert gap["ci_low"] < 0 < gap["ci_high"]


def test_no_identifier_enters_the_rows() -> None:
    y, s, group, patients = _planted()
    keys = [f"I{i:06d}-imagekey" for i in range(len(y))]
    labels = subgroup_labels(keys, dict(zip(keys, group, strict=True)))
    rows = diagnostic_subgroup_rows(y, s, 0.5, labels, "sex", n_boot=50, seed=0,
                                    groups=patients)
    rows += pointing_subgroup_rows(y.astype(float), labels, "sex", n_boot=50, seed=0,
                                   groups=patients)
    text = repr(rows)
    assert "secret" not in text and "imagekey" not in text
    assert {r["metric"].split("@")[1].split("=")[0] for r in rows} == {"sex"}


def test_small_and_unknown_subgroups_are_left_out() -> None:
    y = np.array([0, 1] * 20)
    s = np.linspace(0, 1, 40)
    labels = np.array(["AP"] * 15 + ["PA"] * 20 + ["LL"] * 3 + [None] * 2, dtype=object)
    rows = _by(diagnostic_subgroup_rows(y, s, 0.5, labels, "view", n_boot=20, seed=0,
                                        min_images=10))
    assert not any("LL" in k for k in rows)
    assert rows["auc@view=PA"]["n"] == 20
    only_one = np.array(["PA"] * 38 + [None] * 2, dtype=object)
    assert diagnostic_subgroup_rows(y, s, 0.5, only_one, "view", 20, 0) == []


def test_pointing_game_subgroups_and_labels_cleaned() -> None:
    hits = np.array([1.0] * 12 + [0.0] * 12)
    labels = subgroup_labels([str(i) for i in range(24)],
                             {str(i): ("80+" if i < 12 else "60 - 79") for i in range(24)})
    rows = _by(pointing_subgroup_rows(hits, labels, "age", n_boot=50, seed=0))
    assert rows["pointing_game@age=80+"]["value"] == 1.0
    assert rows["pointing_game@age=60_-_79"]["value"] == 0.0
    assert rows["pointing_game_gap@age=80+_vs_60_-_79"]["value"] == 1.0
    assert largest_gap({"a": 0.2, "b": float("nan")}) is None
    assert largest_gap({"a": 0.5, "b": 0.5}) == ("b", "a")


def test_gap_check_judges_the_ci_lower_end() -> None:
    import polars as pl

    from xcam_assets.evaluate.checks import subgroup_gap_problems

    frame = pl.DataFrame({"architecture": ["net"] * 3, "finding": ["a"] * 3,
                          "metric": ["auc_gap@sex=F_vs_M", "auc_gap@age=80+_vs_0-39",
                                     "auc@sex=F"],
                          "value": [0.30, 0.25, 0.9], "ci_low": [0.12, 0.02, 0.8],
                          "ci_high": [0.45, 0.5, 0.95]})
    assert subgroup_gap_problems(frame, None) == []
    problems = subgroup_gap_problems(frame, 0.1)
    assert len(problems) == 1 and "auc_gap@sex=F_vs_M" in problems[0]
    assert subgroup_gap_problems(frame, 0.2) == []
