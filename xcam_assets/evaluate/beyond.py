"""Issue #18 "Beyond accuracy": the evaluate stage's glue between its inputs (predictions,
heatmaps, inventory, checkpoints) and the pure science modules (:mod:`.calibration`,
:mod:`.subgroups`, :mod:`.sanity`, :mod:`.stability`). No Dagster; rows in the long
metric table's format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from torch import nn

from xcam_assets.evaluate.calibration import calibration_rows
from xcam_assets.evaluate.localization import pointing_game_hit, scaled_px
from xcam_assets.evaluate.sanity import randomization_test
from xcam_assets.evaluate.stability import map_agreement, stability_scores
from xcam_assets.evaluate.subgroups import (
    ATTRIBUTES,
    diagnostic_subgroup_rows,
    pointing_subgroup_rows,
    subgroup_labels,
)
from xcam_assets.explain.cams import MethodSpec, compute_heatmaps, reshape_transform_for
from xcam_assets.stats import bootstrap_mean_ci
from xcam_assets.train.zoo import target_layers


def inventory_facts(inventory: pl.DataFrame, attributes: Sequence[str]
                    ) -> dict[str, dict[str, Any]]:
    """attribute -> {image key -> value} for the configured subgroup attributes
    (:data:`~xcam_assets.evaluate.subgroups.ATTRIBUTES`) the inventory holds; an inventory
    written before ingest kept the demographic columns simply lacks them (no rows)."""
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"unknown subgroup attribute(s) {unknown}: use {sorted(ATTRIBUTES)}")
    ok = inventory.filter(pl.col("status") == "ok") if "status" in inventory.columns \
        else inventory
    return {a: dict(ok.select("image_key", ATTRIBUTES[a]).iter_rows())
            for a in attributes if ATTRIBUTES[a] in ok.columns}


def _split(preds: pl.DataFrame, finding: str, split: str) -> pl.DataFrame:
    return preds.filter((pl.col("finding") == finding) & (pl.col("split") == split)
                        ).sort("image_key")


def _groups(keys: list[str], patients: Mapping[str, str] | None) -> np.ndarray | None:
    return None if patients is None else np.asarray([patients[k] for k in keys], dtype=object)


def _tag(rows: list[dict], arch: str, method: str | None, finding: str) -> list[dict]:
    return [{"architecture": arch, "cam_method": method, "finding": finding, **r}
            for r in rows]


def calibration_table(arch: str, preds: pl.DataFrame, findings: Sequence[str],
                      cfg: Mapping[str, Any], n_boot: int, seed: int,
                      patients: Mapping[str, str] | None = None, split: str = "test"
                      ) -> tuple[list[dict], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Calibration rows of one model per finding (``cfg`` = ``evaluate.calibration``:
    ``bins``, ``temperature_scaling``) and the (labels, probabilities) of each finding on
    `split` for the reliability diagram."""
    rows: list[dict] = []
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for finding in findings:
        test = _split(preds, finding, split)
        if not test.height:
            continue
        y, p = test["label"].to_numpy(), test["probability"].to_numpy()
        val = _split(preds, finding, "val") if cfg.get("temperature_scaling") else None
        rows += calibration_rows(
            arch, finding, y, p, n_boot=n_boot, seed=seed,
            groups=_groups(test["image_key"].to_list(), patients), n_bins=int(cfg["bins"]),
            y_val=None if val is None else val["label"].to_numpy(),
            p_val=None if val is None else val["probability"].to_numpy())
        curves[finding] = (y, p)
    return rows, curves


def subgroup_table(arch: str, preds: pl.DataFrame, thresholds: Mapping[str, float],
                   facts: Mapping[str, Mapping[str, Any]], cfg: Mapping[str, Any],
                   n_boot: int, seed: int, patients: Mapping[str, str] | None = None,
                   split: str = "test") -> list[dict]:
    """AUC / sensitivity / specificity at the val threshold within each subgroup of each
    attribute, and the gaps (:func:`~.subgroups.diagnostic_subgroup_rows`), per finding."""
    rows: list[dict] = []
    for finding, threshold in thresholds.items():
        test = _split(preds, finding, split)
        keys = test["image_key"].to_list()
        for attribute, by_key in facts.items():
            rows += _tag(diagnostic_subgroup_rows(
                test["label"].to_numpy(), test["probability"].to_numpy(), threshold,
                subgroup_labels(keys, by_key), attribute, n_boot=n_boot, seed=seed,
                groups=_groups(keys, patients), min_images=int(cfg["min_images"])),
                arch, None, finding)
    return rows


def pointing_subgroup_table(arch: str, method: str, findings: Sequence[str], maps: np.ndarray,
                            regions: np.ndarray, keys: Sequence[str],
                            facts: Mapping[str, Mapping[str, Any]], cfg: Mapping[str, Any],
                            n_boot: int, seed: int, groups: np.ndarray | None = None
                            ) -> list[dict]:
    """Pointing game (strict: the map's argmax inside the region) within each subgroup of
    the positive test images of each finding, and its gap."""
    rows: list[dict] = []
    for k, finding in enumerate(findings):
        idx = [i for i in range(len(keys)) if regions[i, k].any()]
        if not idx:
            continue
        hits = [float(pointing_game_hit(maps[i, k], regions[i, k] > 0)) for i in idx]
        pos_keys = [keys[i] for i in idx]
        for attribute, by_key in facts.items():
            rows += _tag(pointing_subgroup_rows(
                hits, subgroup_labels(pos_keys, by_key), attribute, n_boot=n_boot, seed=seed,
                groups=None if groups is None else np.asarray(groups)[idx],
                min_images=int(cfg["min_images"])), arch, method, finding)
    return rows


def _mean_row(arch: str, method: str, finding: str, metric: str, values: np.ndarray,
              n_boot: int, seed: int, groups: np.ndarray | None) -> list[dict]:
    """One row: mean of the finite values, patient-bootstrap CI; none without a value."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return []
    ci = bootstrap_mean_ci(v[ok], n_boot=n_boot, seed=seed,
                           groups=None if groups is None else np.asarray(groups)[ok])
    lo, hi = ci if np.all(np.isfinite(ci)) else (None, None)
    return [{"architecture": arch, "cam_method": method, "finding": finding, "metric": metric,
             "value": float(v[ok].mean()), "ci_low": lo, "ci_high": hi, "n": int(ok.sum())}]


def _param_row(arch: str, method: str, finding: str, metric: str, value: float,
               n: int) -> dict:
    return {"architecture": arch, "cam_method": method, "finding": finding, "metric": metric,
            "value": float(value), "ci_low": None, "ci_high": None, "n": int(n)}


def positives_for(y: np.ndarray, k: int, max_images: int) -> np.ndarray:
    """The first `max_images` test images (in key order) positive for finding `k`."""
    return np.flatnonzero(y[:, k] > 0)[:max(int(max_images), 0)]


def randomization_table(arch: str, spec: MethodSpec, model: nn.Module,
                        zoo: Mapping[str, Any], x_test: np.ndarray, y_test: np.ndarray,
                        findings: Sequence[str], cfg: Mapping[str, Any], n_boot: int,
                        seed: int, groups: np.ndarray | None = None) -> list[dict]:
    """The cascading model-parameter randomization test (:mod:`.sanity`) of one
    architecture x CAM method on the first ``cfg["max_images"]`` test images positive for
    the first finding (its heatmaps: the explain stage's target layers, fp32):
    rows ``randomization_spearman@step=<k>`` / ``randomization_ssim@step=<k>`` (mean
    similarity to the original maps, patient-bootstrap CI over the images),
    ``randomization_layers@step=<k>`` (layers randomized at that step), the verdict
    ``randomization_test_failed`` (1 = the maps survived the top layers' randomization)
    and its threshold ``randomization_max_spearman``. ``cfg`` = ``evaluate.randomization``."""
    sel = positives_for(y_test, 0, int(cfg["max_images"]))
    if not len(sel):
        return []
    reshape = reshape_transform_for(arch, dict(zoo))
    finding = findings[0]

    def heat(m: nn.Module, x: np.ndarray) -> np.ndarray:
        return compute_heatmaps(m, target_layers(m, arch, zoo), x, spec, 0,
                                reshape_transform=reshape)

    res = randomization_test(model, heat, x_test[sel], n_steps=int(cfg["n_steps"]), seed=seed)
    name, n = spec.name, len(sel)
    groups = None if groups is None else np.asarray(groups)[sel]
    rows: list[dict] = []
    for step, n_layers in enumerate(res.layers, start=1):
        rows += _mean_row(arch, name, finding, f"randomization_spearman@step={step}",
                          res.spearman[step - 1], n_boot, seed, groups)
        rows += _mean_row(arch, name, finding, f"randomization_ssim@step={step}",
                          res.ssim[step - 1], n_boot, seed, groups)
        rows.append(_param_row(arch, name, finding, f"randomization_layers@step={step}",
                               n_layers, n))
    if np.isfinite(res.spearman).any():
        failed = res.failed(int(cfg["check_step"]), float(cfg["max_spearman"]))
        rows += [_param_row(arch, name, finding, "randomization_test_failed", float(failed), n),
                 _param_row(arch, name, finding, "randomization_max_spearman",
                            float(cfg["max_spearman"]), n)]
    return rows


def stability_table(arch: str, spec: MethodSpec, model: nn.Module, zoo: Mapping[str, Any],
                    x_test: np.ndarray, y_test: np.ndarray, findings: Sequence[str],
                    cfg: Mapping[str, Any], tolerance_px: float, n_boot: int, seed: int,
                    groups: np.ndarray | None = None) -> list[dict]:
    """Heatmap stability (:mod:`.stability`) of one architecture x CAM method on the first
    ``cfg["max_images"]`` test images positive for the first finding: rows
    ``stability_spearman@perturbation=<p>`` and ``stability_pointing@perturbation=<p>``
    (mean over the images, patient-bootstrap CI) and the parameter rows
    ``stability_shift_px`` (the shift in pixels of these images) and ``stability_noise_sd``.
    ``tolerance_px``: the pointing tolerance at 224 px (``evaluate.tolerance_px``)."""
    sel = positives_for(y_test, 0, int(cfg["max_images"]))
    if not len(sel):
        return []
    size = x_test.shape[-1]
    shift = max(1, round(scaled_px(float(cfg["shift_px"]), size)))
    reshape = reshape_transform_for(arch, dict(zoo))

    def heat(x: np.ndarray) -> np.ndarray:
        return compute_heatmaps(model, target_layers(model, arch, zoo), x, spec, 0,
                                reshape_transform=reshape)

    res = stability_scores(heat, x_test[sel], list(cfg["perturbations"]), shift=shift,
                           noise_sd=float(cfg["noise_sd"]),
                           tolerance_px=scaled_px(tolerance_px, size), seed=seed)
    g = None if groups is None else np.asarray(groups)[sel]
    rows: list[dict] = []
    for kind, (rho, point) in res.items():
        rows += _mean_row(arch, spec.name, findings[0], f"stability_spearman@perturbation={kind}",
                          rho, n_boot, seed, g)
        rows += _mean_row(arch, spec.name, findings[0], f"stability_pointing@perturbation={kind}",
                          point, n_boot, seed, g)
    if rows:
        rows += [_param_row(arch, spec.name, findings[0], "stability_shift_px", shift, len(sel)),
                 _param_row(arch, spec.name, findings[0], "stability_noise_sd",
                            float(cfg["noise_sd"]), len(sel))]
    return rows


def _agreement(a: np.ndarray, b: np.ndarray, tol: float) -> tuple[float, float]:
    """:func:`~.stability.map_agreement`, symmetric: one blank map scores 0, two nan."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if float(np.ptp(a64)) == 0.0:
        a64, b64 = b64, a64
    return map_agreement(a64, b64, tol)


def agreement_table(arch: str, maps: Mapping[str, Sequence[np.ndarray]], y_test: np.ndarray,
                    findings: Sequence[str], tolerance_px: float, n_boot: int, seed: int,
                    groups: np.ndarray | None = None) -> list[dict]:
    """Inter-method agreement of one model (:mod:`.stability`): for every pair of methods
    ``a < b`` and finding, rows ``method_agreement_spearman@with=<b>`` and
    ``method_agreement_pointing@with=<b>`` (cam_method ``a``) over the finding's positive
    test images. ``maps``: method -> per finding, its maps of those images (N_k, H, W)."""
    rows: list[dict] = []
    names = sorted(maps)
    for k, finding in enumerate(findings):
        pos = np.flatnonzero(y_test[:, k] > 0)
        if not len(pos):
            continue
        g = None if groups is None else np.asarray(groups)[pos]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                ma, mb = maps[a][k], maps[b][k]
                tol = scaled_px(tolerance_px, ma.shape[-1])
                pairs = [_agreement(ma[j], mb[j], tol) for j in range(len(pos))]
                rows += _mean_row(arch, a, finding, f"method_agreement_spearman@with={b}",
                                  np.array([p[0] for p in pairs]), n_boot, seed, g)
                rows += _mean_row(arch, a, finding, f"method_agreement_pointing@with={b}",
                                  np.array([p[1] for p in pairs]), n_boot, seed, g)
    return rows
