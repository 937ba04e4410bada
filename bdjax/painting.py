"""The image and mask of an edit painted in an image editor (the web app's, or any other).

An image editor hands back the photo (its background) and the layers painted over it: RGBA
images, transparent where nothing was painted and where strokes were erased. The region to edit is
every pixel that any layer covers (alpha above 0, whatever the colour); a layer without alpha
covers its non-zero pixels.

The photo is passed on at its full resolution, as the editor gives it: window mode
(bdjax/window.py) edits it at its own size. The mask is made at that same size: a layer drawn
at another size (an editor that paints on a downscaled canvas) is resized to the photo's with
nearest neighbour, so a stroke maps to the same region of the full-size photo. An editor's
canvas is always RGBA: a fully opaque alpha channel is dropped, so that the results are RGB as
the uploaded photo was (a photo with transparency keeps it, and window mode writes it back).

A mask file may be uploaded instead of painting; it is read as `--mask` is (non-zero pixels
edited). Inverting (edit the unpainted pixels, to replace a background) is left to
`request.prepare(..., invert_mask=True)`, as for a mask file.

An editor that starts a stroke only on its canvas cannot paint a stroke begun outside the photo,
which makes masks at the photo's edge hard to paint. `framed` puts the photo into the editor with
a transparent margin around it (`margin` pixels on each side): a stroke may begin there, and
`from_editor(..., frame=...)` cuts the margin off the photo and the layers, so that only the
stroke's part on the photo counts. `grow` widens a mask by a number of pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image

from bdjax import image_io
from bdjax import window as window_lib

# The transparent margin `framed` puts around a photo: a fraction of its long side, at least
# MIN_MARGIN pixels, so that a stroke can begin beside the photo at any zoom.
MARGIN_FRACTION, MIN_MARGIN = 0.08, 16
# The web app's brush: its colour and opacity.
BRUSH_RGBA = (255, 0, 160, 153)
MAX_GROW = window_lib.MAX_FEATHER  # pixels


@dataclasses.dataclass(frozen=True)
class Painting:
    """What `request.prepare` takes: the photo and the mask (255 where painted, else 0, at the
    photo's size) or an uploaded mask file or image, as given."""
    image: np.ndarray | Image.Image | str
    mask: np.ndarray | Image.Image | str


def _array(image, what: str) -> np.ndarray:
    if isinstance(image, str):
        image = image_io.to_pil(image, what)
    return np.asarray(image)


def coverage(layer, size: tuple[int, int]) -> np.ndarray:
    """[H, W] bool: where `layer` (an array or PIL image, RGBA, LA, RGB or L) is painted, at
    `size` (width, height), resized with nearest neighbour if it was drawn at another size."""
    array = _array(layer, "painted layer")
    if array.ndim == 3 and array.shape[-1] in (2, 4):  # with alpha: painted where not transparent
        covered = array[..., -1] > 0
    elif array.ndim == 3 and array.shape[-1] in (1, 3):
        covered = (array > 0).any(axis=-1)
    elif array.ndim == 2:
        covered = array > 0
    else:
        raise image_io.InputError(f"a painted layer has shape {array.shape}; expected HxW, HxWx2, HxWx3 or HxWx4")
    if covered.shape[::-1] != tuple(size):
        covered = np.asarray(Image.fromarray(covered).resize(tuple(size), Image.NEAREST))
    return covered


def painted_region(background, layers: Sequence) -> np.ndarray:
    """[H, W] bool: where any of `layers` is painted, at the size of `background`."""
    image = _array(background, "image")
    size = (image.shape[1], image.shape[0])
    covered = np.zeros(size[::-1], bool)
    for layer in layers:
        if layer is not None:
            covered |= coverage(layer, size)
    return covered


def painted_mask(background, layers: Sequence, *, invert_hint: bool = False) -> np.ndarray:
    """[H, W] uint8 {0, 255}: 255 where any of `layers` is painted, at the size of `background`.
    InputError when nothing is painted (`invert_hint` words the fix for an inverted mask)."""
    return _as_mask(painted_region(background, layers), invert_hint)


def _as_mask(covered: np.ndarray, invert_hint: bool) -> np.ndarray:
    if not covered.any():
        what = "what to keep" if invert_hint else "the region to change"
        raise image_io.InputError(f"the mask is empty: paint over {what} with the brush, or upload a mask file")
    return np.where(covered, 255, 0).astype(np.uint8)


def margin_for(size: tuple[int, int]) -> int:
    """The transparent margin `framed` puts around a photo of `size` (width, height)."""
    return max(MIN_MARGIN, round(MARGIN_FRACTION * max(size)))


def framed(image) -> tuple[dict, dict]:
    """An image editor's value for `image` (a path, PIL image or array) with a transparent margin
    around it and one empty layer to paint on, and its frame ({"margin", "width", "height"}, for
    `from_editor`)."""
    photo = np.asarray(image_io.to_pil(image, "image").convert("RGBA"))
    height, width = photo.shape[:2]
    margin = margin_for((width, height))
    canvas = np.zeros((height + 2 * margin, width + 2 * margin, 4), np.uint8)
    canvas[margin:margin + height, margin:margin + width] = photo
    return ({"background": canvas, "layers": [np.zeros_like(canvas)], "composite": None},
            {"margin": margin, "width": width, "height": height})


def is_framed(background, frame: Mapping | None) -> bool:
    """Whether `background` (an editor's) is the photo of `frame` as `framed` put it there: the
    frame's size, RGBA, its margin fully transparent."""
    if not frame or background is None:
        return False
    image = _array(background, "image")
    margin, width, height = (int(frame[k]) for k in ("margin", "width", "height"))
    if margin <= 0 or image.shape != (height + 2 * margin, width + 2 * margin, 4):
        return False
    ring = image[..., 3].copy()
    ring[margin:margin + height, margin:margin + width] = 0
    return not ring.any()


def _unframe(background, layers: Sequence, frame: Mapping | None):
    """The photo and the painted region [H, W] of an editor's value: with the margin of `frame`
    cut off where the background is that frame's (`is_framed`); else the background as it is
    (another image was put in since)."""
    image = _array(background, "image")
    covered = painted_region(image, layers)
    if not is_framed(image, frame):
        return background, covered
    margin, width, height = (int(frame[k]) for k in ("margin", "width", "height"))
    inside = (slice(margin, margin + height), slice(margin, margin + width))
    return image[inside], covered[inside]


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """[H, W] uint8 {0, 255}: `mask` widened by `pixels` (every pixel within that Euclidean
    distance of a masked one); ValueError for `pixels` outside [0, MAX_GROW]."""
    if isinstance(pixels, bool) or int(pixels) != pixels or not 0 <= pixels <= MAX_GROW:
        raise image_io.InputError(f"grow must be a whole number of pixels in [0, {MAX_GROW}], got {pixels!r}")
    region = np.asarray(mask) > 0
    if pixels:
        region = window_lib.feather_alpha(region, int(pixels)) > 0
    return np.where(region, 255, 0).astype(np.uint8)


def from_editor(value: Mapping | None, uploaded_mask=None, *, invert_mask: bool = False,
                frame: Mapping | None = None) -> Painting:
    """The photo and mask of an image editor's `value` ({"background": image, "layers": [images],
    "composite": ...}, as Gradio's ImageEditor gives it), or of `uploaded_mask` (a file path, an
    array or a PIL image) when one was uploaded instead of painting. `frame`: what `framed` gave
    for the photo in the editor (its margin is cut off). InputError (a ValueError) says, in one
    line, what to do when there is no photo, no mask, or both a painted and an uploaded mask."""
    background = None if value is None else value.get("background")
    if background is None:
        raise image_io.InputError("no image: upload a photo to edit first")
    background, covered = _unframe(background, value.get("layers") or [], frame)
    if uploaded_mask is None:
        return Painting(image=opaque_as_rgb(background), mask=_as_mask(covered, invert_mask))
    if covered.any():
        raise image_io.InputError("a mask was both painted and uploaded: clear the painting or remove the "
                                  "uploaded mask")
    return Painting(image=opaque_as_rgb(background), mask=uploaded_mask)


def opaque_as_rgb(image):
    """`image` (an array, a PIL image or a path) at its full size, without its alpha channel when
    that is fully opaque (RGBA -> RGB, LA -> L); anything else as it is (a path is read by the
    decoder)."""
    if isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA") and image.getchannel("A").getextrema() == (255, 255):
            return image.convert(image.mode[:-1])
        return image
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] in (2, 4) \
            and image.dtype == np.uint8 and (image[..., -1] == 255).all():
        return image[..., 0] if image.shape[-1] == 2 else image[..., :3]
    return image
