"""Text-guided image extrapolation (the paper's Fig. 11) as plain functions on uint8 canvases.

Each round grows the canvas by a strip on one side: the model-size window at that edge (the new
strip plus the canvas next to it) is edited with the strip as the mask, and the best result's
strip is pasted on. launch/extrapolate.py drives the rounds.
"""

from __future__ import annotations

import numpy as np

SIDES = ("left", "right")


def round_seed(seed: int, round_index: int, side: str) -> int:
    """A seed per (round, side), derived from --seed alone, so any round can be rerun by itself."""
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


def best_result(stream) -> tuple[np.ndarray, float]:
    """The best image of a streamed edit (`BlendedDiffusion.edit_batches`) over all processes,
    holding one batch at a time; samples that are not finite never win. (A black image, inf)
    when no sample anywhere came out finite."""
    import jax

    image, distance = np.zeros_like(stream.source), np.inf
    for batch in stream:
        distances = np.where(batch.finite, batch.distances, np.inf)
        if len(distances) and distances.min() < distance:  # ties: the lowest sample id
            best = int(np.argmin(distances))
            image, distance = batch.images[best], float(distances[best])
    if jax.process_count() == 1:
        return image, distance
    from jax.experimental import multihost_utils

    distances = np.asarray(multihost_utils.process_allgather(np.float32(distance)))
    images = np.asarray(multihost_utils.process_allgather(image))
    best = int(np.argmin(distances))  # ties: the lowest process, the same choice everywhere
    return images[best], float(distances[best])
