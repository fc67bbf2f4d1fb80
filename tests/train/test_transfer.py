"""Transfer from another study's checkpoint (the official VinDr protocol starts from NIH)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import ZOO, tiny_arrays

from xcam_assets.train.checkpoint import (
    CheckpointError,
    load_transfer_checkpoint,
    save_checkpoint,
)
from xcam_assets.train.fit import fit_architecture
from xcam_assets.train.recipes import default_recipe
from xcam_assets.train.zoo import build_model, head_prefixes, state_dict_hash


def _source(tmp_path: Path, n_findings: int = 2) -> tuple[Path, dict]:
    torch.manual_seed(1)
    src = build_model("resnet18", ZOO, n_classes=n_findings)
    out = tmp_path / "nih" / "resnet18"
    save_checkpoint(out, src, {"architecture": "resnet18",
                               "findings": [f"f{i}" for i in range(n_findings)],
                               "weights_sha256": state_dict_hash(src)})
    return out, {k: v.clone() for k, v in src.state_dict().items()}


def test_backbone_from_the_checkpoint_fresh_head_for_other_findings(tmp_path: Path) -> None:
    ckpt, src = _source(tmp_path)
    torch.manual_seed(2)
    model = build_model("resnet18", ZOO, n_classes=3)
    fresh_fc = model.fc.weight.detach().clone()
    record = load_transfer_checkpoint(model, ckpt, "resnet18",
                                      head_prefixes(model, "resnet18", ZOO))
    state = model.state_dict()
    assert torch.equal(state["conv1.weight"], src["conv1.weight"])
    assert torch.equal(state["layer4.1.bn2.running_var"], src["layer4.1.bn2.running_var"])
    assert torch.equal(state["fc.weight"], fresh_fc)  # 3 findings: the head starts fresh
    assert record["head"] == "fresh" and record["findings"] == ["f0", "f1"]
    assert len(record["file_sha256"]) == 64


def test_same_findings_take_the_head_too(tmp_path: Path) -> None:
    ckpt, src = _source(tmp_path)
    model = build_model("resnet18", ZOO, n_classes=2)
    record = load_transfer_checkpoint(model, ckpt, "resnet18", ["fc"])
    assert torch.equal(model.state_dict()["fc.weight"], src["fc.weight"])
    assert record["head"] == "loaded"


def test_wrong_architecture_or_partial_file_is_refused(tmp_path: Path) -> None:
    ckpt, _ = _source(tmp_path)
    other = build_model("densenet121", ZOO, n_classes=2)
    with pytest.raises(CheckpointError, match="resnet18 checkpoint cannot initialise densenet121"):
        load_transfer_checkpoint(other, ckpt, "densenet121", ["classifier"])
    # a checkpoint lacking a backbone tensor: no partial load, the file and key named
    from safetensors.torch import load_file, save_file

    state = load_file(str(ckpt / "model.safetensors"))
    del state["layer1.0.conv1.weight"]
    save_file(state, str(ckpt / "model.safetensors"))
    model = build_model("resnet18", ZOO, n_classes=2)
    before = state_dict_hash(model)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: does not fit resnet18 "
                                              r"\(missing \['layer1\.0\.conv1\.weight'\]"):
        load_transfer_checkpoint(model, ckpt, "resnet18", ["fc"])
    assert state_dict_hash(model) == before


def test_fit_starts_from_the_checkpoint(tmp_path: Path) -> None:
    """Through the training entry point: one epoch from the NIH-like weights moves them
    only by training (the start is the checkpoint, not a fresh init)."""
    ckpt, src = _source(tmp_path)
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=8, n_val=4, size=32, n_findings=3)
    kwargs = dict(recipe=default_recipe(1, 1e-9), batch_size=4, seeds=[0], image_size=32,
                  device=torch.device("cpu"), base_fingerprint={}, resume=False,
                  log=lambda m: None)
    moved = fit_architecture("resnet18", ZOO, 3, x_tr, y_tr, x_va, y_va,
                             out_dir=tmp_path / "a", init_checkpoint=ckpt, **kwargs)
    conv = moved.model.state_dict()["conv1.weight"]
    # lr 1e-9: the backbone stays (numerically) the checkpoint's
    assert torch.allclose(conv, src["conv1.weight"], atol=1e-6)
    scratch = fit_architecture("resnet18", ZOO, 3, x_tr, y_tr, x_va, y_va,
                               out_dir=tmp_path / "b", **kwargs)
    assert not torch.allclose(scratch.model.state_dict()["conv1.weight"], src["conv1.weight"])


def test_vindr_profile_is_the_official_two_phase_transfer(tmp_path: Path) -> None:
    """resources/studies/vindr.yaml: two phases on the NIH plateau rule, BatchNorm in train
    mode while the encoder is frozen, weights from the NIH checkpoint of the same
    architecture (a clear error naming the folder while it is absent)."""
    from xcam_assets.config import load_settings
    from xcam_assets.train.recipes import recipe_from_profile
    from xcam_assets.train.stage import init_checkpoint_dir

    repo = Path(__file__).resolve().parents[2]
    settings = load_settings(root=repo, study="vindr", profile="gpu")
    recipe = recipe_from_profile(settings.profile)
    assert [p.freeze_backbone for p in recipe.phases] == [True, False]
    assert recipe.phases[0].frozen_bn == "train"
    assert all(p.schedule == "plateau" and p.lr == 1e-4 for p in recipe.phases)
    assert len(settings.findings) == 14 and "Nodule/Mass" in settings.findings
    with pytest.raises(FileNotFoundError, match=r"init_checkpoint for pylon_efficientnet_lite0: "
                                                r"no checkpoint at .*nih/data/checkpoints/"
                                                r"pylon_efficientnet_lite0"):
        init_checkpoint_dir(settings, "pylon_efficientnet_lite0")
