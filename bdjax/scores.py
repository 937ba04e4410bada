"""Quality scores of edited images, and ranking by them.

Every result is scored at the model size (the edit window in window mode, the stretched image with
fit="stretch"), on the device, right after sampling, with the networks the edit already holds:

- clip_masked (lower is better): the reference's ranking distance, CLIP's spherical distance
  between the prompt and the masked result (outside the mask black, CLIP's input normalisation
  skipped, as the authors rank).
- clip_whole (lower is better): the same distance between the prompt and the whole result (the
  background pasted), with CLIP's input normalisation: how well the edit reads in its surroundings.
- background_psnr (dB, higher is better): PSNR between the result and the input over the pixels
  outside the mask, capped at PSNR_CAP (the background kept exactly); None where the mask covers
  everything.
- background_lpips (lower is better): LPIPS between the result and the input, both with the mask
  blacked out; 0 where the background is kept. Needs the LPIPS network (None without it).
- seam (lower is better): the edge energy across the mask's boundary divided by the edge energy of
  the pixels beside it (a band of SEAM_BAND_FRACTION of the size on either side): about 1 where the
  boundary does not show, far above 1 where the edit steps against its surroundings.

and every run gets one more, over its results:

- diversity (higher is more varied): the mean LPIPS between every pair of results, inside the mask
  (all the results up to DIVERSITY_MAX, else that many best ranked). Needs the LPIPS network.

Scores are computed on the results as they are written (8-bit), except clip_masked, which is the
reference's number, computed on the unrounded result. Ranking (`rank_values`) orders the results
by one of RANK_BY; "clip_masked", the reference's, is the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.models.clip import spherical_distance
from bdjax.options import RANK_BY  # noqa: F401  what results may be ranked by

NAMES = ("clip_masked", "clip_whole", "background_psnr", "background_lpips", "seam")
LOWER_IS_BETTER = {"clip_masked": True, "clip_whole": True, "background_psnr": False, "background_lpips": True,
                   "seam": True, "diversity": False}
SHORT = {"clip_masked": "d", "clip_whole": "whole", "background_psnr": "psnr", "background_lpips": "bg",
         "seam": "seam"}

PSNR_CAP = 100.0            # dB: an MSE below 1e-10 (no 8-bit pixel differs) is reported as this
SEAM_BAND_FRACTION = 1 / 64  # the seam band's half-width, as a fraction of the image size (at least 2 px)
SEAM_EPS = 1e-4              # added to both edge energies, so flat regions give ratios near 1
DIVERSITY_MAX = 16           # diversity compares at most this many results (120 pairs)


def quantized(images):
    """Images in [0, 1] as the 8-bit files hold them (still floats in [0, 1])."""
    return jnp.round(jnp.clip(images, 0, 1) * 255) / 255


def seam_band(size: int) -> int:
    """The seam band's half-width in pixels for an image of `size` pixels."""
    return max(2, int(round(size * SEAM_BAND_FRACTION)))


def _dilate(region, width: int):
    """Max over a (2 width + 1)^2 square: `region` [B, H, W, 1] grown by `width` pixels."""
    window = (1, 2 * width + 1, 2 * width + 1, 1)
    return jax.lax.reduce_window(region, -jnp.inf, jax.lax.max, window, (1, 1, 1, 1), "SAME")


def seam_scores(images, mask):
    """`seam` of images [B, H, W, C] in [0, 1] with mask [B, H, W, 1] (1 = edited): the mean
    squared step between neighbouring pixels on opposite sides of the mask's boundary, over that
    between neighbouring pixels on the same side within the band beside it (+SEAM_EPS each).
    NaN where the mask has no boundary."""
    inside = (mask > 0.5).astype(jnp.float32)
    width = seam_band(images.shape[1])
    band = _dilate(inside, width) * _dilate(1 - inside, width)  # within `width` of both sides
    cross = near = cross_n = near_n = 0.0
    for axis in (1, 2):
        n = images.shape[axis] - 1
        take = lambda a, start: jax.lax.slice_in_dim(a, start, start + n, axis=axis)  # noqa: E731
        step = jnp.sum(jnp.square(take(images, 1) - take(images, 0)), axis=-1, keepdims=True)
        crossing = jnp.abs(take(inside, 1) - take(inside, 0))
        beside = take(band, 1) * take(band, 0) * (1 - crossing)
        cross += jnp.sum(step * crossing, axis=(1, 2, 3))
        cross_n += jnp.sum(crossing, axis=(1, 2, 3))
        near += jnp.sum(step * beside, axis=(1, 2, 3))
        near_n += jnp.sum(beside, axis=(1, 2, 3))
    ratio = (cross / jnp.maximum(cross_n, 1) + SEAM_EPS) / (near / jnp.maximum(near_n, 1) + SEAM_EPS)
    return jnp.where(cross_n > 0, ratio, jnp.nan)


def background_psnr(images, source, mask):
    """PSNR (dB) of images against source, both [B, H, W, C] in [0, 1], over the pixels where
    mask [B, H, W, 1] is 0; PSNR_CAP where they agree, NaN where there is no such pixel."""
    outside = (mask <= 0.5).astype(jnp.float32)
    count = jnp.sum(outside, axis=(1, 2, 3)) * images.shape[-1]
    mse = jnp.sum(jnp.square(images - source) * outside, axis=(1, 2, 3)) / jnp.maximum(count, 1)
    psnr = jnp.minimum(PSNR_CAP, -10 * jnp.log10(jnp.maximum(mse, 10 ** (-PSNR_CAP / 10))))
    return jnp.where(count > 0, psnr, jnp.nan)


def ranking_distance(models, params, images, mask, text_embed):
    """The reference's ranking distance [B] of images [B, H, W, 3] in [0, 1]: mask * image,
    bilinear resize to CLIP's input size (no antialiasing, like torch's interpolate), fed to CLIP
    WITHOUT its input normalisation, as the reference ranks; lower is better."""
    masked = images * mask
    resolution = models.clip.image_resolution
    size = (masked.shape[0], resolution, resolution, masked.shape[-1])
    resized = jax.image.resize(masked, size, "bilinear", antialias=False)
    embeds = models.clip.apply({"params": params["clip"]}, resized, normalize=False, method="encode_image")
    return spherical_distance(embeds.astype(jnp.float32), text_embed.astype(jnp.float32))


def score_images(models, params, images, init, mask, text_embed) -> dict:
    """`result_scores` of finished images [B, H, W, 3] in [0, 1] (read from files, say), their
    clip_masked computed here as the sampler computes it."""
    return result_scores(models, params, images, init, mask, text_embed,
                         ranking_distance(models, params, images, mask, text_embed))


def result_scores(models, params, images, init, mask, text_embed, clip_masked) -> dict:
    """Every per-result score (NAMES) of a batch, each [B] float32: images [B, H, W, 3] in [0, 1]
    (the results before rounding), init [B, H, W, 3] in [-1, 1], mask [B, H, W, 1] (1 = edited),
    text_embed [B, D], clip_masked [B] (the ranking distance, computed with the results).
    `models` are blended.Models (lpips may be None: background_lpips is then NaN)."""
    images = quantized(images.astype(jnp.float32))
    source = quantized((init.astype(jnp.float32) + 1) / 2)  # the 8-bit input (exact where it is kept)
    resolution = models.clip.image_resolution
    whole = jax.image.resize(images, (images.shape[0], resolution, resolution, images.shape[-1]), "linear",
                             antialias=True)
    embeds = models.clip.apply({"params": params["clip"]}, whole, method="encode_image")
    scores = {"clip_masked": clip_masked.astype(jnp.float32),
              "clip_whole": spherical_distance(embeds.astype(jnp.float32), text_embed.astype(jnp.float32)),
              "background_psnr": background_psnr(images, source, mask),
              "seam": seam_scores(images, mask)}
    if models.lpips is None:
        scores["background_lpips"] = jnp.full(images.shape[:1], jnp.nan, jnp.float32)
    else:
        outside = (mask <= 0.5).astype(jnp.float32)
        lpips = models.lpips.bind({"params": params["lpips"]})
        batch = images.shape[0]
        # One trunk batch for both, so that equal backgrounds give equal features, bit for bit.
        ours, theirs = (2 * images - 1) * outside, (2 * source - 1) * outside
        features = lpips.features(jnp.concatenate([ours, theirs]))
        distance = lpips.distance(tuple(f[:batch] for f in features), tuple(f[batch:] for f in features))
        # 0 where the backgrounds are equal (the convolutions may round rows of one batch apart),
        # and never negative (random heads, the smoke preset's, can round below 0).
        same = jnp.all(ours == theirs, axis=(1, 2, 3))
        scores["background_lpips"] = jnp.where(same, 0.0, jnp.maximum(distance.astype(jnp.float32), 0))
    return {name: scores[name] for name in NAMES}


def diversity(models, params, images, mask):
    """The mean LPIPS between every pair of `images` [n, H, W, 3] in [0, 1] (n >= 2), inside
    mask [H, W, 1] or [1, H, W, 1] (outside it both are black): a scalar, higher is more varied."""
    n = images.shape[0]
    inside = (jnp.reshape(mask, (1, *images.shape[1:3], 1)) > 0.5).astype(jnp.float32)
    lpips = models.lpips.bind({"params": params["lpips"]})
    features = lpips.features((2 * images.astype(jnp.float32) - 1) * inside)
    first, second = np.triu_indices(n, k=1)

    def pair(ij):
        i, j = ij
        row = lambda k: tuple(f[k][None] for f in features)  # noqa: E731
        return lpips.distance(row(i), row(j))[0]

    return jnp.maximum(jnp.mean(jax.lax.map(pair, (jnp.asarray(first), jnp.asarray(second)))), 0)


# --------------------------------------------------------------------------------------------
# On the host: ranking, short forms, aggregates


def combined(scores: Mapping, options) -> np.ndarray:
    """rank_by="combined": clip_masked + rank_whole_weight * clip_whole + rank_seam_weight *
    ln(seam) + rank_background_weight * background_lpips (lower is better). A term whose score is
    missing (NaN: no boundary, no LPIPS network) counts 0."""
    def term(name, transform=lambda v: v):
        values = np.asarray(scores.get(name, np.nan), np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = transform(values)
        return np.where(np.isfinite(values), values, 0.0)

    return (np.asarray(scores["clip_masked"], np.float64)
            + options.rank_whole_weight * term("clip_whole")
            + options.rank_seam_weight * term("seam", np.log)
            + options.rank_background_weight * term("background_lpips"))


def rank_values(scores: Mapping, options=None) -> np.ndarray:
    """The values results are ranked by (lower first) under `options.rank_by` (None: the
    reference's clip_masked): the score itself, or `combined`. `scores` maps names to arrays (or
    one result's floats)."""
    rank_by = "clip_masked" if options is None else options.rank_by
    if rank_by == "combined":
        return combined(scores, options)
    return np.asarray(scores[rank_by], np.float64)


def rank_value(row: Mapping, options=None) -> float:
    """`rank_values` of one result's scores as `row` gives them (floats, None where missing)."""
    return float(rank_values({name: np.nan if v is None else v for name, v in row.items()}, options))


def plain(value) -> float | None:
    """A score as JSON holds it: a float, None where it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def row(scores: Mapping, i: int | None = None) -> dict:
    """One result's scores as {name: float or None}: row `i` of arrays, or `scores` themselves."""
    return {name: plain(scores[name] if i is None else np.asarray(scores[name])[i]) for name in NAMES
            if name in scores}


def short(scores: Mapping) -> str:
    """One result's scores in a few characters for captions: "whole 1.23 psnr 100 bg 0.000 seam 1.1"
    (clip_masked, the distance, is shown apart; missing scores left out)."""
    parts = []
    for name, fmt in (("clip_whole", "{:.3f}"), ("background_psnr", "{:.0f}"), ("background_lpips", "{:.3f}"),
                      ("seam", "{:.2f}")):
        value = scores.get(name)
        if value is not None and math.isfinite(value):
            parts.append(f"{SHORT[name]} {fmt.format(value)}")
    return " ".join(parts)


def aggregate(rows: list[Mapping]) -> dict:
    """Per score over `rows` (each a result's scores): {"mean", "median", "best", "n"} of its
    finite values ("best": the lowest or highest, as the score's direction says); None where a
    score has no finite value."""
    out = {}
    for name in NAMES:
        values = np.array([r[name] for r in rows if r.get(name) is not None and math.isfinite(r[name])], np.float64)
        if values.size == 0:
            out[name] = None
            continue
        best = values.min() if LOWER_IS_BETTER[name] else values.max()
        out[name] = {"mean": float(values.mean()), "median": float(np.median(values)), "best": float(best),
                     "n": int(values.size)}
    return out
