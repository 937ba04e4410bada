"""Text-guided image extrapolation (the paper's Fig. 11) as plain functions on uint8 canvases.

Each round grows the canvas by a strip on one side: a square window at that edge (the new strip
plus the canvas next to it) is edited at the model size with the strip as the mask, and the best
result's strip is pasted on. The canvas is either the photo at its own size (`fit="window"`, the
default: the window is a square of the canvas' height, resized to the model size for the edit,
and the strip comes back at the photo's scale) or the image stretched to the model size
(`fit="stretch"`, the reference's way: the window is the model size itself and nothing is
resampled). `grow` runs the rounds; launch/extrapolate.py adds flags and files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from PIL import Image

from bdjax.request import Request, prepare_inputs

SIDES = ("left", "right")


@dataclasses.dataclass(frozen=True)
class Round:
    """One side of one round, done."""
    round: int                # 1, 2, ...
    side: str                 # "left" or "right"
    prompt: str
    seed: int                 # the round's seed (`round_seed`)
    sample_id: int            # the pasted sample's id at that seed; -1 when none was pasted
    distance: float           # the pasted sample's; inf when every sample turned non-finite
    canvas: np.ndarray        # [H, W, 3] uint8 after this round (unchanged when distance is inf)


def start_canvas(request: Request) -> np.ndarray:
    """The canvas a request's image starts as: with fit="window" (the default) the decoded photo
    at its own size (`Inputs.photo.rgb`: upright, RGB; an alpha channel is dropped, extrapolation
    grows RGB canvases), with fit="stretch" the image at the model size (`request.source`)."""
    photo = request.inputs.photo
    return request.source if photo is None else photo.rgb


def grow(editor, requests: dict[str, Request], strip: int, repeats: int, progress: bool = True,
         canvas: np.ndarray | None = None) -> Iterator[Round]:
    """Extrapolate the requests' image: `repeats` rounds, each growing the canvas by `strip`
    columns on every side of `requests` ({side: prepared request}, in order), yielding each side's
    `Round` as it finishes and stopping after one whose samples all turned non-finite.

    The canvas starts as `canvas` ([H, W, 3] uint8), by default as `start_canvas` of the first
    request: the photo at its own size (fit="window") or at the model size (fit="stretch").
    `strip` is in canvas pixels, 0 < strip < H. Each round edits `full_edge_window` (a square of
    side H at the edge, resized to the model size; at H = the model size exactly `edge_window`),
    prepared as an edit's image and mask are (bdjax/request.py, fit="stretch": the window is
    already square at the model size) and edited with its side's prompt, options and num_samples,
    at a seed derived from the side's seed (`round_seed`); `full_paste_strip` attaches the best
    result's strip, the old canvas kept byte for byte."""
    first = next(iter(requests.values()))
    canvas = start_canvas(first) if canvas is None else np.asarray(canvas)
    if canvas.ndim != 3 or canvas.shape[2] != 3 or canvas.dtype != np.uint8 or 0 in canvas.shape:
        raise ValueError(f"the canvas must be [H, W, 3] uint8, got {canvas.shape} {canvas.dtype}")
    check_strip(strip, canvas.shape[0])
    size = first.size
    for r in range(1, repeats + 1):
        for side, request in requests.items():
            seed = round_seed(request.seed, r, side)
            window, mask = full_edge_window(canvas, side, strip, size)
            inputs = prepare_inputs(window, mask, image_size=size, fit="stretch")
            inputs.show_warnings()
            best, distance, sample_id = best_result(editor.edit_batches(
                dataclasses.replace(request, inputs=inputs, seed=seed), progress=progress))
            if np.isfinite(distance):
                canvas = full_paste_strip(canvas, best, side, strip)
            yield Round(round=r, side=side, prompt=request.prompt, seed=seed, sample_id=sample_id, distance=distance,
                        canvas=canvas)
            if not np.isfinite(distance):
                return


def round_seed(seed: int, round_index: int, side: str) -> int:
    """A seed per (round, side), derived from the edit's seed alone, so any round can be rerun by itself."""
    return int(np.random.SeedSequence([seed, round_index, SIDES.index(side)]).generate_state(1)[0]
               % 2 ** 31)


def check_strip(strip: int, height: int) -> None:
    """ValueError unless 0 < strip < height: each window keeps height - strip canvas columns."""
    if isinstance(strip, bool) or int(strip) != strip or not 0 < strip < height:
        raise ValueError(f"strip={strip!r} must be an integer in (0, {height}): each window keeps {height} - strip "
                         "columns of the canvas as context")


def model_strip(strip: int, height: int, size: int) -> int:
    """The strip's width in model pixels when a canvas `height` pixels tall is edited at `size`:
    round(strip * size / height), at least 1 and at most size - 1 (the window keeps some
    context). At height == size, `strip` itself."""
    return min(max(round(strip * size / height), 1), size - 1)


def _edge_square(canvas: np.ndarray, side: str, strip: int, size: int) -> np.ndarray:
    """[H, size, 3]: the last size - strip columns of the canvas at `side` and `strip` new columns."""
    if side not in SIDES:
        raise ValueError(f"side={side!r} must be one of {', '.join(SIDES)}")
    keep = size - strip
    # The reference shifts the image and leaves the strip to the diffusion. We fill it with the
    # edge column repeated rather than mid-grey: with skip_timesteps > 0 the start x_T still
    # carries sqrt(alpha_bar) of the fill, and a grey band pulls the strip towards a flat grey
    # block, while the repeated edge continues the scene's colours and horizontal lines.
    if side == "right":
        context = canvas[:, -keep:]
        return np.concatenate([context, np.repeat(context[:, -1:], strip, axis=1)], axis=1)
    context = canvas[:, :keep]
    return np.concatenate([np.repeat(context[:, :1], strip, axis=1), context], axis=1)


def _strip_mask(side: str, strip: int, size: int) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    if side == "right":
        mask[:, size - strip:] = 255
    else:
        mask[:, :strip] = 255
    return mask


def edge_window(canvas: np.ndarray, side: str, strip: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window [size, size, 3] uint8, mask [size, size] uint8) at the `side` edge of a canvas
    `size` pixels tall (and at least size - strip wide) grown by `strip` columns; the mask is 255
    on the new strip."""
    return _edge_square(canvas, side, strip, size), _strip_mask(side, strip, size)


def paste_strip(canvas: np.ndarray, window: np.ndarray, side: str, strip: int) -> np.ndarray:
    """The canvas with the window's new strip attached; the old canvas is kept pixel for pixel."""
    if side == "right":
        return np.concatenate([canvas, window[:, -strip:]], axis=1)
    return np.concatenate([window[:, :strip], canvas], axis=1)


def full_edge_window(canvas: np.ndarray, side: str, strip: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window [size, size, 3] uint8, mask [size, size] uint8): what the model edits to grow a
    canvas [H, W, 3] of any size by `strip` columns (canvas pixels) at `side`.

    The square of side H at that edge, the last H - strip columns of the canvas and the strip
    (filled with the edge column repeated, as `edge_window`), resized to `size` with Lanczos
    (down for a canvas taller than the model size, up for a shorter one); the mask is 255 on the
    strip's `model_strip(strip, H, size)` columns. A canvas narrower than H - strip is padded on
    the window's far side (away from the strip) by reflection (np.pad "reflect", which repeats for
    pads longer than the canvas; "edge" for a 1-column canvas): the model sees mirrored context
    there, which is never pasted. At H == size this is `edge_window` exactly (nothing resampled).
    Memory: window-sized temporaries (H x H), plus a padded copy of a narrow canvas."""
    height, width = canvas.shape[:2]
    check_strip(strip, height)
    if side not in SIDES:
        raise ValueError(f"side={side!r} must be one of {', '.join(SIDES)}")
    keep = height - strip
    if width < keep:
        pad = (keep - width, 0) if side == "right" else (0, keep - width)
        canvas = np.pad(canvas, ((0, 0), pad, (0, 0)), mode="reflect" if width > 1 else "edge")
    square = _edge_square(canvas, side, strip, height)
    if height != size:
        square = np.asarray(Image.fromarray(square).resize((size, size), Image.LANCZOS))
    return square, _strip_mask(side, model_strip(strip, height, size), size)


def full_paste_strip(canvas: np.ndarray, edit: np.ndarray, side: str, strip: int) -> np.ndarray:
    """[H, W + strip, 3]: the canvas [H, W, 3] with the new strip of `edit` ([S, S, 3] uint8, the
    model's edit of `full_edge_window(canvas, side, strip, S)`) attached at the canvas' scale.
    Only the strip is resampled (Lanczos, Pillow's resize with a source box: as resizing the whole
    edit to H x H and cutting the strip out); the old canvas is kept byte for byte. At H == S this
    is `paste_strip` exactly."""
    height = canvas.shape[0]
    edit = np.asarray(edit)
    if edit.ndim != 3 or edit.shape[0] != edit.shape[1] or edit.shape[2] != 3 or edit.dtype != np.uint8:
        raise ValueError(f"edit must be [S, S, 3] uint8, got {edit.shape} {edit.dtype}")
    check_strip(strip, height)
    size = edit.shape[0]
    left = height - strip if side == "right" else 0  # the strip's columns in the H x H window
    if size == height:
        piece = edit[:, left:left + strip]
    else:
        scale = size / height  # model pixels per canvas pixel
        piece = np.asarray(Image.fromarray(np.ascontiguousarray(edit)).resize(
            (strip, height), Image.LANCZOS, box=(left * scale, 0, (left + strip) * scale, size)))
    return paste_strip(canvas, piece, side, strip)


def best_result(stream) -> tuple[np.ndarray, float, int]:
    """(image, distance, sample id) of the best sample of a streamed edit
    (`BlendedDiffusion.edit_batches`) over all processes, holding one batch at a time; samples
    that are not finite never win. (A black image, inf, -1) when no sample anywhere came out
    finite."""
    import jax

    from bdjax import parallel

    image, distance, sample_id = np.zeros_like(stream.source), np.inf, -1
    for batch in stream:
        distances = np.where(batch.finite, batch.distances, np.inf)
        if len(distances) and distances.min() < distance:  # ties: the lowest sample id
            best = int(np.argmin(distances))
            image, distance, sample_id = batch.images[best], float(distances[best]), int(batch.sample_ids[best])
    if jax.process_count() == 1:
        return image, distance, sample_id
    distances = parallel.allgather(np.float32(distance))
    images = parallel.allgather(image)
    sample_ids = parallel.allgather(np.int32(sample_id))
    best = int(np.argmin(distances))  # ties: the lowest process, the same choice everywhere
    return images[best], float(distances[best]), int(sample_ids[best])
