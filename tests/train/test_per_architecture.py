"""`per_architecture:` in a profile: training keys laid over the profile for one model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train_stage import _prepare

from xcam_assets.config import load_settings
from xcam_assets.train.recipes import recipe_from_profile


def test_training_profile_lays_the_architecture_keys_over_the_profile() -> None:
    s = load_settings(study="nih", profile="cpu")
    lite0 = s.training_profile("efficientnet_lite0")
    scratch = s.training_profile("resnet18")
    pylon = s.training_profile("pylon_efficientnet_lite0")
    # the study gives its pretrained CNN more epochs, the from-scratch contrast fewer, and
    # PYLON the profile's; nothing else differs
    assert lite0["epochs"] == s.profile["per_architecture"]["efficientnet_lite0"]["epochs"]
    assert scratch["epochs"] == s.profile["per_architecture"]["resnet18"]["epochs"]
    assert pylon["epochs"] == s.profile["epochs"]
    assert len({lite0["epochs"], scratch["epochs"], pylon["epochs"]}) == 3
    assert "per_architecture" not in lite0
    assert {k: v for k, v in lite0.items() if k != "epochs"} == {
        k: v for k, v in scratch.items() if k != "epochs"}
    assert recipe_from_profile(lite0).phases[0].epochs == lite0["epochs"]


def test_per_architecture_refuses_unknown_models_and_non_training_keys() -> None:
    s = load_settings(profile="tiny")
    bad_arch = s.__class__(root=s.root, data_dir=s.data_dir, profile_name="tiny", params={
        **s.params, "profiles": {"tiny": {**s.profile,
                                          "per_architecture": {"vgg16": {"epochs": 3}}}}})
    with pytest.raises(ValueError, match=r"per_architecture names \['vgg16'\]"):
        bad_arch.training_profile("resnet18")
    bad_key = s.__class__(root=s.root, data_dir=s.data_dir, profile_name="tiny", params={
        **s.params, "profiles": {"tiny": {**s.profile,
                                          "per_architecture": {"resnet18": {"image_size": 32}}}}})
    with pytest.raises(ValueError, match=r"per_architecture.resnet18 sets \['image_size'\]"):
        bad_key.training_profile("resnet18")


@pytest.mark.slow
def test_a_per_architecture_epoch_count_reaches_the_trained_checkpoint(project: Path) -> None:
    from xcam_assets.orchestrate import materialize_stage

    s = _prepare(project, {"image_size": 32, "epochs": 1, "batch_size": 8, "resume": False,
                           "architectures": ["resnet18", "densenet121"],
                           "per_architecture": {"densenet121": {"epochs": 2}}})
    materialize_stage("train", s, log=lambda m: None)
    epochs = {a: len(json.loads((s.checkpoints_dir / a / "model.json").read_text())["history"])
              for a in s.architectures}
    assert epochs == {"resnet18": 1, "densenet121": 2}
    side = json.loads((s.checkpoints_dir / "densenet121" / "model.json").read_text())
    assert side["parameters"]["epochs"] == 2 and side["recipe"]["phases"][0]["epochs"] == 2
