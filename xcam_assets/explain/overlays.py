"""Heatmap overlays for people: jet colormap over the grayscale input (as in study 5's
figures: the same heatmap superimposed at several alpha levels)."""

from __future__ import annotations

import base64

import cv2
import numpy as np

__all__ = ["encode_png", "labelled", "montage", "overlay", "png_markdown"]


def overlay(image_u8: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """BGR image ``(1 - alpha) * gray + alpha * jet(heatmap)``; ``alpha = 0`` is the input.

    ``heatmap`` in [0, 1] (clipped), same (H, W) as the image; 8-bit rounding as OpenCV's
    ``addWeighted``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError("alpha must be in [0, 1]")
    gray = cv2.cvtColor(np.ascontiguousarray(image_u8, dtype=np.uint8), cv2.COLOR_GRAY2BGR)
    heat = np.nan_to_num(np.asarray(heatmap, dtype=np.float32), nan=0.0)
    color = cv2.applyColorMap(np.uint8(np.clip(heat, 0, 1) * 255), cv2.COLORMAP_JET)
    return cv2.addWeighted(gray, 1 - alpha, color, alpha, 0)


def labelled(tile_bgr: np.ndarray, text: str) -> np.ndarray:
    """The tile with a small white caption (black outline) in its top-left corner."""
    out = tile_bgr.copy()
    scale = max(0.3, out.shape[1] / 400)
    for color, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, text, (3, int(12 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, color,
                    width, cv2.LINE_AA)
    return out


def montage(images: list[np.ndarray], heatmaps: list[np.ndarray],
            alphas: tuple[float, ...] = (0.0, 0.3, 0.6), tile: int = 128,
            captions: list[str] | None = None) -> np.ndarray:
    """Rows = images, columns = alpha levels (0 = the input alone); BGR uint8.

    ``captions`` (one per image) label each row's first tile.
    """
    rows = []
    for i, (img, hm) in enumerate(zip(images, heatmaps, strict=True)):
        tiles = [cv2.resize(overlay(img, hm, a), (tile, tile)) for a in alphas]
        tiles = [labelled(t, f"a={a:g}") for t, a in zip(tiles, alphas, strict=True)]
        if captions:
            cv2.putText(tiles[0], captions[i], (3, tile - 5), cv2.FONT_HERSHEY_SIMPLEX,
                        max(0.3, tile / 400), (255, 255, 255), 1, cv2.LINE_AA)
        rows.append(np.hstack(tiles))
    return np.vstack(rows) if rows else np.zeros((tile, tile * len(alphas), 3), np.uint8)


def encode_png(image_bgr: np.ndarray) -> bytes:
    """PNG bytes of a BGR (or gray) uint8 image."""
    ok, png = cv2.imencode(".png", image_bgr)
    if not ok:
        raise ValueError("PNG encoding failed")
    return png.tobytes()


def png_markdown(image: np.ndarray | bytes, caption: str) -> str:
    """Markdown with the image inline (base64 PNG), for Dagster metadata."""
    png = image if isinstance(image, bytes) else encode_png(image)
    return f"{caption}\n\n![{caption}](data:image/png;base64,{base64.b64encode(png).decode()})"
