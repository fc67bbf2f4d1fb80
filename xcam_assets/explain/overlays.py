"""Heatmap overlays for people: jet colormap over the grayscale input."""

from __future__ import annotations

import base64

import cv2
import numpy as np


def overlay(image_u8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """BGR image: (1 - alpha) * gray + alpha * jet(heatmap)."""
    gray = cv2.cvtColor(image_u8, cv2.COLOR_GRAY2BGR)
    color = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    return cv2.addWeighted(gray, 1 - alpha, color, alpha, 0)


def montage(images: list[np.ndarray], heatmaps: list[np.ndarray],
            alphas: tuple[float, ...] = (0.0, 0.3, 0.6), tile: int = 128) -> np.ndarray:
    """Rows = images, columns = alpha levels (0 = the input alone)."""
    rows = []
    for img, hm in zip(images, heatmaps, strict=True):
        tiles = [cv2.resize(overlay(img, hm, a), (tile, tile)) for a in alphas]
        rows.append(np.hstack(tiles))
    return np.vstack(rows) if rows else np.zeros((tile, tile * len(alphas), 3), np.uint8)


def png_markdown(image_bgr: np.ndarray, caption: str) -> str:
    ok, png = cv2.imencode(".png", image_bgr)
    return f"{caption}\n\n![{caption}](data:image/png;base64,{base64.b64encode(png.tobytes()).decode()})"
