"""The one place images and masks enter bdjax, prepared as the reference prepares them.

Image: RGB (see `to_rgb` for each Pillow mode), resized to the model size with Lanczos (aspect
ratio not kept), scaled to [-1, 1]. Mask: any non-zero pixel of the first channel is 1 (edit),
resized with nearest neighbour; no blur, no dilation.

Unlike the reference, files are turned upright by their EXIF orientation (phone photos), an
animated file (GIF, APNG, multi-page TIFF) gives its first frame with a warning, and a file whose
header declares more than `MAX_PIXELS` pixels is refused before it is decoded.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

# The most pixels a file may declare: Pillow's own hard limit (twice its default
# Image.MAX_IMAGE_PIXELS; about 13,000 x 13,000), applied even where that global is raised or None.
MAX_PIXELS = 178_956_970
_BOMB_FIX = "downscale it first; the model sees it at 256 or 512 pixels square"

# Modes Pillow converts to RGB faithfully; alpha is dropped (colours are kept as they are, not
# composited over a background), palettes are looked up, CMYK/YCbCr/LAB/HSV are converted.
_PILLOW_RGB = frozenset({"1", "L", "P", "PA", "LA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class InputError(ValueError):
    """An input image or mask that cannot be used; the message names the fix."""


def to_pil(src, what: str) -> Image.Image:
    """A path, a PIL image or a numpy array (uint8/uint16 HxW, HxWx3, HxWx4, or float in [0, 1]) as
    a decoded single-frame PIL image, upright: its EXIF orientation applied, the first frame of an
    animation (with a warning)."""
    if isinstance(src, (str, os.PathLike)):
        return _open(src, what)
    img = src if isinstance(src, Image.Image) else _from_array(src, what)
    return _decoded(img, what, getattr(img, "filename", "") or "")


def _open(path, what: str) -> Image.Image:
    if not os.fspath(path):
        raise InputError(f"the {what} path is empty")
    try:
        with warnings.catch_warnings():
            # Pillow warns between its default limit and twice it; _decoded checks MAX_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                return _decoded(img, what, path)
    except Image.DecompressionBombError as e:  # Pillow's own check, in Image.open, came first
        raise InputError(f"{what} {path} is too large to decode ({str(e).rstrip('.')}): {_BOMB_FIX}") from None
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except InputError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # what Pillow raises on damaged files
        raise InputError(f"{what} {path} is not a readable image: {e}") from None


def _decoded(img: Image.Image, what: str, name) -> Image.Image:
    """`img` decoded and upright; if animated, its first frame as a plain in-memory image (so it
    warns once), the caller's image left at the frame it was on. Sizes are checked first."""
    label = f"{what} {name}" if name else what
    width, height = img.size
    if width * height > MAX_PIXELS:
        raise InputError(f"{label} is too large to decode: it declares {width}x{height} pixels, more than "
                         f"{MAX_PIXELS:,} (a decompression bomb?): {_BOMB_FIX}")
    if width == 0 or height == 0:
        raise InputError(f"{label} is empty ({width}x{height} pixels)")
    frames = getattr(img, "n_frames", 1)
    if frames <= 1:
        img.load()
        return _upright(img, what)
    warnings.warn(f"{label} has {frames} frames (an animation or a multi-page file): only its first frame is used")
    current = img.tell()
    img.seek(0)
    try:
        img.load()
        upright = _upright(img, what)
        return img.copy() if upright is img else upright
    finally:
        img.seek(current)


def _upright(img: Image.Image, what: str) -> Image.Image:
    """`img` turned as its EXIF Orientation tag says (a new image, without the tag), else `img`."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception as e:  # Pillow's EXIF parser raises many types on damaged data
        warnings.warn(f"{what}: its EXIF data cannot be read ({e}); its orientation is not applied")
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def _from_array(src, what: str) -> Image.Image:
    arr = np.asarray(src)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise InputError(f"{what} array has shape {arr.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2 and (arr.dtype == np.uint16 or np.issubdtype(arr.dtype, np.floating)):
        # kept at full depth (modes I;16 and F), converted by to_rgb; masks read any non-zero value
        return Image.fromarray(arr if arr.dtype == np.uint16 else arr.astype(np.float32))
    if np.issubdtype(arr.dtype, np.floating):
        arr = _unit_floats_to_uint8(arr, f"float {what} array", "pass it scaled to [0, 1] or as uint8")
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise InputError(f"{what} array has dtype {arr.dtype}; use uint8, uint16, bool or float in [0, 1]")
    return Image.fromarray(arr)


def _unit_floats_to_uint8(arr: np.ndarray, subject: str, fix: str) -> np.ndarray:
    """Floats in [0, 1] as uint8 0..255; anything else (NaN, infinities, other ranges) is refused."""
    if np.isnan(arr).any():
        raise InputError(f"{subject} holds NaN values; floating-point images must lie in [0, 1]: {fix}")
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise InputError(f"{subject} has values in [{arr.min():g}, {arr.max():g}]; floating-point images "
                         f"must lie in [0, 1]: {fix}")
    return np.round(arr.astype(np.float32) * 255).astype(np.uint8)


def to_rgb(img: Image.Image, what: str = "image") -> Image.Image:
    """`img` in mode RGB, each Pillow mode handled explicitly; `what` names it in errors.

    1, L, P, PA, LA, La, RGB, RGBA, RGBa, RGBX, CMYK, YCbCr, LAB, HSV: Pillow's conversion; alpha
    is dropped (RGBA keeps its colours, transparent pixels included; premultiplied modes are
    un-premultiplied first). I;16*: 16-bit grey, its top 8 bits. I: read as 16-bit grey, refused
    outside [0, 65535]. F: floats in [0, 1] scaled to 0..255, refused otherwise (Pillow would
    clip them to near black). Any other mode is refused.
    """
    mode = img.mode
    if mode == "La":
        img, mode = img.convert("LA"), "LA"
    if mode in _PILLOW_RGB:
        return img.convert("RGB")
    fix = "save it as 8-bit RGB or greyscale (e.g. PNG)"
    if mode in _SIXTEEN_BIT:
        grey = (np.asarray(img).astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "I":  # 32-bit integers: no defined range, so only 16-bit content is accepted
        values = np.asarray(img)
        if values.size and (values.min() < 0 or values.max() > 0xFFFF):
            raise InputError(f"{what} is a 32-bit integer image with values in [{values.min()}, {values.max()}], "
                             f"outside the 16-bit range bdjax reads such images in: {fix}")
        grey = (values >> 8).astype(np.uint8)
    elif mode == "F":
        grey = _unit_floats_to_uint8(np.asarray(img), f"{what}, a floating-point image,",
                                     f"scale it to [0, 1] or {fix}")
    else:
        raise InputError(f"{what} has Pillow mode {mode!r}, which bdjax cannot convert to RGB faithfully: {fix}")
    return Image.fromarray(grey).convert("RGB")


def label_of(src, what: str) -> str:
    """`what` and the file it came from, where known."""
    name = src if isinstance(src, (str, os.PathLike)) else getattr(src, "filename", "")
    return f"{what} {name}" if name else what


def load_image(src, size: int) -> np.ndarray:
    """[size, size, 3] float32 in [-1, 1]."""
    img = to_rgb(to_pil(src, "image"), label_of(src, "image"))
    img = img.resize((size, size), Image.LANCZOS)
    return np.asarray(img, np.float32) / 255.0 * 2 - 1


def read_mask(img: Image.Image, label: str = "mask") -> np.ndarray:
    """[h, w] bool at the mask image's own size, True where it selects (`load_mask`'s
    rules): 16-bit, 32-bit-integer and float masks select every non-zero value (NaN refused with
    InputError); any other mode is converted by to_rgb and its first channel
    read, non-zero selects."""
    if img.mode in _SIXTEEN_BIT or img.mode in ("I", "F"):  # non-zero at full depth, not the top 8 bits
        values = np.asarray(img)
        if np.isnan(values).any():
            raise InputError(f"{label} holds NaN values: save it with 0 where the image is kept and "
                                      "non-zero where it is edited")
        return values != 0
    if img.mode == "L":  # to_rgb's first channel is L itself; skip the 3-channel copy
        return np.asarray(img) > 0
    return np.asarray(to_rgb(img, label))[..., 0] > 0


def check_selection(mask: np.ndarray, *, invert_mask: bool, given: bool) -> None:
    """Refuse a mask (bool or {0, 1}, after invert_mask) that selects nothing; warn when a given
    mask selects everything."""
    if not mask.any():
        raise InputError("the mask selects no pixel to edit" + (" after invert_mask" if invert_mask else "")
                         + ": paint the region to edit with non-zero values")
    if mask.all() and given:
        warnings.warn("the mask selects the whole image: nothing of the background is preserved")


def warn_mask_size(mask_size, image_size) -> None:
    warnings.warn(f"mask size {tuple(mask_size)} differs from image size {tuple(image_size)}; it is resized with "
                  "nearest neighbour, check that it still covers the right region")


def load_mask(src, size: int, *, image_size: tuple[int, int] | None = None, invert_mask: bool = False) -> np.ndarray:
    """[size, size, 1] float32 in {0, 1}, 1 = region to edit. `src=None` edits everything.

    The mask is read by `read_mask` and resized with nearest neighbour. `image_size` (width,
    height) of the upright source image, to warn when the mask was drawn at another size.
    """
    if src is None:
        mask = np.ones((size, size, 1), np.float32)
    else:
        img = to_pil(src, "mask")
        if image_size is not None and img.size != tuple(image_size):
            warn_mask_size(img.size, image_size)
        img = Image.fromarray(read_mask(img, label_of(src, "mask")).astype(np.uint8) * 255)
        if img.size != (size, size):
            img = img.resize((size, size), Image.NEAREST)
        mask = (np.asarray(img)[..., None] > 0).astype(np.float32)
    if invert_mask:
        mask = 1 - mask
    check_selection(mask, invert_mask=invert_mask, given=src is not None)
    return mask
