"""Every zoo entry builds, trains one step, round-trips a checkpoint and gives a CAM (CPU, small)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from train_helpers import ZOO, tiny_arrays

from xcam_assets.explain.cams import compute_heatmaps, reshape_transform_for
from xcam_assets.train.checkpoint import load_model, save_checkpoint
from xcam_assets.train.loop import predict_logits, train_classifier
from xcam_assets.train.recipes import recipe_from_profile
from xcam_assets.train.zoo import (
    ZooError,
    build_model,
    head_prefixes,
    state_dict_hash,
    target_layers,
)

REQUIRED = {"vgg16", "vgg19", "resnet18", "resnet34", "resnet50", "resnet101", "vit_small",
            "vit_base", "vit_large", "densenet121", "densenet169", "densenet201",
            "pylon_resnet50"}
#: heavy at any size on 2 CPU cores (100M+ parameters): still run, marked slow
HEAVY = {"vgg16", "vgg19", "vit_large"}
SIZE = 32  # ViT patch 16 -> a 2x2 token grid; PYLON's pyramid copes via ceil-mode pooling


def test_the_zoo_holds_the_studies_architectures() -> None:
    assert REQUIRED <= set(ZOO)
    for name, entry in ZOO.items():
        assert {"timm_name", "target_layer", "in_chans", "head"} <= set(entry), name
        if entry.get("family") == "vit":
            assert entry["reshape_transform"] and entry["image_size_kwarg"] == "img_size"


def _entries() -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in ZOO]


@pytest.mark.parametrize("name", _entries())
def test_entry_builds_trains_one_step_and_round_trips(name: str, tmp_path) -> None:
    x_tr, y_tr, x_va, y_va = tiny_arrays(n_train=2, n_val=2, size=SIZE)
    torch.manual_seed(0)
    model = build_model(name, ZOO, n_classes=1, image_size=SIZE)
    first = next(p for p in model.parameters()).detach().clone()
    recipe = recipe_from_profile({"epochs": 1, "lr": 1e-3})
    result = train_classifier(model, x_tr, y_tr, x_va, y_va, batch_size=2, seed=0,
                              recipe=recipe, heads=head_prefixes(model, name, ZOO),
                              log=lambda m: None)
    assert len(result.history) == 1 and result.best_epoch == 1
    assert not torch.equal(next(p for p in model.parameters()), first)  # a step was taken
    logits = predict_logits(model, x_va)
    assert logits.shape == (2, 1) and np.isfinite(logits).all()

    sidecar = {"architecture": name, "findings": ["lesion"], "in_chans": 1,
               "image_size": SIZE, "weights_sha256": state_dict_hash(model)}
    save_checkpoint(tmp_path / name, model, sidecar, "# card\n")
    reloaded, meta = load_model(tmp_path / name, ZOO)
    assert meta["weights_sha256"] == state_dict_hash(reloaded)
    np.testing.assert_array_equal(predict_logits(reloaded, x_va), logits)  # bit-identical

    # the CAM target layer(s) and reshape transform give a heatmap at input size
    layers = target_layers(reloaded, name, ZOO)
    maps = compute_heatmaps(reloaded, layers, x_va[:1], "gradcam-norelu", 0,
                            reshape_transform=reshape_transform_for(name, ZOO))
    assert maps.shape == (1, SIZE, SIZE) and np.isfinite(maps).all()
    assert 0.0 <= maps.min() and maps.max() <= 1.0


def test_vit_position_embedding_follows_the_profile_image_size() -> None:
    model = build_model("vit_small", ZOO, n_classes=1, image_size=64)
    assert tuple(model.pos_embed.shape) == (1, 1 + 4 * 4, 384)
    grid = reshape_transform_for("vit_small", ZOO)(torch.zeros(2, 17, 384))
    assert tuple(grid.shape) == (2, 384, 4, 4)


def test_unknown_architecture_names_the_known_ones() -> None:
    with pytest.raises(ZooError, match="not in resources/models.yaml.*resnet18"):
        build_model("resnet9000", ZOO, n_classes=1)


def test_head_prefixes_cover_only_the_classifier() -> None:
    model = build_model("resnet18", ZOO, n_classes=1)
    assert head_prefixes(model, "resnet18", ZOO) == ["fc"]
    with pytest.raises(ZooError, match="matches no parameter"):
        head_prefixes(model, "bad", {"bad": {**ZOO["resnet18"], "head": ["nope"]}})
