"""Localization metrics for heatmaps (Grad-CAM family, PYLON): can the heatmap be trusted?

Pure functions, no Dagster. Implements the localization metrics of studies 1, 2 and 4 in
MISSION.md: pointing game (with TorchRay's pixel tolerance), PYLON's point localization
accuracy, energy-based pointing game, weak localization with the ImageNet IoU rule, the
effective-heat-ratio AUC (EHR AUC) and mask IoU.

Conventions
-----------
* A **heatmap** is a 2-D float array ``(H, W)``; unless a function says otherwise any
  non-negative scale is fine. NaN/inf values raise ``ValueError``.
* A **region** is a mask ``(H, W)`` of the heatmap's shape; it is converted with
  ``astype(bool)`` (non-zero = inside).
* A **box** is ``(x_min, y_min, x_max, y_max)`` in pixels of the heatmap's frame, with
  ``x_max`` / ``y_max`` exclusive (a box ``(0, 0, 2, 1)`` covers pixels ``(row 0, cols 0-1)``).
  Boxes must already be in the heatmap's pixel frame: rescale with :func:`scale_boxes` when
  the heatmap and the annotation have different sizes.
* The heatmap **maximum location** is the first maximal pixel in row-major (C) order, i.e.
  ``np.unravel_index(np.argmax(heatmap), heatmap.shape)``; ties are not averaged or
  counted as "any maximum inside" (Quantus' PointingGame counts a hit if *any* tied
  maximum is inside).
* An **empty region** raises ``ValueError`` in every metric here (Quantus counts an empty
  mask as a pointing-game hit; we refuse to score against nothing).

Blank and degenerate maps (one rule for every metric)
-----------------------------------------------------
A **blank** map is a constant one (``max == min``, :func:`is_blank`): e.g. a Grad-CAM map
whose ReLU wiped out every value (PYLON's caveat for single-logit heads on low-scoring
images), stored as all zeros. It points nowhere, so it is scored as a **failure** by every
localization metric: pointing game and point localization accuracy -> miss (not the first
pixel in row-major order, which may happen to lie in the box), energy pointing game -> 0,
EHR AUC -> 0, weak localization -> no box, IoU 0, no hit, PYLON IoU -> 0. Likewise a map
with no value above its baseline (see below; e.g. more than half of the image at the map's
maximum) carries no evidence above background: energy, EHR AUC, weak localization and
PYLON IoU give 0. No metric returns ``nan`` for such a map, so every evaluated image stays
in ``n``. Why a failure and not "undefined": dropping blank maps from some metrics (energy,
EHR) but not others (pointing game) made ReLU methods look better on exactly the images
where they failed, and made the metrics' ``n`` differ; a user who looks at a blank map
learns nothing about where the finding is, which is what the worst score says. The value 0
(not 0.5) for EHR AUC: EHR AUC has no chance level at 0.5; 0 is what a map with no heat in
the ground truth gets, the same as its energy share. The table reports the share of blank
maps as ``blank_map_rate`` (:mod:`xcam_assets.evaluate.tables`).

Normalisation of heat magnitudes (ReLU and no-ReLU maps alike)
--------------------------------------------------------------
Stored heatmaps are min-max scaled to [0, 1] per map. For a ReLU method that is
``max(0, e) / max(e)`` of the evidence ``e``; for a method without ReLU (``-norelu``, EigenCAM,
PYLON's class map) it is ``(e - min e) / (max e - min e)``, where zero evidence sits at an
unknown level between 0 and 1 and the negative evidence counts as heat. Metrics that read
heat *magnitudes* (energy pointing game, EHR AUC, weak localization, PYLON IoU) therefore
first take the **evidence above the map's median**, ``max(0, h - median(h))``
(:func:`evidence_map`, ``baseline="median"``, the default), for every map, whatever its
method. The median is the robust estimate of the background (zero-evidence) level of a
chest radiograph's heatmap, where the finding covers a minority of the image. The transform
commutes with any positive affine rescaling, so a ReLU map and a no-ReLU map of the same
evidence give **the same** energy, EHR AUC, weak-localization box and PYLON IoU whenever
the evidence's median is >= 0 (e.g. most pixels carry no evidence); a ReLU map with most
pixels at 0 is left unchanged. Argmax-based metrics (pointing game, point localization
accuracy) do not depend on it. ``baseline="none"`` gives the literal published definitions
on the stored map (energy then needs a non-negative map).

Tolerances at a reference resolution
------------------------------------
Pixel tolerances of the literature are defined at :data:`REFERENCE_SIZE` = 224 px: TorchRay's
15 px pointing-game tolerance and the +10 px small-box relaxation of the ImageNet IoU rule.
:func:`scaled_px` converts them to the stored image size (``px * size / 224``: 8.57 px at
128 px, 34.3 px at 512 px), so the same geometry gives the same hit at every resolution. The
table keeps the reference value in the metric name (``pointing_game_tol15px``) and records
the effective pixel values beside it (:mod:`xcam_assets.evaluate.tables`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "REFERENCE_SIZE",
    "Box",
    "FindingLocalization",
    "PointLocalizationResult",
    "box_iou",
    "boxes_to_mask",
    "ehr_auc",
    "energy_pointing_game",
    "evidence_map",
    "heatmap_argmax",
    "imagenet_iou_threshold",
    "iou_mask",
    "is_blank",
    "point_localization_accuracy",
    "pointing_game_hit",
    "pylon_iou",
    "scale_boxes",
    "scaled_px",
    "weak_localization",
]

Box = tuple[float, float, float, float]
"""``(x_min, y_min, x_max, y_max)`` in pixels, max exclusive."""

REFERENCE_SIZE = 224
"""Image side (px) at which the literature's pixel tolerances are defined (TorchRay's 15 px,
the ImageNet rule's +10 px): ImageNet-sized inputs."""


# --------------------------------------------------------------------------- helpers
def _as_heatmap(heatmap: ArrayLike) -> np.ndarray:
    arr = np.asarray(heatmap, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("heatmap is empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError("heatmap contains nan or inf")
    return arr


def _as_region(region: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    mask = np.asarray(region).astype(bool)
    if mask.shape != tuple(shape):
        raise ValueError(f"region has shape {mask.shape}, heatmap has shape {tuple(shape)}")
    if not mask.any():
        raise ValueError("region is empty: nothing to localize")
    return mask


def _as_box(box: Sequence[float]) -> tuple[float, float, float, float]:
    vals = tuple(float(v) for v in box)
    if len(vals) != 4:
        raise ValueError(f"a box needs 4 values (x_min, y_min, x_max, y_max), got {box!r}")
    return vals  # type: ignore[return-value]


def is_blank(heatmap: ArrayLike) -> bool:
    """A constant map (``max == min``, e.g. all zeros after a ReLU): no localization at all.

    Every metric here scores it as a failure (module notes, "Blank and degenerate maps").
    """
    h = _as_heatmap(heatmap)
    return bool(h.max() == h.min())


def evidence_map(heatmap: ArrayLike, baseline: str | None = "median") -> np.ndarray:
    """The heat above the map's baseline: ``max(0, h - median(h))`` (``baseline="median"``),
    or the map itself (``baseline="none"`` / ``None``); float64 ``(H, W)``.

    The comparable normalisation of ReLU and no-ReLU maps (module notes): invariant to any
    positive affine rescaling of the map, and the identity on a non-negative map whose
    median is 0.
    """
    h = _as_heatmap(heatmap)
    if baseline is None or baseline == "none":
        return h.copy()
    if baseline == "median":
        return np.maximum(h - float(np.median(h)), 0.0)
    raise ValueError(f"unknown baseline {baseline!r} (median, none)")


def scaled_px(px: float, size: float, reference_size: float = REFERENCE_SIZE) -> float:
    """A pixel length defined at ``reference_size`` px, at an image of side ``size`` px:
    ``px * size / reference_size`` (TorchRay's 15 px at 224 px is 8.57 px at 128 px)."""
    if reference_size <= 0 or size <= 0:
        raise ValueError("size and reference_size must be > 0")
    return float(px) * float(size) / float(reference_size)


def heatmap_argmax(heatmap: ArrayLike) -> tuple[int, int]:
    """``(row, col)`` of the heatmap maximum; ties -> first maximal pixel in row-major order."""
    h = _as_heatmap(heatmap)
    row, col = np.unravel_index(int(np.argmax(h)), h.shape)
    return int(row), int(col)


def boxes_to_mask(boxes: Iterable[Sequence[float]], shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the union of boxes.

    Box ``(x_min, y_min, x_max, y_max)`` covers columns ``x_min .. x_max - 1`` and rows
    ``y_min .. y_max - 1``. Fractional coordinates cover every pixel the box touches
    (``floor`` for the min, ``ceil`` for the max); boxes are clipped to the image, and
    degenerate boxes (``x_max <= x_min`` or ``y_max <= y_min``) cover nothing. No boxes ->
    all-False mask.
    """
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = _as_box(box)
        c0 = max(0, math.floor(x0))
        r0 = max(0, math.floor(y0))
        c1 = min(width, math.ceil(x1))
        r1 = min(height, math.ceil(y1))
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def scale_boxes(
    boxes: Iterable[Sequence[float]], from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> list[Box]:
    """Rescale boxes from an image of size ``from_hw = (H, W)`` to one of size ``to_hw``.

    Pixel-edge coordinates scale linearly: ``x' = x * W'/W``, ``y' = y * H'/H`` (consistent
    with resizing the whole image, e.g. a 1024 px ChestX-ray14 box onto a 256 px heatmap).
    """
    sy = to_hw[0] / from_hw[0]
    sx = to_hw[1] / from_hw[1]
    out: list[Box] = []
    for box in boxes:
        x0, y0, x1, y1 = _as_box(box)
        out.append((x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    return out


def iou_mask(a: ArrayLike, b: ArrayLike) -> float:
    """Intersection over union of two boolean masks: ``|a & b| / |a | b|``.

    Standard Jaccard index (Jaccard 1912; used as "IoU" in PYLON, Preechakul et al. 2022).
    Both masks empty -> ``nan``. Shapes must match.
    """
    ma = np.asarray(a).astype(bool)
    mb = np.asarray(b).astype(bool)
    if ma.shape != mb.shape:
        raise ValueError(f"mask shapes differ: {ma.shape} vs {mb.shape}")
    union = int(np.count_nonzero(ma | mb))
    if union == 0:
        return float("nan")
    return int(np.count_nonzero(ma & mb)) / union


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes ``(x_min, y_min, x_max, y_max)`` (max exclusive) by area.

    For integer boxes this equals :func:`iou_mask` of their pixel masks. Two empty boxes ->
    ``nan``.
    """
    ax0, ay0, ax1, ay1 = _as_box(a)
    bx0, by0, bx1, by1 = _as_box(b)
    area_a = max(0.0, ax1 - ax0) * max(0.0, ay1 - ay0)
    area_b = max(0.0, bx1 - bx0) * max(0.0, by1 - by0)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = area_a + area_b - inter
    if union <= 0:
        return float("nan")
    return inter / union


# --------------------------------------------------------------------------- pointing game
def pointing_game_hit(heatmap: ArrayLike, region: ArrayLike, tolerance_px: float = 0) -> bool:
    """Pointing game: does the heatmap's maximum point at the ground-truth region?

    Definition (Zhang et al. 2018, "Top-down neural attention by excitation backprop",
    IJCV 126:1084): a hit when the maximum location of the heatmap lies inside the
    ground-truth region. With ``tolerance_px > 0`` it is also a hit when some region pixel
    lies at Euclidean distance **strictly less** than ``tolerance_px`` from the maximum
    (TorchRay's ``PointingGame``, Fong et al. 2019, uses ``< tolerance**2`` with
    ``tolerance=15`` at 224 px; pass ``scaled_px(15, size)`` to reproduce it at another
    size). ``tolerance_px == 0`` means strictly inside.

    The maximum location is the first maximal pixel in row-major order (see module notes).
    A blank (constant) map is a miss: it has no maximum to point with. Raises
    ``ValueError`` for an empty region or a shape mismatch.
    """
    h = _as_heatmap(heatmap)
    mask = _as_region(region, h.shape)
    if tolerance_px < 0:
        raise ValueError("tolerance_px must be >= 0")
    if is_blank(h):
        return False
    row, col = heatmap_argmax(h)
    if mask[row, col]:
        return True
    if tolerance_px == 0:
        return False
    rows, cols = np.nonzero(mask)
    d2 = (rows - row).astype(np.float64) ** 2 + (cols - col).astype(np.float64) ** 2
    return bool(d2.min() < float(tolerance_px) ** 2)


@dataclass(frozen=True)
class FindingLocalization:
    """Point localization tally of one finding (class)."""

    finding: str
    hits: int
    n_images: int
    n_boxes: int

    @property
    def accuracy(self) -> float:
        """``hits / n_images``; ``nan`` when no image had a box of this finding."""
        return self.hits / self.n_images if self.n_images else float("nan")


@dataclass(frozen=True)
class PointLocalizationResult:
    """Result of :func:`point_localization_accuracy`."""

    per_finding: dict[str, FindingLocalization]
    macro: float
    box_weighted: float

    def rows(self) -> list[dict[str, Any]]:
        """Table rows ``{finding, accuracy, hits, n_images, n_boxes}``.

        One row per finding, then ``"macro_average"`` and ``"box_weighted_average"`` rows whose
        counts are totals over the findings that had at least one boxed image.
        """
        out: list[dict[str, Any]] = [
            {
                "finding": f.finding,
                "accuracy": f.accuracy,
                "hits": f.hits,
                "n_images": f.n_images,
                "n_boxes": f.n_boxes,
            }
            for f in self.per_finding.values()
        ]
        scored = [f for f in self.per_finding.values() if f.n_images]
        totals = {
            "hits": sum(f.hits for f in scored),
            "n_images": sum(f.n_images for f in scored),
            "n_boxes": sum(f.n_boxes for f in scored),
        }
        out.append({"finding": "macro_average", "accuracy": self.macro, **totals})
        out.append({"finding": "box_weighted_average", "accuracy": self.box_weighted, **totals})
        return out


def point_localization_accuracy(
    images: Iterable[tuple[Mapping[str, ArrayLike], Mapping[str, Sequence[Sequence[float]]]]],
    findings: Sequence[str] | None = None,
    tolerance_px: float = 0,
) -> PointLocalizationResult:
    """PYLON's point localization accuracy, per finding plus macro and box-weighted averages.

    Definition (Preechakul et al. 2022, "Improved image classification explainability with
    high-accuracy heatmaps", iScience 25:103933): for finding ``c``, the fraction of images
    that have at least one ground-truth box of ``c`` whose heatmap-for-``c`` argmax lies
    inside any box of ``c`` (union of the boxes). Images without a box of ``c`` are skipped
    for ``c``; a blank map is a miss. The macro average is the unweighted mean over findings;
    the "box-weighted" average weights each finding's accuracy by its number of **boxed
    images** (not boxes), as PYLON's official code does (``utils/callbacks.py``:
    ``weights = len(scores)``, one score per image with a box of the class), i.e. total hits
    over total boxed (image, finding) pairs. ``n_boxes`` is still reported per finding.

    Args:
        images: one ``(heatmaps, boxes)`` pair per image: ``heatmaps`` maps finding ->
            heatmap ``(H, W)``; ``boxes`` maps finding -> list of boxes in that heatmap's
            pixel frame (see :func:`scale_boxes`). A finding with an empty box list counts
            as "no box". A finding with boxes but no heatmap raises ``KeyError``; boxes that
            all fall outside the heatmap raise ``ValueError`` (wrong coordinate frame).
        findings: findings to report, in this order. Default: every finding that has a box
            in some image, sorted. Listed findings with no boxed image get accuracy ``nan``
            and are left out of both averages.
        tolerance_px: pointing tolerance, as in :func:`pointing_game_hit` (PYLON uses 0).

    Returns:
        :class:`PointLocalizationResult`; ``macro`` / ``box_weighted`` are ``nan`` when no
        finding has a boxed image.
    """
    hits: dict[str, int] = {}
    n_images: dict[str, int] = {}
    n_boxes: dict[str, int] = {}
    for i, (heatmaps, boxes_by_finding) in enumerate(images):
        for finding, boxes in boxes_by_finding.items():
            boxes = list(boxes)
            if not boxes or (findings is not None and finding not in findings):
                continue
            if finding not in heatmaps:
                raise KeyError(f"image {i}: boxes for {finding!r} but no heatmap")
            h = _as_heatmap(heatmaps[finding])
            mask = boxes_to_mask(boxes, h.shape)
            if not mask.any():
                raise ValueError(
                    f"image {i}: boxes of {finding!r} fall outside the {h.shape} heatmap"
                )
            hit = pointing_game_hit(h, mask, tolerance_px=tolerance_px)
            hits[finding] = hits.get(finding, 0) + int(hit)
            n_images[finding] = n_images.get(finding, 0) + 1
            n_boxes[finding] = n_boxes.get(finding, 0) + len(boxes)

    order = list(findings) if findings is not None else sorted(n_images)
    per_finding = {
        f: FindingLocalization(f, hits.get(f, 0), n_images.get(f, 0), n_boxes.get(f, 0))
        for f in order
    }
    scored = [r for r in per_finding.values() if r.n_images]
    if scored:
        macro = float(np.mean([r.accuracy for r in scored]))
        weights = np.array([r.n_images for r in scored], dtype=np.float64)
        accs = np.array([r.accuracy for r in scored])
        box_weighted = float(np.sum(accs * weights) / np.sum(weights))
    else:
        macro = box_weighted = float("nan")
    return PointLocalizationResult(per_finding, macro, box_weighted)


# --------------------------------------------------------------------------- energy
def energy_pointing_game(heatmap: ArrayLike, region: ArrayLike,
                         baseline: str | None = "median") -> float:
    """Energy-based pointing game: share of heatmap energy inside the ground-truth region.

    Definition (Wang et al. 2020, "Score-CAM: Score-weighted visual explanations for
    convolutional neural networks", CVPR Workshops): ``sum(heatmap[region]) / sum(heatmap)``,
    here on the evidence map ``E = evidence_map(heatmap, baseline)`` (default: the heat
    above the map's median, so ReLU and no-ReLU maps are comparable; module notes). Range
    [0, 1], higher is better. With ``baseline="none"`` it is the literal definition, the
    same value as Quantus' ``RelevanceMassAccuracy`` on a non-negative map, and the heatmap
    must be non-negative (``ValueError`` otherwise).

    A blank map, or one with no heat above its baseline, scores 0 (module notes). Empty
    region -> ``ValueError``.
    """
    h = _as_heatmap(heatmap)
    mask = _as_region(region, h.shape)
    if (baseline is None or baseline == "none") and np.any(h < 0):
        raise ValueError("energy_pointing_game needs a non-negative heatmap")
    if is_blank(h):
        return 0.0
    e = evidence_map(h, baseline)
    total = float(e.sum())
    if total == 0.0:
        return 0.0
    return float(e[mask].sum()) / total


# --------------------------------------------------------------------------- weak localization
def imagenet_iou_threshold(width: float, height: float, margin: float = 10.0) -> float:
    """ILSVRC localization IoU bar: ``min(0.5, w*h / ((w+m)*(h+m)))`` for a w x h gt box.

    The ImageNet rule (Russakovsky et al. 2015, IJCV 115:211) relaxes the 0.5 IoU bar for
    small boxes; used for Grad-CAM weak localization (Selvaraju et al. 2017). The margin
    ``m`` is 10 px at :data:`REFERENCE_SIZE`; pass ``scaled_px(10, size)`` at another size.
    """
    return min(0.5, (width * height) / ((width + margin) * (height + margin)))


def weak_localization(
    heatmap: ArrayLike, gt_box: Sequence[float], threshold: float = 0.15,
    margin_px: float = 10.0, baseline: str | None = "median",
) -> dict[str, Any]:
    """Weakly supervised localization from a heatmap (Grad-CAM protocol).

    Definition (Selvaraju et al. 2017, "Grad-CAM", ICCV; following Zhou et al. 2016 CAM):
    divide the heatmap by its maximum, keep pixels ``>= threshold`` (15% of the max), take
    the largest 8-connected component (``cv2.connectedComponentsWithStats``), and its
    bounding box. Score the box against the ground-truth box by IoU; a ``hit`` when
    ``IoU >= min(0.5, m*n / ((m+10)*(n+10)))`` with ``m x n`` the gt box size in pixels
    (:func:`imagenet_iou_threshold`, ``margin_px`` = the rule's 10 px, scaled by the caller
    to the image size), and ``hit_at_05`` when ``IoU >= 0.5``.

    Decisions: the map is first reduced to its evidence above ``baseline``
    (:func:`evidence_map`; default the median, module notes), then normalised by its maximum
    only (no min shift), so negative values never pass; a blank map, or a maximum ``<= 0``,
    gives no component: ``box`` is ``None``, ``iou`` 0.0 and both hits False. Equal-area largest components: the one with
    the smallest OpenCV label (first reached in row-major scan) wins. Box IoU is by area
    (:func:`box_iou`) with the predicted box ``(x, y, x + w, y + h)`` (max exclusive).

    Returns ``{"iou": float, "hit": bool, "hit_at_05": bool, "box": Box | None,
    "iou_threshold": float}``.
    """
    h = _as_heatmap(heatmap)
    gx0, gy0, gx1, gy1 = _as_box(gt_box)
    if gx1 <= gx0 or gy1 <= gy0:
        raise ValueError(f"gt_box {tuple(gt_box)} is empty")
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    iou_bar = imagenet_iou_threshold(gx1 - gx0, gy1 - gy0, margin=margin_px)
    blank = is_blank(h)
    h = evidence_map(h, baseline)
    peak = float(h.max())
    if blank or peak <= 0.0:
        return {"iou": 0.0, "hit": False, "hit_at_05": False, "box": None, "iou_threshold": iou_bar}
    binary = ((h / peak) >= threshold).astype(np.uint8)
    n_labels, _, cc_stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = cc_stats[1:n_labels, cv2.CC_STAT_AREA]
    best = 1 + int(np.argmax(areas))  # label 0 is the background
    x, y = int(cc_stats[best, cv2.CC_STAT_LEFT]), int(cc_stats[best, cv2.CC_STAT_TOP])
    w, hh = int(cc_stats[best, cv2.CC_STAT_WIDTH]), int(cc_stats[best, cv2.CC_STAT_HEIGHT])
    box: Box = (float(x), float(y), float(x + w), float(y + hh))
    iou = box_iou(box, (gx0, gy0, gx1, gy1))
    return {
        "iou": iou,
        "hit": bool(iou >= iou_bar),
        "hit_at_05": bool(iou >= 0.5),
        "box": box,
        "iou_threshold": iou_bar,
    }


# --------------------------------------------------------------------------- EHR AUC
def ehr_auc(
    heatmap: ArrayLike, region: ArrayLike, n_quantiles: int = 11, floor: float = 0.1,
    baseline: str | None = "median",
) -> float:
    """Effective heat ratio AUC (EHR AUC); higher is better.

    Definition (as in MISSION.md, following the ``EffectiveHeatRatios`` evaluation of
    InputIBA, Zhang et al. 2021, "Fine-grained neural network explanation by identifying
    input features with predictive information", NeurIPS; used as "EHR AUC" in study 1):

    0. take the evidence map ``evidence_map(heatmap, baseline)`` (default: the heat above
       the map's median, so ReLU and no-ReLU maps are comparable; module notes;
       ``baseline="none"`` skips this step: the published procedure);
    1. scale it to [0, 1] by min-max; set values ``< floor`` (0.1) to 0;
    2. let ``V`` be the scaled values ``>= floor``; for ``q`` in ``linspace(0, 1, n_quantiles)``
       (0, 0.1, ..., 1.0) take ``t_q = min(quantile_q(V), 0.99 * max)``;
    3. ``B_q = {heat >= t_q}``; ``ratio_q = sum(heat over B_q & region) / |B_q|``
       (heat-weighted numerator, pixel-count denominator);
    4. EHR AUC = trapezoidal area under ``ratio(q)`` over ``q`` in [0, 1].

    Ambiguities resolved: quantiles use numpy's default linear interpolation; ``max`` is the
    scaled maximum (1.0), so the cap 0.99 guarantees ``B_q`` is never empty; the reference
    code divides raw 0-255 maps by 255 instead of min-max scaling -- we always min-max
    scale, as MISSION.md states. A blank (constant) heatmap, or an evidence map that is
    constant, carries no localization information and scores 0 (module notes: a failure,
    the value of a map with no heat in the ground truth). Empty region -> ``ValueError``.
    The result lies in [0, 1] (each ratio is a mean of values <= 1).
    """
    h = _as_heatmap(heatmap)
    mask = _as_region(region, h.shape)
    if n_quantiles < 2:
        raise ValueError("n_quantiles must be >= 2")
    if not 0.0 <= floor <= 1.0:
        raise ValueError("floor must be in [0, 1]")
    if is_blank(h):
        return 0.0
    h = evidence_map(h, baseline)
    lo, hi = float(h.min()), float(h.max())
    if hi == lo:
        return 0.0
    heat = (h - lo) / (hi - lo)
    heat[heat < floor] = 0.0
    values = heat[heat >= floor]
    qs = np.linspace(0.0, 1.0, n_quantiles)
    cap = 0.99 * float(heat.max())
    thresholds = np.minimum(np.quantile(values, qs), cap)
    ratios = np.empty(n_quantiles, dtype=np.float64)
    heat_in_region = np.where(mask, heat, 0.0)
    for i, t in enumerate(thresholds):
        inside = heat >= t
        ratios[i] = float(heat_in_region[inside].sum()) / int(np.count_nonzero(inside))
    return float(np.trapezoid(ratios, qs))


# --------------------------------------------------------------------------- PYLON IoU
def pylon_iou(heatmap: ArrayLike, region: ArrayLike, threshold: float = 0.5,
              baseline: str | None = "median") -> float:
    """PYLON's IoU: the heatmap thresholded at ``threshold`` of its maximum, IoU with the
    ground-truth mask (the union of the finding's boxes).

    Definition (Preechakul et al. 2022; the official code, ``utils/localization.py``
    ``iobb_acc_by_image``: ``seg / seg.max() > 0.5`` (strictly greater), IoU against the
    canvas of the image's boxes of the class). Here on the evidence map
    (:func:`evidence_map`, default ``baseline="median"``, module notes): the stored maps are
    min-max scaled, where the official map is a sigmoid divided by its maximum. The paper
    turns the IoU into an accuracy (IoU or IoBB > 0.1); we report the IoU itself, in [0, 1],
    higher is better. A blank map, or one with no heat above its baseline, scores 0. Empty
    region -> ``ValueError``.
    """
    h = _as_heatmap(heatmap)
    mask = _as_region(region, h.shape)
    if not 0.0 <= threshold < 1.0:
        raise ValueError("threshold must be in [0, 1)")
    if is_blank(h):
        return 0.0
    e = evidence_map(h, baseline)
    peak = float(e.max())
    if peak <= 0.0:
        return 0.0
    return float(iou_mask(e / peak > threshold, mask))
