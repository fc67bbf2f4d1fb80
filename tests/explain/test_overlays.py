"""Tests for xcam_assets.explain.overlays: exact blends at the alpha extremes, montage layout."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from xcam_assets.explain.overlays import encode_png, montage, overlay, png_markdown


def test_overlay_alpha_extremes_exact() -> None:
    img = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    heat = np.linspace(0, 1, 16).reshape(4, 4)
    assert np.array_equal(overlay(img, heat, 0.0), cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    jet = cv2.applyColorMap(np.uint8(heat * 255), cv2.COLORMAP_JET)
    assert np.array_equal(overlay(img, heat, 1.0), jet)
    # a pixel of gray 128 under heat 0 (jet blue (128, 0, 0) in BGR) at alpha 0.5
    px = overlay(np.full((1, 1), 128, np.uint8), np.zeros((1, 1)), 0.5)[0, 0]
    assert px.tolist() == [128, 64, 64]
    with pytest.raises(ValueError):
        overlay(img, heat, 1.5)


def test_montage_layout_and_png() -> None:
    imgs = [np.zeros((8, 8), np.uint8)] * 3
    heats = [np.ones((8, 8))] * 3
    pic = montage(imgs, heats, alphas=(0.0, 0.5), tile=32, captions=["a", "b", "c"])
    assert pic.shape == (3 * 32, 2 * 32, 3) and pic.dtype == np.uint8
    assert montage([], [], alphas=(0.0, 0.3), tile=16).shape == (16, 32, 3)
    png = encode_png(pic)
    assert png[:4] == b"\x89PNG"
    assert np.array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), pic)
    assert png_markdown(png, "cap").startswith("cap\n\n![cap](data:image/png;base64,")
