"""Subgroup analysis: the metrics within groups of the test images defined by header facts
(sex, age band, view, manufacturer) and the largest gap between groups. Pure, no Dagster.

Attributes (:data:`ATTRIBUTES`; inventory columns written by ingest,
:mod:`xcam_assets.ingest.demographics`): ``sex`` (PatientSex M/F/O), ``age`` (age band
``0-39``, ``40-59``, ``60-79``, ``80+``), ``view`` (ViewPosition, e.g. PA/AP) and
``manufacturer``. An image whose attribute is unknown is left out of that attribute's
analysis; a subgroup with fewer than ``min_images`` test images is left out (too small to
say anything); an attribute with fewer than two subgroups left gives no row.

Rows (metric names; ``finding`` and ``cam_method`` as for the whole-split rows):

* ``<metric>@<attribute>=<value>``: the metric within the subgroup. Diagnostic metrics
  ``auc``, ``sensitivity``, ``specificity`` (cam_method null) at the model's decision
  threshold chosen on the validation split (the threshold of the ``threshold`` row), and
  ``pointing_game`` per CAM method on the subgroup's positive test images (maps' argmax in
  the ground-truth region). A metric undefined in a subgroup (an AUC without both classes,
  a sensitivity without positives) gives no row for it.
* ``<metric>_gap@<attribute>=<a>_vs_<b>``: the largest gap: ``value(a) - value(b)`` for the
  subgroups ``a`` with the highest and ``b`` with the lowest value (so the value is >= 0).
  The pair is picked on the point estimates; the CI is the bootstrap distribution of that
  same difference, so a CI that excludes 0 says the two groups differ (the selection of the
  pair among several is not corrected for: with many subgroups, read it as a screen).

CIs: **one** percentile bootstrap per (model, finding, attribute[, method]) resampling
patients (all images of a drawn patient; stratified by class for the diagnostic metrics,
as the whole-split rows) over the images of the analysed subgroups; every subgroup's
value and every gap is computed on each resample, so subgroup CIs and the gap's CI come
from the same draws. A resample where a subgroup's metric is undefined is dropped from
that interval. ``n``: the subgroup's images (for a gap: the images of both subgroups).
Only attribute values enter the table: never an image or patient key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from xcam_assets.stats import percentile_interval, resample_rows, roc_auc

__all__ = ["ATTRIBUTES", "SEP", "diagnostic_subgroup_rows", "largest_gap",
           "pointing_subgroup_rows", "subgroup_labels", "subgroup_rows"]

#: attribute name in the metric table -> inventory column
ATTRIBUTES: dict[str, str] = {"sex": "patient_sex", "age": "age_band", "view": "view_position",
                              "manufacturer": "manufacturer"}
SEP = "@"
_VALUE = re.compile(r"[^A-Za-z0-9_+.-]+")


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = _VALUE.sub("_", str(value).strip()).strip("_")
    return text or None


def subgroup_labels(keys: Sequence[str], facts: Mapping[str, Any]) -> np.ndarray:
    """The attribute value of each image key (object array; None when unknown), cleaned to
    the characters a metric name may hold (``[A-Za-z0-9_+.-]``)."""
    return np.asarray([_clean(facts.get(k)) for k in keys], dtype=object)


def largest_gap(values: Mapping[str, float]) -> tuple[str, str] | None:
    """(highest, lowest) subgroup among the finite values; None with fewer than two."""
    ok = {k: v for k, v in values.items() if np.isfinite(v)}
    if len(ok) < 2:
        return None
    order = sorted(ok, key=lambda k: (ok[k], k))  # ties: by name, never a group with itself
    return order[-1], order[0]


def subgroup_rows(stats: Mapping[str, Callable[[np.ndarray], float]], labels: ArrayLike,
                  attribute: str, n_boot: int, seed: int, groups: ArrayLike | None = None,
                  stratify: ArrayLike | None = None, min_images: int = 10,
                  alpha: float = 0.05) -> list[dict[str, Any]]:
    """Rows ``{"metric", "value", "ci_low", "ci_high", "n"}`` of every statistic within each
    subgroup and of its largest gap (module docstring).

    ``stats``: metric name -> function of an array of row indices (with repeats, a
    bootstrap resample) giving the metric on those rows (nan when undefined). ``labels``:
    subgroup per row (None: unknown). ``groups``: patient per row; ``stratify``: 0/1 per
    row for a class-stratified resample."""
    lab = np.asarray(labels, dtype=object)
    counts: dict[str, int] = {}
    for v in lab:
        if v is not None:
            counts[v] = counts.get(v, 0) + 1
    names = sorted(v for v, c in counts.items() if c >= max(1, int(min_images)))
    if len(names) < 2:
        return []
    rows_in = np.flatnonzero(np.isin(lab, names))
    sub = lab[rows_in]
    members = {s: rows_in[sub == s] for s in names}
    point = {m: {s: float(fn(members[s])) for s in names} for m, fn in stats.items()}
    boot = {m: np.full((n_boot, len(names)), np.nan) for m in stats}
    if n_boot:
        g = None if groups is None else np.asarray(groups, dtype=object)[rows_in]
        st = None if stratify is None else np.asarray(stratify)[rows_in]
        for b, idx in enumerate(resample_rows(rows_in.size, n_boot, seed, g, st)):
            drawn, drawn_lab = rows_in[idx], sub[idx]
            for j, s in enumerate(names):
                pick = drawn[drawn_lab == s]
                if not pick.size:
                    continue
                for m, fn in stats.items():
                    boot[m][b, j] = fn(pick)
    out: list[dict[str, Any]] = []
    for m in stats:
        for j, s in enumerate(names):
            if not np.isfinite(point[m][s]):
                continue
            lo, hi = percentile_interval(boot[m][:, j], alpha) if n_boot else (np.nan, np.nan)
            out.append({"metric": f"{m}{SEP}{attribute}={s}", "value": point[m][s],
                        "ci_low": lo, "ci_high": hi, "n": int(members[s].size)})
        pair = largest_gap(point[m])
        if pair is None:
            continue
        a, b = pair
        ja, jb = names.index(a), names.index(b)
        diff = boot[m][:, ja] - boot[m][:, jb]
        lo, hi = percentile_interval(diff, alpha) if n_boot else (np.nan, np.nan)
        out.append({"metric": f"{m}_gap{SEP}{attribute}={a}_vs_{b}",
                    "value": point[m][a] - point[m][b], "ci_low": lo, "ci_high": hi,
                    "n": int(members[a].size + members[b].size)})
    for r in out:  # an undefined interval is no interval
        if not (np.isfinite(r["ci_low"]) and np.isfinite(r["ci_high"])):
            r["ci_low"] = r["ci_high"] = None
    return out


def diagnostic_subgroup_rows(y_true: ArrayLike, scores: ArrayLike, threshold: float,
                             labels: ArrayLike, attribute: str, n_boot: int, seed: int,
                             groups: ArrayLike | None = None, min_images: int = 10
                             ) -> list[dict[str, Any]]:
    """``auc``, ``sensitivity``, ``specificity`` (positive when ``score >= threshold``, the
    val threshold) within each subgroup and their largest gaps; the bootstrap resamples
    patients stratified by class."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pred = s >= threshold

    def auc(idx: np.ndarray) -> float:
        yy = y[idx]
        return roc_auc(yy, s[idx]) if yy.any() and not yy.all() else float("nan")

    def sens(idx: np.ndarray) -> float:
        pos = y[idx]
        return float(pred[idx][pos].mean()) if pos.any() else float("nan")

    def spec(idx: np.ndarray) -> float:
        neg = ~y[idx]
        return float((~pred[idx][neg]).mean()) if neg.any() else float("nan")

    return subgroup_rows({"auc": auc, "sensitivity": sens, "specificity": spec}, labels,
                         attribute, n_boot, seed, groups=groups, stratify=y.astype(np.int8),
                         min_images=min_images)


def pointing_subgroup_rows(hits: ArrayLike, labels: ArrayLike, attribute: str, n_boot: int,
                           seed: int, groups: ArrayLike | None = None, min_images: int = 10
                           ) -> list[dict[str, Any]]:
    """``pointing_game`` (mean of the per-image 0/1 ``hits`` of the positive images) within
    each subgroup and its largest gap; the bootstrap resamples patients."""
    h = np.asarray(hits, dtype=np.float64)
    return subgroup_rows({"pointing_game": lambda idx: float(h[idx].mean())}, labels,
                         attribute, n_boot, seed, groups=groups, min_images=min_images)
