"""Text-guided image extrapolation (the paper's Fig. 11) as plain functions on uint8 canvases.

Each round grows the canvas by a strip on one side: the model-size window at that edge (the new
strip plus the canvas next to it) is edited with the strip as the mask, and the best result's
strip is pasted on. `grow` runs the rounds; launch/extrapolate.py adds flags and files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

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
    canvas: np.ndarray        # [S, W, 3] uint8 after this round (unchanged when distance is inf)


def grow(editor, requests: dict[str, Request], strip: int, repeats: int, progress: bool = True) -> Iterator[Round]:
    """Extrapolate the requests' image: `repeats` rounds, each growing the canvas by `strip`
    columns on every side of `requests` ({side: prepared request}, in order), yielding each side's
    `Round` as it finishes and stopping after one whose samples all turned non-finite.

    The canvas starts as the prepared image (at the model size). Each window is prepared as an
    edit's image and mask are (bdjax/request.py) and edited with its side's prompt, options and
    num_samples, at a seed derived from the side's seed (`round_seed`)."""
    canvas = next(iter(requests.values())).source
    size = canvas.shape[0]
    for r in range(1, repeats + 1):
        for side, request in requests.items():
            seed = round_seed(request.seed, r, side)
            window, mask = edge_window(canvas, side, strip, size)
            inputs = prepare_inputs(window, mask, image_size=size)
            inputs.show_warnings()
            best, distance, sample_id = best_result(editor.edit_batches(
                dataclasses.replace(request, inputs=inputs, seed=seed), progress=progress))
            if np.isfinite(distance):
                canvas = paste_strip(canvas, best, side, strip)
            yield Round(round=r, side=side, prompt=request.prompt, seed=seed, sample_id=sample_id, distance=distance,
                        canvas=canvas)
            if not np.isfinite(distance):
                return


def round_seed(seed: int, round_index: int, side: str) -> int:
    """A seed per (round, side), derived from the edit's seed alone, so any round can be rerun by itself."""
    return int(np.random.SeedSequence([seed, round_index, SIDES.index(side)]).generate_state(1)[0]
               % 2 ** 31)


def edge_window(canvas: np.ndarray, side: str, strip: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(window [size, size, 3] uint8, mask [size, size] uint8) at the `side` edge of the canvas
    grown by `strip` columns; the mask is 255 on the new strip."""
    keep = size - strip
    mask = np.zeros((size, size), np.uint8)
    # The reference shifts the image and leaves the strip to the diffusion. We fill it with the
    # edge column repeated rather than mid-grey: with skip_timesteps > 0 the start x_T still
    # carries sqrt(alpha_bar) of the fill, and a grey band pulls the strip towards a flat grey
    # block, while the repeated edge continues the scene's colours and horizontal lines.
    if side == "right":
        context = canvas[:, -keep:]
        mask[:, keep:] = 255
        return np.concatenate([context, np.repeat(context[:, -1:], strip, axis=1)], axis=1), mask
    context = canvas[:, :keep]
    mask[:, :strip] = 255
    return np.concatenate([np.repeat(context[:, :1], strip, axis=1), context], axis=1), mask


def paste_strip(canvas: np.ndarray, window: np.ndarray, side: str, strip: int) -> np.ndarray:
    """The canvas with the window's new strip attached; the old canvas is kept pixel for pixel."""
    if side == "right":
        return np.concatenate([canvas, window[:, -strip:]], axis=1)
    return np.concatenate([window[:, :strip], canvas], axis=1)


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
