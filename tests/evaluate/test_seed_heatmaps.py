"""Seed-level statistics of the heatmap metrics (issue #17 item 5).

With ``seeds: N > 1`` every kept seed model makes its own heatmaps of the boxed test
images and every localization metric gets a ``<metric>_seed_mean`` row per CAM method:
the mean over seeds with a Student-t 95% CI across seeds (``ci_method`` t_over_seeds,
``n`` = seeds). The unit tests check the t-CI by hand against scipy; the end-to-end test
runs the tiny profile with 2 seeds and recomputes each seed's pointing game itself from
the kept seed models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.stats as sps
import torch
import yaml

from xcam_assets.config import _deep_merge, load_settings
from xcam_assets.evaluate.checks import ci_method_problems
from xcam_assets.evaluate.seeds import boxed_images, seed_methods
from xcam_assets.evaluate.tables import (
    CI_PATIENTS,
    CI_SEEDS,
    SEED_SUFFIX,
    evaluate_config,
    metric_info,
    seed_summary_rows,
    to_frame,
    wide_table,
)

# --------------------------------------------------------------------------- units


def test_seed_summary_rows_t_ci_by_hand_for_a_heatmap_metric() -> None:
    """Five seeds' pointing game: mean and t_{0.975,4} * s / sqrt(5) by hand and by scipy."""
    vals = [0.40, 0.55, 0.50, 0.45, 0.60]
    rows = seed_summary_rows("net", {("gradcam", "lesion", "pointing_game"): vals,
                                     ("gradcam", "lesion", "energy_pointing_game"): [0.3]})
    assert len(rows) == 1  # one seed: no spread, no row
    r = rows[0]
    assert (r["architecture"], r["cam_method"], r["finding"], r["metric"]) == (
        "net", "gradcam", "lesion", "pointing_game" + SEED_SUFFIX)
    assert r["n"] == 5 and r["ci_method"] == CI_SEEDS
    mean = sum(vals) / 5
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / 4)
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t_{0.975, 4}
    assert r["value"] == pytest.approx(0.5)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((mean - half, mean + half), abs=1e-12)
    lo, hi = sps.t.interval(0.95, df=4, loc=np.mean(vals), scale=sps.sem(vals))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lo, hi), abs=1e-12)


def test_seed_summary_rows_clip_to_the_metric_range_and_keep_nan() -> None:
    """Two seeds: t_{0.975,1} = 12.7 runs past [0, 1]; the row is clipped. A blank-map rate
    of 0 in both seeds has a zero-width CI. A nan seed value is not dropped."""
    by = {r["metric"]: r for r in seed_summary_rows("net", {
        ("gradcam", "lesion", "point_localization_accuracy"): [0.9, 1.0],
        ("gradcam", "lesion", "blank_map_rate"): [0.0, 0.0],
        ("gradcam", "lesion", "ehr_auc"): [0.2, float("nan")]})}
    plc = by["point_localization_accuracy" + SEED_SUFFIX]
    lo, hi = sps.t.interval(0.95, df=1, loc=0.95, scale=sps.sem([0.9, 1.0]))
    assert hi > 1.0 and lo < 0.9
    assert (plc["ci_low"], plc["ci_high"]) == (pytest.approx(max(lo, 0.0)), 1.0)
    blank = by["blank_map_rate" + SEED_SUFFIX]
    assert (blank["value"], blank["ci_low"], blank["ci_high"]) == (0.0, 0.0, 0.0)
    assert math.isnan(by["ehr_auc" + SEED_SUFFIX]["value"])


def test_heatmap_seed_rows_pass_the_ci_method_rule_and_sit_beside_their_metric() -> None:
    plain = [{"architecture": "net", "cam_method": "gradcam", "finding": "lesion",
              "metric": "pointing_game", "value": 0.5, "ci_low": 0.3, "ci_high": 0.7, "n": 10}]
    rows = plain + seed_summary_rows("net", {("gradcam", "lesion", "pointing_game"): [0.4, 0.6]})
    frame = to_frame(rows, ci_method=CI_PATIENTS)
    assert ci_method_problems(frame) == []
    wide = wide_table(frame)
    assert wide.columns.index("pointing_game") + 1 == wide.columns.index(
        "pointing_game" + SEED_SUFFIX)


def test_boxed_images_and_seed_methods() -> None:
    regions = np.zeros((5, 2, 4, 4), dtype=np.uint8)
    regions[1, 0, 1, 1] = regions[3, 1, 2, 2] = regions[4, 0, 0, 0] = 1
    assert boxed_images(regions).tolist() == [1, 3, 4]
    assert boxed_images(regions, 2).tolist() == [1, 3]
    methods = ["gradcam", "gradcam++-norelu", "pylon"]
    assert seed_methods(methods, None) == methods
    assert seed_methods(methods, ["GradCAM++-noReLU", "pylon"]) == ["gradcam++-norelu", "pylon"]


def test_seed_heatmaps_defaults_are_documented_in_params() -> None:
    """`evaluate.seed_heatmaps` exists in resources/params.yaml with the code's defaults."""
    from real_data import REPO

    params = yaml.safe_load((REPO / "resources" / "params.yaml").read_text())
    assert params["evaluate"]["seed_heatmaps"] == evaluate_config({}, {})["seed_heatmaps"]


def test_ci_record_says_which_metrics_have_seed_rows() -> None:
    """`metric_table.json`'s `seed_level`: heatmap and faithfulness metrics named only when
    they were scored per seed, per architecture trained with several seeds."""
    from xcam_assets.evaluate.stage import ci_record

    info = {"enabled": True, "n_images": 5, "max_images": None, "methods": ["gradcam"]}
    faith = {"enabled": True, "metrics": ["aopc"], "methods": ["gradcam"]}
    rec = ci_record(100, 0, 100, 10, 8, {"a": [1, 2], "b": [1]},
                    {"a": info, "b": info}, {"a": faith, "b": faith})["seed_level"]
    assert "localization metrics" in rec["metrics"] and rec["seeds"] == {"a": [1, 2]}
    assert "faithfulness (aopc)" in rec["metrics"]
    assert rec["heatmaps"] == {"a": info} and rec["faithfulness"] == {"a": faith}
    off = ci_record(100, 0, 100, 10, 8, {"a": [1, 2]}, {"a": {"enabled": False}},
                    {"a": {"enabled": False, "metrics": ["aopc"]}})["seed_level"]
    assert "localization" not in off["metrics"] and off["metrics"].startswith("diagnostic")
    assert "faithfulness" not in off["metrics"]
    assert ci_record(100, 0, 100, 10, 8, {"a": [1]}, {"a": info})["seed_level"] is None


def test_seed_faithfulness_values_match_the_library_aopc(project: Path) -> None:
    """One seed model's AOPC per method: the mean of the library's MoRF AOPC over its
    first `max_images` true positives (labelled positive and at or above its threshold),
    maps made by the explain stage's function at the model's precision. A finding with no
    true positive gives no value; an unknown metric name is refused, naming the setting."""
    from xcam_assets.evaluate.faithfulness import morf_aopc, torch_predictor
    from xcam_assets.evaluate.seeds import seed_faithfulness_table, seed_faithfulness_values
    from xcam_assets.train.stage import precision_for
    from xcam_assets.train.zoo import build_model

    s = load_settings()
    findings = list(s.findings)
    torch.manual_seed(0)
    model = build_model("resnet18", s.zoo, n_classes=len(findings), image_size=64).eval()
    device = torch.device("cpu")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    labels = np.ones((5, len(findings)), dtype=np.int8)
    labels[1, 0] = 0  # not a positive: never a true positive
    prob = np.full((5, len(findings)), 0.9)
    prob[2, 0] = 0.4  # below the threshold: not called positive
    faith = {"metrics": ["aopc", "deletion"], "max_images": 2, "findings": None,
             "batch_size": 64, "aopc": {"grid": 4, "steps": 5, "region_px": 34,
                                        "reference_size": 224, "perturbation": "gaussian_noise",
                                        "noise_mean": 0.0, "noise_sd": 0.1, "fill": 0.5}}
    got = seed_faithfulness_values(s, "resnet18", model, ["gradcam", "gradcam-norelu"], x,
                                   labels, prob, {f: 0.5 for f in findings}, faith, ["aopc"],
                                   8, device)
    tp = [0, 3]  # the first two true positives of finding 0
    only = np.zeros((2, len(findings)), dtype=bool)
    only[:, 0] = True
    precision = precision_for(s, "resnet18", device, model)
    for method in ("gradcam", "gradcam-norelu"):
        maps = _stage_maps(s, "resnet18", model, x[tp], method, only, precision)
        predictor = torch_predictor(model, 0, precision=precision)
        want = morf_aopc(predictor, x[tp].astype(np.float32) / 255.0,
                         maps[:, 0].astype(np.float64), None, steps=5, grid=4, seed=s.seed)
        assert got[(method, findings[0], "aopc")] == pytest.approx(float(np.mean(want.values)),
                                                                  abs=1e-12)
    assert {k[2] for k in got} == {"aopc"}  # only the metrics named
    none = seed_faithfulness_values(s, "resnet18", model, ["gradcam"], x, labels,
                                    np.zeros_like(prob), {f: 0.5 for f in findings}, faith,
                                    ["aopc"], 8, device)
    assert none == {}  # no true positive: no value (not nan)
    with pytest.raises(ValueError, match="seed_heatmaps.faithfulness.*'auc'"):
        seed_faithfulness_table(s, "resnet18", x, labels, [], {},
                                {"seed_heatmaps": {"faithfulness": ["aopc", "auc"]},
                                 "faithfulness": faith}, device, models=[])


# --------------------------------------------------------------------------- end to end
TINY = {"image_size": 64, "epochs": 1, "batch_size": 8, "seeds": 2, "resume": False,
        "n_boot": 30, "cam_methods": ["gradcam", "gradcam-norelu"],
        "evaluate": {"randomization": {"enabled": False}, "stability": {"enabled": False},
                     "faithfulness": {"metrics": ["aopc"], "max_images": 3,
                                      "aopc": {"grid": 4, "steps": 5}}}}


def _kept_seed_models(s, arch: str):
    """(model in eval mode, device, its precision) per kept seed, read from the seed
    directories the checkpoint's `seed_runs` list, without the evaluate stage's code."""
    from xcam_assets.train.checkpoint import load_checkpoint
    from xcam_assets.train.stage import precision_for
    from xcam_assets.train.zoo import build_model

    side = json.loads((s.checkpoints_dir / arch / "model.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for run in side["seed_runs"]:
        model = build_model(arch, s.zoo, n_classes=len(s.findings),
                            image_size=TINY["image_size"])
        load_checkpoint(s.checkpoints_dir / arch / "seeds" / f"seed-{run['seed']}", model)
        model = model.to(device).eval()
        yield model, device, precision_for(s, arch, device, model)


def _stage_maps(s, arch: str, model, x: np.ndarray, method: str, only: np.ndarray,
                precision) -> np.ndarray:
    """The maps the explain stage makes (its function, layers and precision)."""
    from xcam_assets.explain.cams import heatmap_stack, reshape_transform_for
    from xcam_assets.train.zoo import target_layers

    return heatmap_stack(model, target_layers(model, arch, s.zoo), x, method, len(s.findings),
                         batch_size=8, reshape_transform=reshape_transform_for(arch, s.zoo),
                         only=only, precision=precision)


def _scores_per_seed(s, arch: str, method: str, x: np.ndarray, regions: np.ndarray
                     ) -> dict[str, list[float]]:
    """Each kept seed model's pointing game and energy pointing game (first finding) on the
    boxed test images, from the seed directories and the library calls, without the
    evaluate stage's code."""
    from xcam_assets.evaluate.localization import energy_pointing_game, pointing_game_hit

    out: dict[str, list[float]] = {"pointing_game": [], "energy_pointing_game": []}
    only = regions.reshape(len(regions), len(s.findings), -1).any(axis=2)
    pos = [i for i in range(len(x)) if regions[i, 0].any()]
    for model, _, precision in _kept_seed_models(s, arch):
        heat = _stage_maps(s, arch, model, x, method, only, precision).astype(np.float32)
        out["pointing_game"].append(float(np.mean(
            [pointing_game_hit(heat[i, 0], regions[i, 0] > 0) for i in pos])))
        out["energy_pointing_game"].append(float(np.mean(
            [energy_pointing_game(heat[i, 0], regions[i, 0] > 0) for i in pos])))
    return out


def _aopc_per_seed(s, arch: str, method: str) -> list[float]:
    """Each kept seed model's AOPC (first finding) on its own true positives (val threshold
    by the G-mean rule, first 3), with the library's AOPC on TINY's 4x4 grid and L = 5."""
    from xcam_assets.evaluate.diagnostic import gmean_threshold
    from xcam_assets.evaluate.faithfulness import morf_aopc, torch_predictor
    from xcam_assets.preprocess.store import split_arrays
    from xcam_assets.train.loop import predict_logits

    _, x_val, y_val, _ = split_arrays(s, "val")
    _, x_te, y_te, _ = split_arrays(s, "test")
    out = []
    for model, device, precision in _kept_seed_models(s, arch):  # the stage's precision
        p_val = 1 / (1 + np.exp(-predict_logits(model, x_val, device=device,
                                                precision=precision)[:, 0]))
        p_te = 1 / (1 + np.exp(-predict_logits(model, x_te, device=device,
                                               precision=precision)[:, 0]))
        thr = gmean_threshold(y_val[:, 0], p_val)
        tp = np.flatnonzero((y_te[:, 0] > 0) & (p_te >= thr))[:3]
        if not len(tp):
            out.append(float("nan"))
            continue
        only = np.zeros((len(tp), len(s.findings)), dtype=bool)
        only[:, 0] = True
        maps = _stage_maps(s, arch, model, x_te[tp], method, only, precision)
        res = morf_aopc(torch_predictor(model, 0, precision=precision),
                        x_te[tp].astype(np.float32) / 255.0,
                        maps[:, 0].astype(np.float64), None, steps=5, grid=4, seed=s.seed)
        out.append(float(np.mean(res.values)))
    return out


@pytest.mark.slow
def test_two_seeds_give_heatmap_seed_rows_end_to_end(project: Path) -> None:
    from cohorts import arrived_demo_cohort

    from xcam_assets.orchestrate import materialize_stage
    from xcam_assets.preprocess.store import split_arrays

    path = project / "resources" / "params.yaml"
    path.write_text(yaml.safe_dump(_deep_merge(yaml.safe_load(path.read_text()),
                                               {"profiles": {"tiny": TINY}})))
    s = load_settings()
    arrived_demo_cohort(s, 40, size=96)
    for stage in ("ingest", "preprocess", "splits", "train", "explain", "evaluate"):
        materialize_stage(stage, s, log=lambda m: None)  # evaluate's blocking checks pass
    s = load_settings()
    table = pl.read_parquet(s.metrics_dir / "metric_table.parquet")
    seed_rows = table.filter(pl.col("metric").str.ends_with(SEED_SUFFIX)
                             & pl.col("cam_method").is_not_null())
    _, x, _, regions = split_arrays(s, "test")
    idx = boxed_images(regions)
    assert len(idx) >= 2
    for arch in s.architectures:
        for method in TINY["cam_methods"]:
            mine = seed_rows.filter((pl.col("architecture") == arch)
                                    & (pl.col("cam_method") == method))
            names = set(mine["metric"].to_list())
            assert {m + SEED_SUFFIX for m in (
                "pointing_game", "energy_pointing_game", "ehr_auc", "blank_map_rate",
                "point_localization_accuracy", "pylon_iou")} <= names
            assert "deletion_auc" + SEED_SUFFIX not in names  # only what is named
            assert not any(n.startswith("pointing_tolerance_px") for n in names)
            assert set(mine["ci_method"].to_list()) == {CI_SEEDS}
            assert set(mine["n"].to_list()) == {2}
            scores = _scores_per_seed(s, arch, method, x[idx], regions[idx])
            aopc = [v for v in _aopc_per_seed(s, arch, method) if np.isfinite(v)]
            if len(aopc) == 2:
                scores["aopc"] = aopc
            else:  # a seed with no true positive: n counts the others, < 2 gives no row
                assert "aopc" + SEED_SUFFIX not in names
            for metric, per_seed in scores.items():
                row = mine.filter((pl.col("metric") == metric + SEED_SUFFIX)
                                  & (pl.col("finding") == s.findings[0])).row(0, named=True)
                assert len(per_seed) == 2 and np.all(np.isfinite(per_seed)), metric
                assert row["value"] == pytest.approx(np.mean(per_seed), abs=1e-9)
                low, high, _ = metric_info(metric)
                if per_seed[0] != per_seed[1]:
                    lo, hi = sps.t.interval(0.95, df=1, loc=np.mean(per_seed),
                                            scale=sps.sem(per_seed))
                    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
                        (max(lo, low), min(hi, high)), abs=1e-9)
                else:
                    assert row["ci_low"] == row["ci_high"] == pytest.approx(per_seed[0])
            if method.endswith("-norelu"):  # signed maps are never blank: a real test
                epg = scores["energy_pointing_game"]
                assert epg[0] != epg[1] and 0.0 < min(epg)
            plain = table.filter((pl.col("architecture") == arch)
                                 & (pl.col("cam_method") == method)
                                 & (pl.col("metric") == "pointing_game"))
            assert set(plain["ci_method"].to_list()) == {CI_PATIENTS}
    record = json.loads((s.metrics_dir / "metric_table.json").read_text())["seed_level"]
    assert "localization metrics" in record["metrics"]
    assert "faithfulness (aopc)" in record["metrics"]
    assert all(record["faithfulness"][a]["metrics"] == ["aopc"] for a in s.architectures)
    for arch in s.architectures:
        assert record["heatmaps"][arch]["n_images"] == len(idx)
        assert record["heatmaps"][arch]["methods"] == TINY["cam_methods"]
