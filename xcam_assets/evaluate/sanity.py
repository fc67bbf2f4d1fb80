"""Sanity check of saliency maps: the cascading model-parameter randomization test (Adebayo
et al. 2018, "Sanity checks for saliency maps", NeurIPS). Pure torch/numpy, no Dagster.

A heatmap method that explains the *model* must change when the model's learnt weights are
destroyed. The test randomizes the model's parameterized layers **from the top (output)
down**, cumulatively, and compares each step's heatmaps of the same images with the
original ones. A method whose maps stay close to the original after the top layers are
randomized is reading the image (edges, contrast), not the model: it **fails**.

Definitions (this module):

* **Layers**: the model's leaf modules that hold parameters, in registration order (timm
  and xcam's models register them in forward order), the last being the top. Step ``k``
  of ``n_steps`` randomizes the top ``c_k`` of the ``L`` layers, ``c_k`` =
  ``round(1 + (L - 1) * ((k - 1) / (n_steps - 1)) ** 2)`` (quadratic spacing: step 1 = the
  output layer alone, the last step = every layer; early steps close together at the top,
  where the test is decisive). With ``n_steps = 1`` only the output layer is randomized.
* **Randomizing a layer** (seeded): weight tensors of 2 or more dimensions are redrawn
  from He's normal ``N(0, 2 / fan_in)``; other parameters (biases) are set to 0;
  normalization layers are reset to the identity (weight 1, bias 0, running mean 0,
  running variance 1). Adebayo et al. redraw from a truncated normal; He's scale keeps the
  activations of a deep randomized stack from vanishing or exploding, so later steps still
  give non-blank maps.
* **Similarity** of an original map ``a`` and a randomized map ``b`` of one image
  (:func:`spearman_similarity`, :func:`ssim_similarity`): Spearman's rank correlation of
  their pixels, and the structural similarity index (SSIM, Wang et al. 2004; scikit-image's
  ``structural_similarity``: 7x7 uniform window, ``data_range`` 1, maps in [0, 1]). A
  constant (blank) randomized map has no ranking: its Spearman similarity is 0. Images
  whose *original* map is blank are left out (nothing to compare).
* **Verdict** (``randomization_test_failed`` row, 1 = fails): after step ``check_step``
  (default 1: the output layer randomized), the mean Spearman similarity over the images is
  still ``>= max_spearman`` (default 0.5). The threshold is a convention (Adebayo et al.
  judge visually; rank correlations of 0.5 and above mean the map's ordering of the
  image's regions largely survived the loss of the model's decision layer).

Cost is bounded by the profile (``evaluate.randomization``: ``max_images``, ``n_steps``):
one heatmap call per step for a few images.

The **data randomization test** of the same paper (opt-in, ``evaluate.randomization.data``;
training glue in :mod:`xcam_assets.evaluate.data_randomization`): the same architecture is
trained by the same recipe on the training split with its label rows randomly permuted
(:func:`permute_labels`; the val labels too, so model selection sees no real signal), a
model that can only memorise. Each method's maps of the same test images from the original
and the permuted-label model are compared (:func:`data_randomization_test`: Spearman and
SSIM per image, as above); the method **fails** (``data_randomization_test_failed``) when
the mean Spearman similarity is still ``>= max_spearman``: maps that barely change when the
labels carry no information do not explain what the model learnt from them. Its cost is a
second training run per architecture.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import nn

__all__ = ["DataRandomizationResult", "RandomizationResult", "cascade_cuts",
           "data_randomization_test", "parameter_layers", "permute_labels",
           "randomization_test", "randomize_layers", "spearman_similarity", "ssim_similarity"]

HeatmapFn = Callable[[nn.Module, np.ndarray], np.ndarray]
"""(model, images (N, H, W) uint8) -> heatmaps (N, H, W) float in [0, 1]."""

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


# --------------------------------------------------------------------------- similarity
def _blank(m: np.ndarray) -> bool:
    return not np.isfinite(m).all() or float(np.ptp(m)) == 0.0


def spearman_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps' pixels; 0 when `b` is constant, nan when
    `a` is."""
    if _blank(a):
        return float("nan")
    if _blank(b):
        return 0.0
    return float(stats.spearmanr(np.ravel(a), np.ravel(b)).statistic)


def ssim_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two [0, 1] maps (scikit-image, 7x7 window, data_range 1); nan when `a` is
    constant."""
    from skimage.metrics import structural_similarity

    if _blank(a):
        return float("nan")
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    win = min(7, *a64.shape)
    win -= 1 - win % 2  # odd
    return float(structural_similarity(a64, b64, data_range=1.0, win_size=max(win, 3)))


# --------------------------------------------------------------------------- randomization
def parameter_layers(model: nn.Module) -> list[str]:
    """Dotted names of the leaf modules that hold parameters, bottom to top."""
    return [name for name, m in model.named_modules()
            if name and not list(m.children()) and any(True for _ in m.parameters(recurse=False))]


def cascade_cuts(n_layers: int, n_steps: int) -> list[int]:
    """How many top layers step 1..n randomizes (module docstring), strictly increasing."""
    if n_layers < 1 or n_steps < 1:
        raise ValueError("need at least one layer and one step")
    if n_steps == 1:
        return [1]
    cuts = [round(1 + (n_layers - 1) * ((k - 1) / (n_steps - 1)) ** 2)
            for k in range(1, n_steps + 1)]
    out: list[int] = []
    for c in cuts:
        if not out or c > out[-1]:
            out.append(c)
    return out


@torch.no_grad()
def randomize_layers(model: nn.Module, names: Sequence[str], seed: int) -> None:
    """Randomize the named modules in place (module docstring), seeded per layer name, so a
    layer gets the same random weights at every step of the cascade."""
    modules = dict(model.named_modules())
    for name in names:
        m = modules[name]
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode()))
                                            % 2**62)
        if isinstance(m, _NORMS):
            if getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            continue
        for p in m.parameters(recurse=False):
            if p.dim() >= 2:
                fan_in = p[0].numel()
                draw = torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / max(fan_in, 1))
                p.copy_(draw.to(p.device, p.dtype))
            else:
                p.zero_()


@dataclass
class RandomizationResult:
    """Per step: the number of randomized layers, the name of the lowest one, and the
    per-image Spearman and SSIM similarities to the original maps (nan: blank original)."""

    layers: list[int]
    lowest: list[str]
    spearman: np.ndarray  # (steps, images)
    ssim: np.ndarray      # (steps, images)

    def failed(self, check_step: int = 1, max_spearman: float = 0.5) -> bool:
        """The verdict of the module docstring (``check_step`` 1-based)."""
        row = self.spearman[min(check_step, len(self.layers)) - 1]
        row = row[np.isfinite(row)]
        return bool(row.size) and float(row.mean()) >= max_spearman


def randomization_test(model: nn.Module, heatmaps: HeatmapFn, images_u8: np.ndarray,
                       n_steps: int = 4, seed: int = 0,
                       original: np.ndarray | None = None) -> RandomizationResult:
    """The cascading randomization test of `heatmaps` on `model` and `images_u8`. The
    model is copied for each step (the caller's model is untouched); ``original``: the
    unmodified model's maps, when the caller has them."""
    names = parameter_layers(model)
    base = heatmaps(model, images_u8) if original is None else original
    base = np.asarray(base, dtype=np.float32)
    cuts = cascade_cuts(len(names), n_steps)
    rho = np.full((len(cuts), len(images_u8)), np.nan)
    ssim = np.full_like(rho, np.nan)
    for s, cut in enumerate(cuts):
        rnd = copy.deepcopy(model)
        randomize_layers(rnd, names[len(names) - cut:], seed=seed)
        maps = np.asarray(heatmaps(rnd, images_u8), dtype=np.float32)
        for i in range(len(images_u8)):
            rho[s, i] = spearman_similarity(base[i], maps[i])
            ssim[s, i] = ssim_similarity(base[i], maps[i])
        del rnd
    return RandomizationResult(layers=list(cuts), lowest=[names[len(names) - c] for c in cuts],
                               spearman=rho, ssim=ssim)


# --------------------------------------------------------------------------- data randomization
def permute_labels(y: np.ndarray, seed: int) -> np.ndarray:
    """`y` with its rows (images) in a seeded random order: each image gets another image's
    whole label vector, so every finding keeps its label multiset (prevalence, class balance)
    and the findings their co-occurrence, while the link between image and label is gone."""
    y = np.asarray(y)
    order = np.random.default_rng(int(seed)).permutation(len(y))
    return y[order]


@dataclass
class DataRandomizationResult:
    """Per image: the Spearman and SSIM similarity of the original model's map to the
    permuted-label model's map (nan: blank original map, left out)."""

    spearman: np.ndarray  # (images,)
    ssim: np.ndarray      # (images,)

    def mean_spearman(self) -> float:
        """Mean over the images with a finite similarity; nan when there is none."""
        row = self.spearman[np.isfinite(self.spearman)]
        return float(row.mean()) if row.size else float("nan")

    def failed(self, max_spearman: float = 0.5) -> bool:
        """The verdict of the module docstring: the maps survived the labels' permutation."""
        mean = self.mean_spearman()
        return bool(np.isfinite(mean)) and mean >= max_spearman


def data_randomization_test(original: np.ndarray, permuted: np.ndarray
                            ) -> DataRandomizationResult:
    """Compare each image's map of the original model (``original``, (N, H, W)) with the
    permuted-label model's map of the same image (``permuted``)."""
    a = np.asarray(original, dtype=np.float32)
    b = np.asarray(permuted, dtype=np.float32)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    rho = np.array([spearman_similarity(a[i], b[i]) for i in range(len(a))], dtype=np.float64)
    ssim = np.array([ssim_similarity(a[i], b[i]) for i in range(len(a))], dtype=np.float64)
    return DataRandomizationResult(spearman=rho, ssim=ssim)
