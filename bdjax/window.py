"""Window mode: edit a photo at its own size, only around its mask.

The model edits a square of `model_size` pixels (256 or 512). Instead of stretching the whole
photo to that square (image_io.load_image), window mode

1. `decode`s the photo at full resolution (`Photo`: RGB, alpha if any, mask at the photo's size),
2. `choose`s a square `Window` around the mask's bounding box with some context,
3. `crop`s that window (reflection-padded where it passes a border) and resizes it to the model
   size, together with the mask window (padding never edited),
4. lets the model edit it (not this module), and
5. `paste`s the edit back: resized to the window's pixel size and blended through the mask with a
   soft edge of `feather` pixels (`feather_alpha`).

Every pixel farther than `feather` from the mask is byte-identical to the decoded input, and the
input's alpha channel is written back unchanged. Pure numpy and Pillow (no jax).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from bdjax import image_io

# The mask's long side then fills half the window's side: the model sees as much surrounding as
# mask (a quarter of the context on each side), enough to match light and texture.
DEFAULT_CONTEXT = 0.5
# A few photo pixels of soft edge hide the resampling seam without touching the background.
DEFAULT_FEATHER = 4
# The widest soft edge `feather_alpha` accepts (its cost grows with it; wider bands blend the
# edit into the background rather than hiding a seam).
MAX_FEATHER = 64

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DEPTH_NOTE = "16-bit input written as 8-bit"
_FLOAT_NOTE = "floating-point input written as 8-bit"


# --------------------------------------------------------------------------------------------
# Decoding


@dataclasses.dataclass(frozen=True, eq=False)
class Photo:
    """A decoded input at its full resolution, upright (EXIF orientation applied).

    rgb:   [H, W, 3] uint8 (greyscale replicated; 16-bit inputs keep their top 8 bits).
    alpha: [H, W] uint8 taken from an input with an alpha band (RGBA, LA, PA, RGBa, La, or a
           palette/colour-key transparency), written back by `paste`; None otherwise.
    mask:  [H, W] bool, True where the photo is edited (after invert_mask).
    note:  "" or what decoding changed that the user should know (e.g. "16-bit input written
           as 8-bit").
    """
    rgb: np.ndarray
    alpha: np.ndarray | None
    mask: np.ndarray
    note: str = ""

    def __post_init__(self):
        rgb, mask, alpha = self.rgb, self.mask, self.alpha
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape:
            raise ValueError(f"Photo.rgb must be [H, W, 3] uint8, got {rgb.shape} {rgb.dtype}")
        if mask.shape != rgb.shape[:2] or mask.dtype != np.bool_:
            raise ValueError(f"Photo.mask must be [H, W] bool matching rgb {rgb.shape[:2]}, "
                             f"got {mask.shape} {mask.dtype}")
        if alpha is not None and (alpha.shape != rgb.shape[:2] or alpha.dtype != np.uint8):
            raise ValueError(f"Photo.alpha must be None or [H, W] uint8 matching rgb, got {alpha.shape} {alpha.dtype}")

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels, as PIL gives sizes."""
        return self.rgb.shape[1], self.rgb.shape[0]


def decode(image, mask=None, *, invert_mask: bool = False) -> Photo:
    """`image` and `mask` (paths, PIL images or numpy arrays, read by image_io.to_pil: EXIF
    orientation applied, first frame of an animation) as a full-resolution `Photo`.

    The image becomes RGB by image_io.to_rgb; its alpha band, if it has one, is kept. The mask is
    read with image_io.load_mask's rules (`read_mask`) at the photo's size: a mask of another size
    is resized with nearest neighbour, with a warning. No mask edits the whole photo.
    image_io.InputError: an unusable image or mask, or a mask that selects nothing.
    """
    pil = image_io.to_pil(image, "image")
    rgb = np.asarray(image_io.to_rgb(pil, image_io.label_of(image, "image")))
    alpha = _alpha(pil)
    note = _note(image, pil)
    size = pil.size
    del pil
    if mask is None:
        selected = np.ones(rgb.shape[:2], bool)
    else:
        mask_img = image_io.to_pil(mask, "mask")
        if mask_img.size != size:
            image_io.warn_mask_size(mask_img.size, size)
        selected = image_io.read_mask(mask_img, image_io.label_of(mask, "mask"))
        if selected.shape != rgb.shape[:2]:
            small = Image.fromarray(selected.astype(np.uint8) * 255)
            selected = np.asarray(small.resize(size, Image.NEAREST)) > 0
    if invert_mask:
        selected = ~selected
    image_io.check_selection(selected, invert_mask=invert_mask, given=mask is not None)
    return Photo(rgb=rgb, alpha=alpha, mask=selected, note=note)


def _alpha(pil: Image.Image) -> np.ndarray | None:
    """The alpha band of the upright image ([H, W] uint8), or None when it has none."""
    bands = pil.getbands()
    for band in ("A", "a"):  # premultiplied modes (RGBa, La) store alpha as their "a" band
        if band in bands:
            return np.asarray(pil.getchannel(band))
    if "transparency" in pil.info and pil.mode in ("P", "L", "RGB", "1"):  # palette or colour-key transparency
        return np.asarray(pil.convert("RGBA").getchannel("A"))
    return None


def _note(src, pil: Image.Image) -> str:
    if pil.mode in _SIXTEEN_BIT_MODES:
        return _DEPTH_NOTE
    if pil.mode == "F":
        return _FLOAT_NOTE
    if isinstance(src, np.ndarray):  # image_io.to_pil turned a colour array into 8 bits already
        if src.dtype == np.uint16:
            return _DEPTH_NOTE
        if np.issubdtype(src.dtype, np.floating):
            return _FLOAT_NOTE
    return ""


# --------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Window:
    """A square of the photo, in photo pixels: [left, left + side) x [top, top + side). It may
    pass the photo's borders along an axis shorter than `side` (the crop fills that by
    reflection). `photo_size` is the photo's (width, height)."""
    left: int
    top: int
    side: int
    photo_size: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(left, top, right, bottom), right and bottom exclusive, as PIL boxes."""
        return self.left, self.top, self.left + self.side, self.top + self.side

    def scale(self, model_size: int) -> float:
        """Photo pixels per model pixel: > 1 when the model sees the window downscaled."""
        return self.side / model_size

    @property
    def inside(self) -> tuple[int, int, int, int]:
        """The window's intersection with the photo, as a box (left, top, right, bottom)."""
        width, height = self.photo_size
        left, top, right, bottom = self.box
        return max(left, 0), max(top, 0), min(right, width), min(bottom, height)

    def as_dict(self) -> dict:
        """For reports (JSON-ready)."""
        return {"left": self.left, "top": self.top, "side": self.side, "box": list(self.box),
                "inside": list(self.inside), "photo_size": list(self.photo_size)}


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The bounding box (left, top, right, bottom; exclusive) of the True pixels, None if none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def choose(mask: np.ndarray, *, context: float = DEFAULT_CONTEXT, model_size: int) -> Window:
    """The square window the model edits for `mask` ([H, W] bool, True = edit).

    Rule: take the bounding box of all masked pixels together, long side L.
    side = ceil(L * (1 + 2 * context)) (context of context*L on each side of the long side), then
    at least `model_size` (a photo big enough is never upscaled for the model: a tiny mask gets a
    window of model_size pixels) and at most max(W, H) (beyond that only padding would be added).
    The window is centred on the box's centre (rounded down), then along each axis:
    - side <= the axis' length: shifted the least needed to lie inside the photo;
    - side > the axis' length: centred on the photo, passing both borders (the crop reflects).
    The mask's box always lies inside the window: side >= L, centring keeps it inside, a shift
    towards the photo moves the far edge away from the box, and a window centred on a shorter
    axis covers all of it.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a 2-D bool array, got {mask.shape} {mask.dtype}")
    if not (math.isfinite(context) and context >= 0):
        raise ValueError(f"context must be a finite number >= 0, got {context}")
    if int(model_size) != model_size or model_size < 1:
        raise ValueError(f"model_size must be a positive integer, got {model_size}")
    box = mask_box(mask)
    if box is None:
        raise ValueError("the mask selects no pixel: there is no window to edit")
    height, width = mask.shape
    x0, y0, x1, y1 = box
    longest = max(x1 - x0, y1 - y0)
    side = math.ceil(longest * (1 + 2 * context))
    side = min(max(side, int(model_size)), max(width, height))

    def place(lo: int, hi: int, length: int) -> int:
        if side > length:
            return (length - side) // 2
        return min(max((lo + hi - side) // 2, 0), length - side)

    return Window(left=place(x0, x1, width), top=place(y0, y1, height), side=side, photo_size=(width, height))


# --------------------------------------------------------------------------------------------
# Crop and paste


def crop(photo: Photo, window: Window, model_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(source [S, S, 3] uint8, region [S, S] uint8 {0, 255}) with S = model_size: what the model
    edits.

    source: the window cut from the photo, padded by reflection where it passes a border
    (np.pad "reflect", which repeats for pads longer than the axis; "edge" for a 1-pixel axis),
    resized with Lanczos. region: the mask window, padded with 0 (padding is never edited),
    resized with nearest neighbour; if that drops every mask pixel (a mask thinner than the
    scale), each model pixel containing a mask pixel is set instead, so the model always has
    something to edit (for a 1-pixel mask: the model pixel containing it).
    Memory: the photo is cut first (a view), then padded and resized: window-sized temporaries.
    """
    _check_window(photo, window)
    left, top, right, bottom = window.inside
    pads = ((top - window.top, window.top + window.side - bottom),
            (left - window.left, window.left + window.side - right))
    size = (model_size, model_size)

    image = photo.rgb[top:bottom, left:right]
    for axis, pad in enumerate(pads):
        if pad != (0, 0):
            widths = [(0, 0)] * 3
            widths[axis] = pad
            image = np.pad(image, widths, mode="reflect" if image.shape[axis] > 1 else "edge")
    pil = Image.fromarray(np.ascontiguousarray(image))
    del image
    source = np.asarray(pil.resize(size, Image.LANCZOS) if pil.size != size else pil).copy()
    del pil

    selected = photo.mask[top:bottom, left:right]
    region_full = np.pad(selected, pads, mode="constant") if pads != ((0, 0), (0, 0)) else selected
    pil = Image.fromarray(region_full.astype(np.uint8) * 255)
    region = np.asarray(pil.resize(size, Image.NEAREST) if pil.size != size else pil).copy()
    if not region.any():
        ys, xs = np.nonzero(region_full)
        cells = lambda v: np.minimum((v * model_size) // window.side, model_size - 1)  # noqa: E731
        region[cells(ys), cells(xs)] = 255
    return source, region


def feather_alpha(mask_window: np.ndarray, feather: int) -> np.ndarray:
    """[h, w] float32 blending weight of the edit: 1 in the mask; 1 - d / (feather + 1) at
    Euclidean distance 0 < d <= feather (pixels) from the nearest mask pixel; 0 farther.
    feather=0 gives the mask itself. ValueError for feather outside [0, MAX_FEATHER].

    The distance is exact, computed without scipy in 3 * feather + O(1) array operations over
    the mask's box grown by `feather`: first each pixel's vertical distance to a mask pixel of its
    column (up to feather), then d^2 = min over |dx| <= feather of dx^2 + that of column x + dx.
    """
    mask_window = np.asarray(mask_window, bool)
    if isinstance(feather, bool) or int(feather) != feather or not 0 <= feather <= MAX_FEATHER:
        raise ValueError(f"feather must be an integer in [0, {MAX_FEATHER}], got {feather!r}")
    feather = int(feather)
    alpha = np.zeros(mask_window.shape, np.float32)
    box = mask_box(mask_window)
    if box is None:
        return alpha
    if feather == 0:
        alpha[mask_window] = 1
        return alpha
    height, width = mask_window.shape
    x0, y0 = max(box[0] - feather, 0), max(box[1] - feather, 0)
    x1, y1 = min(box[2] + feather, width), min(box[3] + feather, height)
    m = mask_window[y0:y1, x0:x1]

    far = np.float32((feather + 1) ** 2)  # any squared distance beyond the feather
    column = np.where(m, np.float32(0), far)  # squared vertical distance to the column's nearest mask pixel
    for dy in range(1, feather + 1):
        d2 = np.float32(dy * dy)
        np.minimum(column[dy:], np.where(m[:-dy], d2, far), out=column[dy:])
        np.minimum(column[:-dy], np.where(m[dy:], d2, far), out=column[:-dy])
    dist2 = column.copy()
    for dx in range(1, feather + 1):
        d2 = np.float32(dx * dx)
        np.minimum(dist2[:, dx:], column[:, :-dx] + d2, out=dist2[:, dx:])
        np.minimum(dist2[:, :-dx], column[:, dx:] + d2, out=dist2[:, :-dx])
    del column
    weight = np.float32(1) - np.sqrt(dist2) / np.float32(feather + 1)
    weight[dist2 > feather * feather] = 0
    alpha[y0:y1, x0:x1] = weight
    return alpha


def paste(photo: Photo, window: Window, edit: np.ndarray, *, feather: int = DEFAULT_FEATHER) -> np.ndarray:
    """The photo with `edit` ([S, S, 3] uint8, the model's output for `crop(photo, window, S)`)
    blended in: [H, W, 3] uint8, or [H, W, 4] with the input's alpha appended unchanged.

    The edit is resized (Lanczos) to the window's pixel size over the window's part inside the
    photo, and blended over the mask's box grown by `feather` (clipped to the window). There out = round(photo * (1 - alpha) + edit * alpha), alpha = `feather_alpha`
    (clipped to the window: pixels outside it keep the photo's bytes); everywhere else the output
    is a copy of photo.rgb. So pixels with alpha 0 (farther than `feather` from the mask) are
    byte-identical to the decoded input and pixels in the mask are exactly the resized edit.
    Memory: one copy of the photo (the output) plus temporaries the size of the window's inside.
    ValueError: an edit of the wrong shape, or a window that does not hold the whole mask.
    """
    _check_window(photo, window)
    edit = np.asarray(edit)
    if edit.ndim != 3 or edit.shape[0] != edit.shape[1] or edit.shape[2] != 3 or edit.dtype != np.uint8:
        raise ValueError(f"edit must be [S, S, 3] uint8, got {edit.shape} {edit.dtype}")
    if isinstance(feather, bool) or int(feather) != feather or not 0 <= feather <= MAX_FEATHER:
        raise ValueError(f"feather must be an integer in [0, {MAX_FEATHER}], got {feather!r}")
    left, top, right, bottom = window.inside
    inside_mask = photo.mask[top:bottom, left:right]
    box = mask_box(inside_mask)
    if box is None or np.count_nonzero(inside_mask) != np.count_nonzero(photo.mask):
        raise ValueError(f"window {window.box} does not hold the whole mask: choose it with window.choose")

    height, width = photo.rgb.shape[:2]
    out = np.empty((height, width, 3 if photo.alpha is None else 4), np.uint8)
    out[..., :3] = photo.rgb
    if photo.alpha is not None:
        out[..., 3] = photo.alpha

    # The grown mask box, in photo coordinates, clipped to the window's inside.
    x0, y0 = max(left + box[0] - feather, left), max(top + box[1] - feather, top)
    x1, y1 = min(left + box[2] + feather, right), min(top + box[3] + feather, bottom)
    alpha = feather_alpha(photo.mask[y0:y1, x0:x1], feather)
    # The edit is resized over the window's whole inside, whatever the feather, so that the pixels
    # of the mask do not depend on it (a resize over another box rounds differently).
    scale = window.side / edit.shape[0]
    source_box = ((left - window.left) / scale, (top - window.top) / scale,
                  (right - window.left) / scale, (bottom - window.top) / scale)
    resized = np.asarray(Image.fromarray(edit).resize((right - left, bottom - top), Image.LANCZOS, box=source_box))
    resized = resized[y0 - top:y1 - top, x0 - left:x1 - left]

    background = photo.rgb[y0:y1, x0:x1].astype(np.float32)
    a = alpha[..., None]
    blended = np.rint(background * (1 - a) + resized.astype(np.float32) * a).astype(np.uint8)
    touched = alpha > 0
    out[y0:y1, x0:x1, :3][touched] = blended[touched]
    return out


def _check_window(photo: Photo, window: Window) -> None:
    if tuple(window.photo_size) != photo.size:
        raise ValueError(f"window was chosen for a {window.photo_size} photo, this one is {photo.size}")
    left, top, right, bottom = window.inside
    if right <= left or bottom <= top:
        raise ValueError(f"window {window.box} does not overlap the {photo.size} photo")


# --------------------------------------------------------------------------------------------
# Previews


def downscaled(image, max_width: int) -> Image.Image:
    """`image` (PIL image or [H, W, C] uint8 array) as a new PIL image at most `max_width` pixels
    wide, aspect ratio kept (Lanczos; never upscaled): for previews and grids."""
    pil = image.copy() if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    if max_width < 1:
        raise ValueError(f"max_width must be >= 1, got {max_width}")
    pil.thumbnail((max_width, max(pil.height, 1)), Image.LANCZOS)
    return pil
