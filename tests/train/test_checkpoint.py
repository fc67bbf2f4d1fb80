"""Checkpoints: same seed -> same weights, exact resume, local pretrained weights, errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from train_helpers import ZOO, tiny_arrays

from xcam_assets.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from xcam_assets.train.loop import load_resume_state, train_classifier
from xcam_assets.train.recipes import recipe_from_profile
from xcam_assets.train.zoo import ZooError, build_model, resolve_pretrained, state_dict_hash

DATA = tiny_arrays(n_train=8, n_val=4, size=32)


def _train(seed: int, epochs: int = 2, **kw) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(seed)
    model = build_model("resnet18", ZOO, n_classes=1)
    recipe = recipe_from_profile({"epochs": epochs, "lr": 1e-3})
    result = train_classifier(model, *DATA, batch_size=4, seed=seed, recipe=recipe,
                              heads=["fc"], **{"log": lambda m: None, **kw})
    return model, result


def test_same_seed_and_data_give_the_same_weights_hash_on_the_cpu() -> None:
    a, _ = _train(seed=7)
    b, _ = _train(seed=7)
    c, _ = _train(seed=8)
    assert state_dict_hash(a) == state_dict_hash(b) != state_dict_hash(c)


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_ends_with_the_uninterrupted_weights(tmp_path) -> None:
    full, full_result = _train(seed=3, epochs=4)
    state = tmp_path / "resume.pt"

    def crash_after_epoch_2(line: str) -> None:
        if line.startswith("epoch 2/"):
            raise Interrupt

    with pytest.raises(Interrupt):
        _train(seed=3, epochs=4, resume_path=state, fingerprint="run-a", log=crash_after_epoch_2)
    assert load_resume_state(state, "run-a")["global_epoch"] == 2
    logs: list[str] = []
    resumed, result = _train(seed=3, epochs=4, resume_path=state, fingerprint="run-a",
                             log=logs.append)
    assert logs[0].startswith("resuming after epoch 2")
    # progress line: epoch, phase, losses, validation AUC, LR, images/s, time left
    assert re.fullmatch(r"epoch 3/4 \[train\] train_loss=\d+\.\d{4} val_loss=\d+\.\d{4} "
                        r"val_auc=(\d\.\d{3}|nan) lr=1\.00e-03 \d+\.\d img/s, "
                        r"~\d+s left \(at most\)", logs[1]), logs[1]
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4]
    assert result.resumed_from_epoch == 2
    assert state_dict_hash(resumed) == state_dict_hash(full)
    assert [r["val_loss"] for r in result.history] == [r["val_loss"] for r in
                                                       full_result.history]


def test_a_resume_state_for_other_inputs_or_a_corrupt_one_is_ignored(tmp_path) -> None:
    state = tmp_path / "resume.pt"
    _train(seed=3, epochs=1, resume_path=state, fingerprint="run-a")
    logs: list[str] = []
    assert load_resume_state(state, "run-b", logs.append) is None
    assert "for other inputs" in logs[0]
    state.write_bytes(b"not a torch file")
    assert load_resume_state(state, "run-a", logs.append) is None
    assert "unreadable" in logs[1]


def test_checkpoint_reload_is_bit_identical_and_wrong_size_is_explained(tmp_path) -> None:
    model, _ = _train(seed=1, epochs=1)
    save_checkpoint(tmp_path, model, {"architecture": "resnet18", "findings": ["lesion"],
                                      "image_size": 32})
    again = build_model("resnet18", ZOO, n_classes=1)
    load_checkpoint(tmp_path, again)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again(x))
    with pytest.raises(CheckpointError, match="image_size=32"):
        load_checkpoint(tmp_path, build_model("resnet18", ZOO, n_classes=2))
    with pytest.raises(CheckpointError, match="materialize checkpoints"):
        load_checkpoint(tmp_path / "nothing", again)


def test_pretrained_weights_come_from_a_local_file(tmp_path) -> None:
    """ImageNet-style RGB weights: timm sums the stem over RGB for one channel and drops
    the 1000-class head; every other tensor is taken as is."""
    source = timm.create_model("resnet18")
    cache = tmp_path / "weights"
    cache.mkdir()
    save_file(source.state_dict(), str(cache / "resnet18.safetensors"))
    path = resolve_pretrained("resnet18", ZOO, pretrained=True, pretrained_dir="weights",
                              root=tmp_path)
    assert path == cache / "resnet18.safetensors"
    model = build_model("resnet18", ZOO, n_classes=1, pretrained_file=path)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.out_features == 1


def test_missing_pretrained_weights_fail_clearly_and_scratch_needs_none(tmp_path) -> None:
    with pytest.raises(ZooError, match=r"resnet18.*demanded.*tried: .*resnet18\.safetensors"):
        resolve_pretrained("resnet18", ZOO, pretrained=True, pretrained_dir=tmp_path)
    with pytest.raises(ZooError, match="no pretrained_dir configured"):
        resolve_pretrained("resnet18", ZOO, pretrained=True)
    with pytest.raises(ZooError, match="does not exist"):
        resolve_pretrained("resnet18", ZOO, pretrained_file=tmp_path / "nope.pth")
    assert resolve_pretrained("resnet18", ZOO, pretrained=False, pretrained_dir=tmp_path) is None


def test_pylon_encoder_takes_the_local_resnet50_weights(tmp_path: Path) -> None:
    source = timm.create_model("resnet50")
    save_file(source.state_dict(), str(tmp_path / "resnet50.safetensors"))
    path = resolve_pretrained("pylon_resnet50", ZOO, pretrained=True, pretrained_dir=tmp_path)
    model = build_model("pylon_resnet50", ZOO, n_classes=2, pretrained_file=path)
    assert torch.equal(model.encoder.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
