"""xcam's PYLON and baseline reproduce the authors' code to < 1e-5 (logits, class maps, eval map).

Fixture ``data/pylon_reference/pylon_reference.npz`` (~0.9 MB) was made ONCE, outside the
repository, by running the official modules unmodified: github.com/cmb-chula/pylon at
e2d493c (``pylon.py``: Pylon/PylonConfig; ``model/baseline.py``: BaselineModel;
``utils/localization.py``: argmax_2d_single) on segmentation_models_pytorch 0.1.3 (the
version its requirements.txt pins) with timm 0.3.2, torch 2.14.1 (this project's). Recipe::

    # repo via the GitHub snapshot; `git archive HEAD -- pylon.py model trainer utils data`
    python3.11 -m venv /tmp/pylon_ref/venv          # + a .pth to .venv's site-packages (torch)
    pip install --no-deps segmentation-models-pytorch==0.1.3 pretrainedmodels==0.7.4 \\
        efficientnet-pytorch==0.6.3 timm==0.3.2     # + a torch._six shim (gone in torch 2)
    cd pylon && python make_fixture.py              # script kept outside the repo

The script: for each model, ``Pylon(PylonConfig(n_in=1, n_out=3, backbone='resnet18',
weights=None, n_dec_ch=8, up_type='2layer' | '1layer'))`` and ``BaselineModel(
BaselineModelConfig(n_out=3, backbone='resnet18', n_in=1, weights=None))``; the encoder's
weights are overwritten by :func:`fill_encoder` (a formula, so 11 M numbers need not be
stored; the fixture keeps the sorted key list to check both sides fill the same tensors);
for PYLON, decoder/head conv weights keep the official initialisation while every bias and
BN weight/bias/running stat is redrawn (seed 11: ``0.5 + U[0,1)`` for BN weights and running
variances, ``0.1 * N(0,1)`` otherwise) so the biases are exercised; the baseline's ``out``
conv keeps its default init. Stored: the input (``torch.rand`` 1x1x256x256, seed 7; 256 px
is the smallest size the official pyramid pools without error), those decoder/head/``out``
weights under their official names (``<model>/w/<name>``), ``.eval()`` outputs ``pred``
(logits) and ``pred_seg`` (class maps), and the official evaluation map per class
(LocalizationAccCb sigmoid -> ``F.interpolate(.., (256, 256), 'bilinear',
align_corners=False)`` -> argmax_2d_single): argmax, sum, max. The official
``utils/localization.py`` calls ``torch.set_num_threads(1)`` on import, so those outputs are
single-threaded; the test runs single-threaded too and matches bit for bit on the machine that
made the fixture (multi-threaded: ~4e-6 apart, float32 summation order; float64: ~5e-6).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from xcam_assets.train.pylon import (
    Pylon,
    PylonBaseline,
    build_pylon,
    build_pylon_baseline,
    official_eval_map,
)

FIXTURE = Path(__file__).parent / "data" / "pylon_reference" / "pylon_reference.npz"
TOL = 1e-5


def fill_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder weights of the fixture: sorted keys, one generator (same as its script)."""
    g = torch.Generator().manual_seed(20240501)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(state):
        t = state[key]
        if key.endswith("num_batches_tracked"):
            continue
        if key.endswith("running_var") or (t.ndim == 1 and key.endswith("weight")):
            out[key] = 0.5 + torch.rand(t.shape, generator=g)
        elif t.ndim == 1:  # BN bias, running_mean
            out[key] = 0.1 * torch.randn(t.shape, generator=g)
        else:  # conv weight
            out[key] = torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5
    return out


def xcam_key(official: str) -> str:
    """Official state-dict name -> xcam's (ConvBnRelu .conv/.bn -> Sequential .0/.1)."""
    k = re.sub(r"^net\.encoder\.", "encoder.", official)
    k = re.sub(r"^net\.segmentation_head\.0\.|^out\.", "head.", k)
    k = re.sub(r"^net\.(?!decoder\.)", "encoder.", k)  # the baseline's encoder is `net`
    k = k.removeprefix("net.")

    def up(m: re.Match[str]) -> str:  # UP: conv1[.L].{conv,bn} -> lateral.{3L, 3L+1}
        return f"{m[1]}.lateral.{3 * int(m[2] or 0) + (m[3] == 'bn')}."

    k = re.sub(r"^(decoder\.up\d)\.conv1\.(?:(\d)\.)?(conv|bn)\.", up, k)
    return re.sub(r"^(decoder\.pa\.(?:mid|down\d|conv\d))(?:\.\d)?\.(conv|bn)\.",
                  lambda m: f"{m[1]}.{int(m[2] == 'bn')}.", k)


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as z:
        return {k: z[k] for k in z.files}


def _load_official(model: nn.Module, ref: dict[str, np.ndarray], name: str) -> None:
    """Formula encoder + the fixture's decoder/head weights; every tensor supplied exactly once."""
    enc = fill_encoder(model.encoder.state_dict())
    assert sorted(enc) == list(ref["encoder_keys"])
    new = {f"encoder.{k}": v for k, v in enc.items()}
    prefix = f"{name}/w/"
    for key in (k for k in ref if k.startswith(prefix)):
        new[xcam_key(key[len(prefix):])] = torch.from_numpy(ref[key])
    state = model.state_dict()
    assert set(new) == {k for k in state if not k.endswith("num_batches_tracked")}
    for k, v in new.items():
        assert state[k].shape == v.shape, k
    model.load_state_dict(state | new)
    model.eval()


def _check(model: nn.Module, ref: dict[str, np.ndarray], name: str) -> None:
    x = torch.from_numpy(ref["input"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture: float32 sums in the same order (0.0 diff here)
    try:
        with torch.no_grad():
            logits, maps = model(x), model.class_maps(x)
    finally:
        torch.set_num_threads(threads)
    want_logits = torch.from_numpy(ref[f"{name}/logits"])
    want_maps = torch.from_numpy(ref[f"{name}/maps"])
    assert maps.shape == want_maps.shape and logits.shape == want_logits.shape
    assert (logits - want_logits).abs().max().item() < TOL
    assert (maps - want_maps).abs().max().item() < TOL
    # the official evaluation map: its argmax lands where ours peaks, sums and maxima agree
    ev = official_eval_map(maps, x.shape[-1])[0]
    assert ev.dtype == torch.float32 and ev.shape == (maps.shape[1], *x.shape[-2:])
    for c, (row, col) in enumerate(ref[f"{name}/eval_argmax"]):
        assert ev[c].max().item() - ev[c, row, col].item() < TOL
    np.testing.assert_allclose(ev.double().sum(dim=(-2, -1)).numpy(), ref[f"{name}/eval_sum"],
                               rtol=1e-6)
    np.testing.assert_allclose(ev.amax(dim=(-2, -1)).numpy(), ref[f"{name}/eval_max"],
                               atol=TOL, rtol=0)


def test_fixture_is_what_the_docstring_says(ref: dict[str, np.ndarray]) -> None:
    meta = json.loads(str(ref["meta"]))
    assert meta["official"] == "github.com/cmb-chula/pylon@e2d493c" and meta["smp"] == "0.1.3"
    assert (meta["backbone"], meta["n_out"], meta["n_dec_ch"], meta["size"]) == (
        "resnet18", 3, 8, 256)
    assert FIXTURE.stat().st_size < 2_000_000


@pytest.mark.parametrize("up_layers", [2, 1])
def test_pylon_matches_the_official_module(ref: dict[str, np.ndarray], up_layers: int) -> None:
    model = build_pylon("resnet18", 3, 1, {}, decoder_channels=8, up_layers=up_layers)
    assert isinstance(model, Pylon)
    name = f"up{up_layers}layer"
    _load_official(model, ref, name)
    _check(model, ref, name)


def test_baseline_matches_the_official_module(ref: dict[str, np.ndarray]) -> None:
    model = build_pylon_baseline("resnet18", 3, 1, {})
    assert isinstance(model, PylonBaseline)
    _load_official(model, ref, "baseline")
    _check(model, ref, "baseline")


def test_official_key_map_covers_both_up_variants() -> None:
    assert xcam_key("net.decoder.up3.conv1.1.bn.running_var") == "decoder.up3.lateral.4.running_var"
    assert xcam_key("net.decoder.up1.conv1.conv.weight") == "decoder.up1.lateral.0.weight"
    assert xcam_key("net.decoder.pa.down2.1.conv.bias") == "decoder.pa.down2.0.bias"
    assert xcam_key("net.decoder.pa.conv3.bn.weight") == "decoder.pa.conv3.1.weight"
    assert xcam_key("net.encoder.layer1.0.bn1.weight") == "encoder.layer1.0.bn1.weight"
    assert xcam_key("net.layer4.1.conv2.weight") == "encoder.layer4.1.conv2.weight"
    assert xcam_key("out.bias") == "head.bias"
    # the old call shape (a zoo entry dict) still builds, reading up_layers from the entry
    old = build_pylon({"timm_name": "resnet18", "decoder_channels": 8, "up_layers": 1}, 2, 1, {})
    assert old.up_layers == 1 and len(old.decoder.up1.lateral) == 3
