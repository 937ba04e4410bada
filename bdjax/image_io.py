"""The one place images and masks enter bdjax, prepared as the reference prepares them.

Image: RGB (grayscale, RGBA, palette and 16-bit inputs converted), resized to the model size with
Lanczos (aspect ratio not kept), scaled to [-1, 1]. Mask: any non-zero pixel of the first channel
is 1 (edit), resized with nearest neighbour; no blur, no dilation.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image


class InputError(ValueError):
    """An input image or mask that cannot be used; the message names the fix."""


def to_pil(src, what: str) -> Image.Image:
    """A path, a PIL image or a numpy array (uint8/uint16 HxW, HxWx3, HxWx4, or float in [0, 1])."""
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, (str, os.PathLike)):
        try:
            with Image.open(src) as img:
                img.load()
                return img
        except FileNotFoundError:
            raise InputError(f"{what} {src}: no such file") from None
        except OSError as e:
            raise InputError(f"{what} {src} is not a readable image: {e}") from None
    arr = np.asarray(src)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise InputError(f"{what} array has shape {arr.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0 or np.nanmax(arr) > 1 or np.isnan(arr).any()):
            raise InputError(f"float {what} array must lie in [0, 1] (got [{np.nanmin(arr)}, {np.nanmax(arr)}]); "
                             "scale it or pass uint8")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise InputError(f"{what} array has dtype {arr.dtype}; use uint8, uint16, bool or float in [0, 1]")
    return Image.fromarray(arr)


def _rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: keep the top 8 bits, not a clip
        arr = np.asarray(img, dtype=np.int64)
        shift = 8 if img.mode.startswith("I;16") or arr.max(initial=0) <= 0xFFFF else 24
        img = Image.fromarray((np.clip(arr, 0, None) >> shift).astype(np.uint8))
    return img.convert("RGB")


def load_image(src, size: int) -> np.ndarray:
    """[size, size, 3] float32 in [-1, 1]."""
    img = _rgb(to_pil(src, "image"))
    img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0 * 2 - 1


def load_mask(src, size: int, *, image_size: tuple[int, int] | None = None, invert_mask: bool = False) -> np.ndarray:
    """[size, size, 1] float32 in {0, 1}, 1 = region to edit. `src=None` edits everything.

    `image_size` (width, height) of the source image, to warn when the mask was drawn at another size.
    """
    if src is None:
        mask = np.ones((size, size, 1), np.float32)
    else:
        img = to_pil(src, "mask")
        if image_size is not None and img.size != tuple(image_size):
            warnings.warn(f"mask size {img.size} differs from image size {tuple(image_size)}; "
                          "it is resized with nearest neighbour, check that it still covers the right region")
        img = _rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        mask = (np.asarray(img)[..., :1] > 0).astype(np.float32)
    if invert_mask:
        mask = 1 - mask
    if not mask.any():
        raise InputError("the mask selects no pixel to edit" + (" after invert_mask" if invert_mask else "")
                         + ": paint the region to edit with non-zero values")
    if mask.all() and src is not None:
        warnings.warn("the mask selects the whole image: nothing of the background is preserved")
    return mask

