"""CLAHE and geometry: decoded radiograph -> fixed-size uint8 tensor.

Order follows the studies: bit-depth-normalised image -> CLAHE at native
resolution (OpenCV) -> optional zero padding to a square (keeps the aspect
ratio) -> area resize to the profile's size. Boxes and masks go through the
same geometry (`Geometry`) so ground truth stays on the lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Geometry:
    """Maps source pixel coordinates to the stored tensor: x' = (x + pad_x) * scale_x."""

    pad_x: int
    pad_y: int
    scale_x: float
    scale_y: float
    size: int

    def boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Transform (k, 4) x_min, y_min, x_max, y_max boxes (x_max exclusive)."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] + self.pad_x) * self.scale_x
        b[:, [1, 3]] = (b[:, [1, 3]] + self.pad_y) * self.scale_y
        return np.clip(b, 0, self.size)

    def mask(self, mask: np.ndarray) -> np.ndarray:
        """Transform a boolean mask: pad, area-resize, keep pixels >= half covered."""
        m = mask.astype(np.float32)
        m = _pad(m, self.pad_x, self.pad_y)
        m = cv2.resize(m, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return m >= 0.5


def _pad(img: np.ndarray, pad_x: int, pad_y: int) -> np.ndarray:
    if pad_x == 0 and pad_y == 0:
        return img
    h, w = img.shape
    side = max(h, w)
    return cv2.copyMakeBorder(img, pad_y, side - h - pad_y, pad_x, side - w - pad_x,
                              cv2.BORDER_CONSTANT, value=0)


def geometry_for(shape: tuple[int, int], size: int, pad_to_square: bool) -> Geometry:
    h, w = shape
    if pad_to_square:
        side = max(h, w)
        pad_x, pad_y = (side - w) // 2, (side - h) // 2
        return Geometry(pad_x, pad_y, size / side, size / side, size)
    return Geometry(0, 0, size / w, size / h, size)


def apply_clahe(image_u8: np.ndarray, clip_limit: float, tile_grid: int) -> np.ndarray:
    """OpenCV CLAHE on an 8-bit image (8-bit keeps OpenCV's histogram exact and fast)."""
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid),) * 2)
    return clahe.apply(np.ascontiguousarray(image_u8, dtype=np.uint8))


def clahe_tensor(
    image_u8: np.ndarray, clip_limit: float, tile_grid: int, size: int, pad_to_square: bool
) -> tuple[np.ndarray, Geometry]:
    """CLAHE, then pad/resize to `size` x `size`; returns the tensor and its geometry."""
    geom = geometry_for(image_u8.shape, size, pad_to_square)
    out = apply_clahe(image_u8, clip_limit, tile_grid)
    out = _pad(out, geom.pad_x, geom.pad_y)
    out = cv2.resize(out, (size, size), interpolation=cv2.INTER_AREA)
    return out, geom
