"""Data randomization test (issue #18, opt-in; xcam_assets.evaluate.sanity and
xcam_assets.evaluate.data_randomization): constructed maps with known similarities, the
label permutation, the cached permuted-label model, and the tiny lineage with the switch on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from scipy.ndimage import uniform_filter
from test_beyond import TinyNet, tiny_case

from xcam_assets.evaluate import data_randomization as dr
from xcam_assets.evaluate.sanity import data_randomization_test, permute_labels
from xcam_assets.evaluate.tables import CI_PATIENTS, METRICS, PARAMETERS, metric_info, to_frame
from xcam_assets.expectations import validate_frame
from xcam_assets.explain.cams import parse_method

SUITE = Path(__file__).resolve().parents[2] / "resources" / "expectations" / "metric_table.yaml"
CFG = {"enabled": True, "epochs": None, "max_images": 3, "max_spearman": 0.5, "seed": None}
ROWS = {"data_randomization_spearman", "data_randomization_ssim",
        "data_randomization_test_failed", "data_randomization_max_spearman",
        "data_randomization_epochs"}


def _ssim_3x3(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by its definition (Wang et al. 2004): 3x3 uniform window, sample covariances,
    data range 1, the mean over the windows that fit inside the map."""
    c1, c2, np_ = 0.01 ** 2, 0.03 ** 2, 9

    def f(x: np.ndarray) -> np.ndarray:
        return uniform_filter(x, size=3)

    ux, uy = f(a), f(b)
    norm = np_ / (np_ - 1)
    vx, vy, vxy = norm * (f(a * a) - ux * ux), norm * (f(b * b) - uy * uy), \
        norm * (f(a * b) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s[1:-1, 1:-1].mean())


# --------------------------------------------------------------------------- (a) constructed
def test_identical_maps_spearman_1_and_the_method_fails() -> None:
    maps = np.random.default_rng(0).uniform(0, 1, (5, 32, 32)).astype(np.float32)
    res = data_randomization_test(maps, maps.copy())
    np.testing.assert_allclose(res.spearman, 1.0)
    np.testing.assert_allclose(res.ssim, 1.0, atol=1e-6)
    assert res.failed(0.5) and res.failed(0.99)


def test_independent_random_maps_spearman_near_0_and_the_method_passes() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 1, (20, 48, 48))
    b = rng.uniform(0, 1, (20, 48, 48))
    res = data_randomization_test(a, b)
    assert abs(res.mean_spearman()) < 0.03  # sd of one image's rho: 1/48
    assert np.all(np.abs(res.spearman) < 0.12)
    assert np.all(res.ssim < 0.1)
    assert not res.failed(0.5)
    assert not res.failed(0.1)


def test_hand_made_two_image_case() -> None:
    a = np.arange(16, dtype=np.float64).reshape(4, 4) / 15
    b1 = a.copy().ravel()
    b1[[0, 1]], b1[[2, 3]] = b1[[1, 0]], b1[[3, 2]]  # two neighbouring ranks swapped, twice
    b1 = b1.reshape(4, 4)
    b2 = a[::-1, ::-1].copy()  # every rank reversed
    res = data_randomization_test(np.stack([a, a]), np.stack([b1, b2]))
    # Spearman: 1 - 6 sum d^2 / (n (n^2 - 1)), sum d^2 = 4, n = 16
    assert res.spearman[0] == pytest.approx(1 - 6 * 4 / (16 * 255))
    assert res.spearman[1] == pytest.approx(-1.0)
    assert res.mean_spearman() == pytest.approx((1 - 24 / 4080 - 1) / 2)
    assert res.ssim[0] == pytest.approx(_ssim_3x3(a, b1), abs=1e-6)  # float32 maps
    assert res.ssim[1] == pytest.approx(_ssim_3x3(a, b2), abs=1e-6)
    assert res.ssim[1] < 0 < res.ssim[0] < 1
    assert not res.failed(0.0)  # mean -0.003
    assert res.failed(-0.01)
    # a blank original is left out; a blank map of the permuted model has rank similarity 0
    blank = data_randomization_test(np.stack([np.zeros((4, 4)), a]),
                                    np.stack([a, np.full((4, 4), 0.5)]))
    assert np.isnan(blank.spearman[0]) and blank.spearman[1] == 0.0
    assert blank.mean_spearman() == 0.0
    with pytest.raises(ValueError, match="shape"):
        data_randomization_test(np.zeros((1, 4, 4)), np.zeros((1, 5, 5)))


def test_rows_of_a_model_against_itself_and_against_another() -> None:
    model, zoo, x, y, groups, spec = tiny_case()
    same = dr.data_randomization_table("tiny", spec, model, copy.deepcopy(model), zoo, x, y,
                                       ["a"], CFG, 50, 0, groups, epochs=2)
    frame = to_frame(same, ci_method=CI_PATIENTS)
    value = dict(zip(frame["metric"], frame["value"], strict=True))
    assert set(value) == ROWS
    assert value["data_randomization_spearman"] == pytest.approx(1.0)
    assert value["data_randomization_ssim"] == pytest.approx(1.0, abs=1e-5)
    assert value["data_randomization_test_failed"] == 1.0
    assert value["data_randomization_max_spearman"] == 0.5
    assert value["data_randomization_epochs"] == 2
    assert set(frame["n"].to_list()) == {3}  # the first 3 positive test images
    assert frame.filter(pl.col("metric") == "data_randomization_spearman")["ci_low"][0] \
        is not None
    torch.manual_seed(1)
    other = dr.data_randomization_table("tiny", spec, model, TinyNet().eval(), zoo, x, y,
                                        ["a"], {**CFG, "max_spearman": 1.0}, 50, 0, groups)
    frame2 = to_frame(other, ci_method=CI_PATIENTS)
    value2 = dict(zip(frame2["metric"], frame2["value"], strict=True))
    assert "data_randomization_epochs" not in value2
    assert value2["data_randomization_spearman"] < 1.0
    assert value2["data_randomization_test_failed"] == 0.0  # below a threshold of 1
    for f in (frame, frame2):
        for name in f["metric"]:
            metric_info(name)
        ok = validate_frame(f, SUITE)
        assert ok.success, ok.summary()
    # no positive test image: no rows
    assert dr.data_randomization_table("tiny", spec, model, model, zoo, x, y * 0, ["a"], CFG,
                                       50, 0) == []


def test_metric_registry_and_config() -> None:
    assert {"data_randomization_spearman", "data_randomization_ssim",
            "data_randomization_test_failed"} <= set(METRICS)
    assert {"data_randomization_max_spearman", "data_randomization_epochs"} <= set(PARAMETERS)
    # the model randomization test's threshold unless configured; off by default
    cfg = dr.data_config({"max_spearman": 0.4})
    assert cfg["enabled"] is False and cfg["max_spearman"] == 0.4 and cfg["epochs"] is None
    assert dr.data_config({"max_spearman": 0.4, "data": {"max_spearman": 0.3}}
                          )["max_spearman"] == 0.3
    assert dr.permutation_seed(7, {"seed": 3}) == 3
    assert dr.permutation_seed(7, {}) == dr.permutation_seed(7, {"seed": None}) \
        != dr.permutation_seed(8, {})


# --------------------------------------------------------------------------- (b) permutation
def test_label_permutation_is_a_seeded_permutation_of_whole_rows() -> None:
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=(200, 3)) < [0.1, 0.4, 0.7]).astype(np.int64)
    y_before = y.copy()
    p = permute_labels(y, 11)
    assert p.shape == y.shape and p.dtype == y.dtype
    for k in range(y.shape[1]):  # same label multiset per finding
        assert sorted(p[:, k]) == sorted(y[:, k])
    # whole label vectors move: the multiset of rows (co-occurrence) is kept
    assert sorted(map(tuple, p)) == sorted(map(tuple, y))
    assert not np.array_equal(p, y)
    np.testing.assert_array_equal(permute_labels(y, 11), p)  # deterministic by seed
    assert not np.array_equal(permute_labels(y, 12), p)
    assert (p[:, 1] == y[:, 1]).mean() < 0.75  # the image-label link is broken
    np.testing.assert_array_equal(y, y_before)  # the input is untouched


# --------------------------------------------------------------------------- (b)+(c) lineage
def _tiny_lineage(n_images: int) -> None:
    import dagster as dg
    from cohorts import arrived_demo_cohort

    from xcam_assets.config import load_settings
    from xcam_assets.orchestrate import materialize_stage

    s = load_settings()
    arrived_demo_cohort(s, n_images, size=96, n_batches=1)
    instance = dg.DagsterInstance.get()
    for stage in ("ingest", "preprocess", "splits", "train", "explain"):
        materialize_stage(stage, instance=instance, log=lambda m: None)


@pytest.mark.slow
def test_tiny_lineage_with_the_switch_on(project, monkeypatch) -> None:
    from xcam_assets.config import load_settings
    from xcam_assets.evaluate.stage import evaluate_lineage
    from xcam_assets.preprocess.store import split_arrays

    _tiny_lineage(48)
    overrides = {"evaluate": {
        "faithfulness": {"metrics": []}, "stability": {"enabled": False},
        "randomization": {"enabled": False, "data": {"enabled": True, "epochs": 1}}}}
    s = load_settings(overrides=overrides)
    before = {p: p.stat().st_mtime_ns for p in (s.checkpoints_dir).rglob("*") if p.is_file()}
    seen: list[tuple[np.ndarray, np.ndarray]] = []
    real_fit = dr.fit_architecture

    def spy(*args, **kwargs):
        seen.append((args[4], args[6]))  # the train and val labels it was given
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(dr, "fit_architecture", spy)
    logs: list[str] = []
    out = evaluate_lineage(s, log=logs.append)

    # the permuted model trained once, on permuted train and val labels
    _, _, y_tr, _ = split_arrays(s, "train")
    _, _, y_va, _ = split_arrays(s, "val")
    assert len(seen) == len(s.architectures) == 1
    y_tr_p, y_va_p = seen[0]
    perm = dr.permutation_seed(s.seed, dr.data_config(overrides["evaluate"]["randomization"]))
    np.testing.assert_array_equal(y_tr_p, permute_labels(y_tr, perm))
    np.testing.assert_array_equal(y_va_p, permute_labels(y_va, perm + 1))
    assert sorted(y_tr_p[:, 0]) == sorted(y_tr[:, 0]) and not np.array_equal(y_tr_p, y_tr)

    # rows per architecture x method
    table = out.long
    dr_rows = table.filter(pl.col("metric").str.starts_with("data_randomization_"))
    methods = [parse_method(m).name for m in s.profile["cam_methods"]]
    for arch in s.architectures:
        for method in methods:
            got = dr_rows.filter((pl.col("architecture") == arch)
                                 & (pl.col("cam_method") == method))
            assert set(got["metric"]) == ROWS, (arch, method)
            v = dict(zip(got["metric"], got["value"], strict=True))
            assert -1 <= v["data_randomization_spearman"] <= 1
            assert v["data_randomization_test_failed"] == float(
                v["data_randomization_spearman"] >= 0.5)
            assert v["data_randomization_epochs"] == 1
            rho = got.filter(pl.col("metric") == "data_randomization_spearman")
            assert rho["ci_method"][0] == CI_PATIENTS and rho["n"][0] >= 1
    assert not table.filter(pl.col("metric").str.starts_with("randomization_")).height
    ok = validate_frame(table.with_columns(pl.col("cam_method").fill_null("-")), SUITE)
    assert ok.success, ok.summary()
    # provenance in metric_table.json; the checkpoint of record untouched
    record = json.loads((s.metrics_dir / "metric_table.json").read_text())["data_randomization"]
    arch = s.architectures[0]
    cache = dr.data_randomized_dir(s, arch)
    side = json.loads((cache / "model.json").read_text())
    assert record[arch]["permutation_seed"] == perm == side["permutation_seed"]
    assert record[arch]["training_fingerprint"] == side["training_fingerprint"]
    assert record[arch]["weights_sha256"] == side["weights_sha256"]
    assert record[arch]["path"] == f"data_randomized/{arch}"  # no machine path
    assert {p: p.stat().st_mtime_ns for p in s.checkpoints_dir.rglob("*")
            if p.is_file()} == before
    assert f"{arch}/data_randomization_train_s" in out.timings

    # a second call reuses the cached model (same fingerprint); a new seed retrains
    device = torch.device("cpu")
    cfg = dr.data_config(overrides["evaluate"]["randomization"])
    mtime = (cache / "model.safetensors").stat().st_mtime_ns
    again = dr.permuted_label_model(s, arch, cfg, device, log=logs.append)
    assert again.reused and len(seen) == 1
    assert again.record == record[arch]
    assert (cache / "model.safetensors").stat().st_mtime_ns == mtime
    other = dr.permuted_label_model(s, arch, {**cfg, "seed": 12345}, device, log=logs.append)
    assert not other.reused and len(seen) == 2
    assert other.record["permutation_seed"] == 12345
    assert other.record["training_fingerprint"] != record[arch]["training_fingerprint"]
    np.testing.assert_array_equal(seen[1][0], permute_labels(y_tr, 12345))
    assert json.loads((cache / "model.json").read_text())["permutation_seed"] == 12345
