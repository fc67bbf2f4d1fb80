"""Plots of the beyond-accuracy families, drawn from the long metric table alone.

Sanity (the cascading randomization test: Spearman to the original map per step, the
fail threshold), subgroups (a forest plot of AUC per subgroup with CIs), stability
(Spearman under each perturbation) and inter-method agreement (a matrix per model).
Calibration has its reliability diagram in :mod:`xcam_assets.evaluate.calibration`.
Reading the rows back (rather than the arrays that made them) keeps each plot exactly
what the table says. PNG bytes out (matplotlib Agg, no pyplot state).
"""

from __future__ import annotations

import re

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from xcam_assets.evaluate.plots import _png
from xcam_assets.evaluate.tables import SUBGROUP_SEP

__all__ = ["family_plots", "plot_agreement", "plot_randomization", "plot_stability",
           "plot_subgroups"]


def _suffix_rows(long: pl.DataFrame, prefix: str) -> pl.DataFrame:
    """Rows `<prefix>@<key>=<value>` with the key's value in a column `level`."""
    rows = long.filter(pl.col("metric").str.starts_with(prefix + SUBGROUP_SEP))
    return rows.with_columns(
        pl.col("metric").str.split_exact("=", 1).struct.field("field_1").alias("level"))


def _empty(title: str) -> bytes:
    fig = Figure(figsize=(4, 1.2), dpi=90)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, f"{title}: no rows", ha="center", va="center")
    ax.set_axis_off()
    return _png(fig)


def _err(vals: list[float], los: list, his: list) -> list[list[float]]:
    lo = [max(0.0, v - (v if c is None else c)) for v, c in zip(vals, los, strict=True)]
    hi = [max(0.0, (v if h is None else h) - v) for v, h in zip(vals, his, strict=True)]
    return [lo, hi]


def plot_randomization(long: pl.DataFrame) -> bytes:
    """Spearman between the original and the progressively randomized model's maps, per
    cumulative step (top layer first), one panel per model, one line per CAM method, with
    the failing threshold (`randomization_max_spearman`) dashed."""
    rows = _suffix_rows(long, "randomization_spearman")
    if rows.is_empty():
        return _empty("randomization test")
    archs = sorted(set(rows["architecture"].to_list()))
    fig = Figure(figsize=(3.4 * len(archs) + 0.4, 3.4), dpi=90, layout="constrained")
    limit = long.filter(pl.col("metric") == "randomization_max_spearman")["value"]
    for i, arch in enumerate(archs):
        ax = fig.add_subplot(1, len(archs), i + 1)
        sub = rows.filter(pl.col("architecture") == arch)
        for method in sorted(set(sub["cam_method"].to_list())):
            m = sub.filter(pl.col("cam_method") == method).with_columns(
                pl.col("level").cast(pl.Int64).alias("step")).sort("step")
            steps, vals = m["step"].to_list(), m["value"].to_list()
            ax.errorbar(steps, vals, yerr=_err(vals, m["ci_low"].to_list(),
                                                m["ci_high"].to_list()),
                        marker="o", ms=3, lw=1.2, capsize=2, label=method)
        if limit.len():
            ax.axhline(float(limit[0]), ls="--", color="red", lw=0.8, label="fail above")
        ax.set(ylim=(-0.2, 1.05), xlabel="layers randomized (cumulative step)",
               ylabel="Spearman to original map" if i == 0 else None, title=arch)
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.suptitle("Model-parameter randomization test (Adebayo et al. 2018); 95% CI over images",
                 fontsize=9)
    return _png(fig)


def plot_subgroups(long: pl.DataFrame, finding: str) -> bytes:
    """Forest plot: the finding's AUC per subgroup (sex, age band, view, manufacturer) per
    model, 95% patient-bootstrap CI and n; the overall AUC dotted."""
    rows = long.filter((pl.col("finding") == finding) & pl.col("cam_method").is_null()
                       & pl.col("metric").str.starts_with("auc@"))
    if rows.is_empty():
        return _empty(f"{finding} subgroups")
    labels = sorted(set(rows["metric"].to_list()))
    archs = sorted(set(rows["architecture"].to_list()))
    fig = Figure(figsize=(5.6, 0.34 * len(labels) * len(archs) + 1.2), dpi=90,
                 layout="constrained")
    ax = fig.add_subplot()
    y, ticks, names = 0.0, [], []
    for j, arch in enumerate(archs):
        color = f"C{j % 10}"
        overall = long.filter((pl.col("architecture") == arch) & (pl.col("finding") == finding)
                              & (pl.col("metric") == "auc") & pl.col("cam_method").is_null())
        for label in labels:
            r = rows.filter((pl.col("architecture") == arch) & (pl.col("metric") == label))
            if r.is_empty():
                continue
            v, lo, hi, n = r["value"][0], r["ci_low"][0], r["ci_high"][0], r["n"][0]
            if v is not None and np.isfinite(v):
                ax.errorbar([v], [y], xerr=_err([v], [lo], [hi]), fmt="o", ms=3,
                            color=color, capsize=2)
            ticks.append(y)
            names.append(f"{arch} {label[4:]} (n={n})")
            y -= 1
        if overall.height:
            ax.axvline(float(overall["value"][0]), color=color, ls=":", lw=0.8)
        y -= 0.6
    ax.axvline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set(xlim=(0.0, 1.0), xlabel=f"{finding} AUC (95% CI; dotted: the model's overall AUC)")
    ax.set_title(f"{finding}: AUC by subgroup", fontsize=9)
    return _png(fig)


def plot_stability(long: pl.DataFrame) -> bytes:
    """Spearman between each map and the map of the perturbed image (flip mapped back,
    shift, noise), bars per model x CAM method with 95% CIs over images."""
    rows = _suffix_rows(long, "stability_spearman")
    if rows.is_empty():
        return _empty("stability")
    perts = sorted(set(rows["level"].to_list()))
    archs = sorted(set(rows["architecture"].to_list()))
    methods = sorted(set(rows["cam_method"].to_list()))
    fig = Figure(figsize=(3.4 * len(perts) + 0.4, 3.6), dpi=90, layout="constrained")
    width = 0.8 / max(len(methods), 1)
    for p, pert in enumerate(perts):
        ax = fig.add_subplot(1, len(perts), p + 1)
        sub = rows.filter(pl.col("level") == pert)
        for j, method in enumerate(methods):
            xs, vals, los, his = [], [], [], []
            for a, arch in enumerate(archs):
                r = sub.filter((pl.col("architecture") == arch) & (pl.col("cam_method") == method))
                if r.is_empty() or r["value"][0] is None:
                    continue
                xs.append(a + (j - (len(methods) - 1) / 2) * width)
                vals.append(r["value"][0])
                los.append(r["ci_low"][0])
                his.append(r["ci_high"][0])
            if xs:
                ax.bar(xs, vals, width=width, yerr=_err(vals, los, his), capsize=2,
                       color=f"C{j % 10}", label=method if p == 0 else None)
        ax.set_xticks(range(len(archs)), archs, rotation=20, fontsize=7)
        ax.set_ylim(-0.2, 1.05)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"perturbation: {pert}", fontsize=8)
    fig.legend(loc="outside lower center", ncol=min(len(methods), 6), fontsize=7,
               title="CAM method", title_fontsize=7)
    fig.suptitle("Heatmap stability: Spearman to the unperturbed map (95% CI over images)",
                 fontsize=9)
    return _png(fig)


def plot_agreement(long: pl.DataFrame, finding: str) -> bytes:
    """Inter-method agreement (mean Spearman between two methods' maps of the same image),
    one matrix per model."""
    rows = _suffix_rows(long, "method_agreement_spearman").filter(
        pl.col("finding") == finding)
    if rows.is_empty():
        return _empty(f"{finding} method agreement")
    archs = sorted(set(rows["architecture"].to_list()))
    fig = Figure(figsize=(3.3 * len(archs) + 0.6, 3.4), dpi=90, layout="constrained")
    image = None
    for i, arch in enumerate(archs):
        sub = rows.filter(pl.col("architecture") == arch)
        methods = sorted(set(sub["cam_method"].to_list()) | set(sub["level"].to_list()))
        mat = np.eye(len(methods))
        for r in sub.iter_rows(named=True):
            a, b = methods.index(r["cam_method"]), methods.index(r["level"])
            mat[a, b] = mat[b, a] = np.nan if r["value"] is None else r["value"]
        ax = fig.add_subplot(1, len(archs), i + 1)
        image = ax.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=6)
        ax.set_yticks(range(len(methods)), methods, fontsize=6)
        for a in range(len(methods)):
            for b in range(len(methods)):
                if np.isfinite(mat[a, b]):
                    ax.text(b, a, f"{mat[a, b]:.2f}", ha="center", va="center", fontsize=5)
        ax.set_title(arch, fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.7, label="Spearman")
    fig.suptitle(f"{finding}: agreement between CAM methods on the same images", fontsize=9)
    return _png(fig)


def family_plots(long: pl.DataFrame, first_finding: str) -> dict[str, bytes]:
    """The plots of the families present in `long`, by the name the metric_tables asset
    files them under (`plots/<name>.png`, and inline in its metadata)."""
    metrics = set(long["metric"].unique().to_list())
    out: dict[str, bytes] = {}
    if any(m.startswith("randomization_spearman@") for m in metrics):
        out["sanity_randomization"] = plot_randomization(long)
    if any(re.match(r"auc@", m) for m in metrics):
        out[f"subgroups_{first_finding}"] = plot_subgroups(long, first_finding)
    if any(m.startswith("stability_spearman@") for m in metrics):
        out["stability"] = plot_stability(long)
    if any(m.startswith("method_agreement_spearman@") for m in metrics):
        out[f"method_agreement_{first_finding}"] = plot_agreement(long, first_finding)
    return out
