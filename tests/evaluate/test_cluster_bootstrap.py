"""Patient-level (cluster) bootstrap and seed-level statistics of the metric table.

Issue #17 items 1 and 5: every CI resamples patients (stratified by class for diagnostic
metrics), and with several training seeds the diagnostic metrics also get a mean over
seeds with a Student-t CI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats as sps

from xcam_assets.evaluate.checks import ci_method_problems
from xcam_assets.evaluate.diagnostic import (
    confusion_metrics,
    diagnostic_rows,
    macro_diagnostic_rows,
)
from xcam_assets.evaluate.plots import roc_band
from xcam_assets.evaluate.tables import (
    CI_IMAGES,
    CI_PATIENTS,
    CI_SEEDS,
    SEED_SUFFIX,
    diagnostic_table,
    mean_rows,
    metric_info,
    patient_groups,
    seed_rows,
    to_frame,
    view_auc_rows,
    wide_table,
)
from xcam_assets.expectations import validate_frame
from xcam_assets.stats import (
    bootstrap_ci,
    bootstrap_mean_ci,
    make_clusters,
    resample_rows,
    roc_auc,
    t_confidence_interval,
    weighted_auc,
)

SUITE = Path(__file__).resolve().parents[2] / "resources" / "expectations" / "metric_table.yaml"


# --------------------------------------------------------------------------- coverage
def test_patient_bootstrap_covers_where_the_image_bootstrap_does_not() -> None:
    """3 images per patient, within-patient correlation 0.9, true mean known: the
    patient-level 95% CI covers it in >= 92% of 500 simulated cohorts, the image-level one
    (same draws) clearly less often (the design effect 1 + 2 * 0.9 = 2.8 shrinks its
    width by sqrt(2.8))."""
    rng = np.random.default_rng(20260117)
    n_sim, n_pat, per, rho, mu, n_boot = 500, 50, 3, 0.9, 0.3, 400
    groups = np.repeat(np.arange(n_pat), per)
    cover_pat = cover_img = 0
    for sim in range(n_sim):
        x = (mu + math.sqrt(rho) * np.repeat(rng.standard_normal(n_pat), per)
             + math.sqrt(1 - rho) * rng.standard_normal(n_pat * per))
        lo, hi = bootstrap_mean_ci(x, n_boot=n_boot, seed=sim, groups=groups)
        cover_pat += lo <= mu <= hi
        lo, hi = bootstrap_mean_ci(x, n_boot=n_boot, seed=sim)
        cover_img += lo <= mu <= hi
    assert cover_pat / n_sim >= 0.92, cover_pat / n_sim
    assert cover_img / n_sim <= 0.85, cover_img / n_sim


# --------------------------------------------------------------------------- references
def test_one_image_per_patient_equals_the_image_bootstrap() -> None:
    """Clusters are numbered in order of first appearance, so singleton clusters draw the
    image bootstrap's indices: identical CIs for the same seed, whatever the ids."""
    rng = np.random.default_rng(1)
    v = rng.random(37)
    ids = [f"P{k:03d}" for k in rng.permutation(37)]  # unsorted pseudonyms
    assert bootstrap_mean_ci(v, n_boot=300, seed=4, groups=ids) == bootstrap_mean_ci(
        v, n_boot=300, seed=4)
    s = rng.random(37)
    stat = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    assert bootstrap_ci(stat, v, s, n_boot=200, seed=9, groups=ids) == bootstrap_ci(
        stat, v, s, n_boot=200, seed=9)
    rows = mean_rows("n", "m", "f", {"x": v}, 100, 3, groups=ids)
    assert (rows[0]["ci_low"], rows[0]["ci_high"]) == bootstrap_mean_ci(v, 100, 3)


def test_cluster_resamples_take_whole_patients_as_documented() -> None:
    """Reference: rng = default_rng(seed); per resample draw G cluster codes (first
    appearance order) with rng.integers(0, G, G) and take every row of each."""
    groups = ["b", "b", "a", "c", "c", "c"]  # codes: b=0, a=1, c=2
    members = {0: [0, 1], 1: [2], 2: [3, 4, 5]}
    got = list(resample_rows(6, 5, seed=7, groups=groups))
    draws = np.random.default_rng(7).integers(0, 3, size=(5, 3))
    want = [np.concatenate([members[g] for g in d]) for d in draws]
    assert len(got) == 5
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.array([1.0, 3.0, 10.0, 0.0, 0.0, 6.0])
    means = [x[r].mean() for r in want]
    lo, hi = np.quantile(means, [0.025, 0.975])
    assert bootstrap_mean_ci(x, n_boot=5, seed=7, groups=groups) == pytest.approx((lo, hi))
    assert bootstrap_ci(np.mean, x, n_boot=5, seed=7, groups=groups) == pytest.approx((lo, hi))


def test_stratified_resamples_keep_both_classes_and_the_any_positive_rule() -> None:
    # patient p2 has one positive image of two: a positive patient (any positive image)
    groups = np.array(["p1", "p1", "p2", "p2", "n1", "n2", "n3", "n3", "n4"])
    y = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0])
    clusters = make_clusters(groups, stratify=y)
    assert clusters.strata.tolist() == [True, True, False, False, False, False]
    for idx in resample_rows(len(y), 300, seed=0, groups=groups, stratify=y):
        drawn = groups[idx]
        assert y[idx].any() and not y[idx].all()
        # 2 positive draws (p1, p2: 2 images each) and 4 negative ones in every resample
        assert np.isin(drawn, ["p1", "p2"]).sum() == 4
    # without stratification a one-positive-patient cohort loses its class in some resamples
    g1 = np.array(["p", "n1", "n2", "n3", "n4", "n5"])
    y1 = np.array([1, 0, 0, 0, 0, 0])
    plain = [y1[i].any() for i in resample_rows(6, 200, seed=0, groups=g1)]
    strat = [y1[i].any() and not y1[i].all()
             for i in resample_rows(6, 200, seed=0, groups=g1, stratify=y1)]
    assert not all(plain) and all(strat)


def test_weighted_auc_equals_auc_of_the_expanded_sample() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 25).astype(bool)
    s = np.round(rng.random(25), 1)  # ties
    w = rng.integers(0, 3, size=(6, 25)).astype(float)
    got = weighted_auc(w, y, s)
    for b in range(6):
        idx = np.repeat(np.arange(25), w[b].astype(int))
        want = roc_auc(y[idx], s[idx]) if y[idx].any() and not y[idx].all() else np.nan
        assert got[b] == pytest.approx(want, nan_ok=True)


def test_diagnostic_rows_patient_ci_equals_the_generic_stratified_bootstrap() -> None:
    rng = np.random.default_rng(5)
    n = 60
    groups = rng.integers(0, 22, n).astype(str)
    y = rng.integers(0, 2, n)
    s = np.round(np.clip(y * 0.3 + rng.random(n), 0, 1), 2)
    rows = {r["metric"]: r for r in diagnostic_rows(y, s, 0.6, n_boot=150, seed=2,
                                                     groups=groups)}
    for metric in ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc"):
        def fn(a: np.ndarray, b: np.ndarray, m: str = metric) -> float:
            return roc_auc(a, b) if m == "auc" else confusion_metrics(a, b >= 0.6)[m]

        want = bootstrap_ci(fn, y, s, n_boot=150, seed=2, groups=groups, stratify=y)
        assert (rows[metric]["ci_low"], rows[metric]["ci_high"]) == pytest.approx(want)
        assert rows[metric]["value"] == pytest.approx(fn(y, s))
    # a different CI from the image bootstrap (patients are the unit now)
    img = {r["metric"]: r for r in diagnostic_rows(y, s, 0.6, n_boot=150, seed=2)}
    assert (img["auc"]["ci_low"], img["auc"]["ci_high"]) != (rows["auc"]["ci_low"],
                                                             rows["auc"]["ci_high"])


def test_macro_rows_patient_ci_equals_the_generic_stratified_bootstrap() -> None:
    rng = np.random.default_rng(6)
    n = 40
    groups = rng.integers(0, 15, n)
    y = rng.integers(0, 2, (n, 2))
    s = rng.random((n, 2))
    rows = {r["metric"]: r for r in macro_diagnostic_rows(y, s, [0.5, 0.4], n_boot=120, seed=1,
                                                          groups=groups)}

    def macro_auc(yy: np.ndarray, ss: np.ndarray) -> float:
        vals = [roc_auc(yy[:, f], ss[:, f]) for f in range(2)]
        return float(np.nanmean(vals)) if not np.all(np.isnan(vals)) else float("nan")

    want = bootstrap_ci(macro_auc, y, s, n_boot=120, seed=1, groups=groups, stratify=y)
    assert (rows["auc"]["ci_low"], rows["auc"]["ci_high"]) == pytest.approx(want)


def test_roc_band_resamples_patients() -> None:
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(20), 3)
    y = np.repeat(rng.integers(0, 2, 20), 3)
    s = y * 0.4 + rng.random(60)
    grid = np.linspace(0, 1, 11)
    lo, hi = roc_band(y, s, grid, n_boot=100, seed=1, groups=groups)
    assert np.all(lo <= hi) and not np.isnan(lo).any()
    lo_i, hi_i = roc_band(y, s, grid, n_boot=100, seed=1)
    assert (hi - lo).mean() > (hi_i - lo_i).mean()  # patients: wider band here


# --------------------------------------------------------------------------- table plumbing
def _preds(rng: np.random.Generator, n: int = 30, shift: float = 0.3) -> pl.DataFrame:
    frames = []
    for split in ("val", "test"):
        lab = np.r_[np.ones(n // 2, int), np.zeros(n - n // 2, int)]
        frames.append(pl.DataFrame({
            "image_key": [f"k{i:02d}" for i in range(n)], "split": split, "finding": "a",
            "label": lab, "probability": np.clip(lab * shift + rng.random(n) * 0.7, 0, 1)}))
    return pl.concat(frames)


def test_table_uses_patients_and_never_writes_them() -> None:
    rng = np.random.default_rng(0)
    preds = _preds(rng)
    patients = {f"k{i:02d}": f"PSEUDO{i // 3}" for i in range(30)}
    rows = diagnostic_table("net", preds, n_boot=50, seed=0, patients=patients)
    rows += view_auc_rows("net", preds, {k: ("PA" if int(k[1:]) % 2 else "AP")
                                         for k in patients}, "a", 50, 0, patients=patients)
    test = preds.filter(pl.col("split") == "test").sort("image_key")
    auc = next(r for r in rows if r["metric"] == "auc")
    want = bootstrap_ci(roc_auc, test["label"].to_numpy(), test["probability"].to_numpy(),
                        n_boot=50, seed=0, groups=[patients[k] for k in test["image_key"]],
                        stratify=test["label"].to_numpy())
    assert (auc["ci_low"], auc["ci_high"]) == pytest.approx(want)
    frame = to_frame(rows, ci_method=CI_PATIENTS)
    assert "PSEUDO" not in frame.write_csv()
    assert set(frame.filter(pl.col("ci_low").is_not_null())["ci_method"]) == {CI_PATIENTS}
    assert frame.filter(pl.col("metric") == "threshold")["ci_method"][0] is None
    assert ci_method_problems(frame) == []
    assert ci_method_problems(to_frame(rows)) != []  # bootstrap_images is not the stage's
    assert set(to_frame(rows).drop_nulls("ci_method")["ci_method"]) == {CI_IMAGES}
    with pytest.raises(KeyError, match="no patient id"):
        patient_groups(["k00", "zz"], patients)


def test_mean_rows_groups_follow_dropped_and_capped_values() -> None:
    groups = np.array(["a", "a", "b", "c", "c"])
    rows = mean_rows("n", "m", "f", {"x": [0.1, np.nan, 0.3, 0.2, 0.4],
                                     "road": [0.5, 0.7]}, 80, 2, groups=groups)
    by = {r["metric"]: r for r in rows}
    assert (by["x"]["ci_low"], by["x"]["ci_high"]) == bootstrap_mean_ci(
        [0.1, 0.3, 0.2, 0.4], 80, 2, groups=["a", "b", "c", "c"])
    # ROAD values are those of the first images
    assert (by["road"]["ci_low"], by["road"]["ci_high"]) == bootstrap_mean_ci(
        [0.5, 0.7], 80, 2, groups=["a", "a"])
    with pytest.raises(ValueError):
        mean_rows("n", "m", "f", {"x": np.zeros(6)}, 10, 0, groups=groups)


# --------------------------------------------------------------------------- seeds
def test_t_confidence_interval_matches_scipy() -> None:
    vals = [0.81, 0.84, 0.79, 0.86, 0.83]
    mean, lo, hi = t_confidence_interval(vals)
    want = sps.t.interval(0.95, df=4, loc=np.mean(vals), scale=sps.sem(vals))
    assert mean == pytest.approx(0.826)
    assert (lo, hi) == pytest.approx(want, abs=1e-12)
    # by hand: t_{0.975, 4} = 2.7764451051977987, sd = 0.0270185...
    half = 2.7764451051977987 * np.std(vals, ddof=1) / math.sqrt(5)
    assert (lo, hi) == pytest.approx((0.826 - half, 0.826 + half), abs=1e-12)
    _, lo90, hi90 = t_confidence_interval(vals, confidence=0.9)
    assert (lo90, hi90) == pytest.approx(sps.t.interval(0.9, 4, np.mean(vals), sps.sem(vals)))


def test_seed_rows_mean_and_t_ci_over_seeds() -> None:
    rng = np.random.default_rng(11)
    per_seed = {s: _preds(rng, shift=0.2 + 0.05 * s) for s in (0, 1, 2)}
    rows = seed_rows("net", per_seed)
    by = {r["metric"]: r for r in rows}
    assert set(by) == {f"{m}{SEED_SUFFIX}" for m in
                       ("accuracy", "precision", "sensitivity", "specificity", "f1", "auc")}
    aucs = []
    for p in per_seed.values():
        t = p.filter(pl.col("split") == "test")
        aucs.append(roc_auc(t["label"].to_numpy(), t["probability"].to_numpy()))
    mean, lo, hi = t_confidence_interval(aucs)
    r = by["auc" + SEED_SUFFIX]
    assert r["value"] == pytest.approx(np.mean(aucs))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((max(lo, 0.0), min(hi, 1.0)))
    assert r["n"] == 3 and r["ci_method"] == CI_SEEDS and r["cam_method"] is None
    assert seed_rows("net", {0: per_seed[0]}) == []
    assert metric_info("auc" + SEED_SUFFIX) == metric_info("auc")
    assert metric_info("auc_view_PA" + SEED_SUFFIX) == metric_info("auc")


def test_seed_rows_clip_the_t_interval_to_the_metric_range() -> None:
    """Two seeds, AUC 1.0 and lower: t_{0.975,1} = 12.7 makes the raw interval run past
    1; the table keeps it within the metric's range."""
    def preds(good: bool) -> pl.DataFrame:
        lab = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0])
        prob = np.where(lab == 1, 0.9, 0.1) if good else np.array(
            [0.9, 0.8, 0.1, 0.85, 0.7, 0.2, 0.6, 0.3, 0.95, 0.05])
        return pl.concat([pl.DataFrame({"image_key": [f"k{i}" for i in range(10)],
                                        "split": split, "finding": "a", "label": lab,
                                        "probability": prob}) for split in ("val", "test")])
    by = {r["metric"]: r for r in seed_rows("net", {1: preds(True), 2: preds(False)})}
    r = by["auc" + SEED_SUFFIX]
    raw = t_confidence_interval([1.0, r["value"] * 2 - 1.0])
    assert r["value"] < 1.0 and raw[2] > 1.0
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(max(raw[1], 0.0)), 1.0)


def test_seed_rows_pass_the_suite_and_sit_beside_their_metric() -> None:
    rng = np.random.default_rng(2)
    per_seed = {s: _preds(rng) for s in (0, 1)}
    patients = {f"k{i:02d}": f"P{i // 2}" for i in range(30)}
    rows = diagnostic_table("net", per_seed[0], n_boot=30, seed=0, patients=patients)
    rows += seed_rows("net", per_seed)
    frame = to_frame(rows, ci_method=CI_PATIENTS)
    assert validate_frame(frame.with_columns(pl.col("cam_method").fill_null("-"))
                          .filter(pl.col("value").is_not_nan()), SUITE).success
    assert ci_method_problems(frame) == []
    assert set(frame.filter(pl.col("metric").str.ends_with(SEED_SUFFIX))["ci_method"]) == {
        CI_SEEDS}
    wide = wide_table(frame)
    assert wide.columns.index("auc") + 1 == wide.columns.index("auc" + SEED_SUFFIX)
    bad = frame.with_columns(pl.when(pl.col("metric") == "auc" + SEED_SUFFIX)
                             .then(pl.lit(CI_PATIENTS)).otherwise(pl.col("ci_method"))
                             .alias("ci_method"))
    assert ci_method_problems(bad)


def test_seed_predictions_load_every_kept_seed_and_check_its_hash(project: Path) -> None:
    from xcam_assets.config import load_settings
    from xcam_assets.evaluate.seeds import StaleSeeds, seed_predictions, trained_seeds
    from xcam_assets.train.checkpoint import save_checkpoint
    from xcam_assets.train.zoo import build_model, state_dict_hash

    s = load_settings()
    arch = "resnet18"
    out = s.checkpoints_dir / arch
    runs = []
    for seed in (3, 4):
        torch.manual_seed(seed)
        model = build_model(arch, s.zoo, n_classes=len(s.findings), image_size=32)
        save_checkpoint(out / "seeds" / f"seed-{seed}", model,
                        {"architecture": arch, "seed": seed, "image_size": 32})
        runs.append({"seed": seed, "weights_sha256": state_dict_hash(model.eval())})
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps({"architecture": arch, "seeds": [3, 4],
                                                "seed_runs": runs, "image_size": 32}))
    assert trained_seeds(s, arch) == [3, 4]
    rng = np.random.default_rng(0)
    keys = [f"k{i}" for i in range(6)]
    x = rng.integers(0, 255, (6, 32, 32), dtype=np.uint8)
    y = np.array([[1], [0], [1], [0], [1], [0]], dtype=np.float32)
    splits = {"val": (keys, x, y, None), "test": (keys, x[::-1].copy(), y[::-1].copy(), None)}
    per_seed = seed_predictions(s, arch, splits, torch.device("cpu"), log=lambda m: None)
    assert sorted(per_seed) == [3, 4]
    assert per_seed[3].columns == ["image_key", "split", "finding", "label", "probability"]
    assert per_seed[3].height == 12
    assert not per_seed[3]["probability"].equals(per_seed[4]["probability"])
    assert {r["metric"] for r in seed_rows(arch, per_seed)} >= {"auc" + SEED_SUFFIX}
    runs[1]["weights_sha256"] = "0" * 64  # seed 4's model is not the one recorded
    (out / "model.json").write_text(json.dumps({"architecture": arch, "seeds": [3, 4],
                                                "seed_runs": runs, "image_size": 32}))
    with pytest.raises(StaleSeeds, match="weights_sha256"):
        seed_predictions(s, arch, splits, torch.device("cpu"), log=lambda m: None)
