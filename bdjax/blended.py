"""Blended Diffusion sampling (Avrahami et al., Algorithm 2) and the Algorithm 1 baseline.

`make_sampler` returns a pure function of (params, per-sample inputs, sample ids, seeds) that
runs every step in one `lax.scan`; wrap it in `jax.jit` once per configuration. Every sample
carries its own image, mask, text embedding and seed, so one batch may mix edits. Randomness is
derived from (seed, sample index) with `jax.random.fold_in`, so a sample's result does not depend
on which batch it ran in; the background noise of step i depends on (seed, i) only, so all
samples of one seed share it, as all samples of one reference run do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import augment as augment_lib
from bdjax import diffusion
from bdjax import scores as scores_lib
from bdjax.guidance import guidance_loss, needs_lpips, value_and_guidance
from bdjax.options import EditOptions


@dataclasses.dataclass(frozen=True)
class Models:
    """The Flax modules (static structure); their params travel separately as a dict
    {"unet": ..., "clip": ..., "lpips": ...}. CLIP's `image_resolution` is the size of the images
    the guidance and the ranking feed it."""
    unet: Any
    clip: Any
    lpips: Any = None


def sample_keys(seeds, sample_ids):
    """Per-sample keys from (seed, sample index), and each sample's seed's background-noise key."""
    def one(seed, sample_id):
        samples_root, background_root = jax.random.split(jax.random.key(seed))
        return jax.random.fold_in(samples_root, sample_id), background_root
    seeds = jnp.broadcast_to(jnp.asarray(seeds), jnp.shape(sample_ids))
    return jax.vmap(one)(seeds, sample_ids)


def make_step(models: Models, options: EditOptions, d: diffusion.Diffusion, *, guided: bool,
              augment: Callable | None = None):
    """One step of Blended Diffusion as a pure function.

    step(params, x, i, draws, init, mask, text_embed, init_features=None) -> {"sample": x_{i-1},
    "pred_xstart", "grad", "terms"}, where `draws` holds the step's randomness (see `step_draws`):
    "noise" [B,H,W,C], "background_noise" [1,H,W,C], "aug_keys" [B] and "y" (class labels or
    None). `init_features` are LPIPS's features of `init` (`lpips_init_features`), the same at
    every step; the sampler computes them once, and the step computes them itself without them.
    `augment(images, aug_keys)` may be injected (tests inject fixed transforms); by default it
    is the reference's extending augmentations to CLIP's `image_resolution`.
    """
    update = diffusion.sampler(options.sampler)
    if augment is None:
        def augment(images, keys):
            return augment_lib.extending_augmentations(
                images, keys, aug_num=options.aug_num, output_size=models.clip.image_resolution,
                symmetric_translation=options.symmetric_translation)

    def step(params, x, i, draws, init, mask, text_embed, init_features=None):
        timestep = jnp.asarray(d.timestep_map, jnp.float32)[i]

        def denoise(x):
            model_output = models.unet.apply({"params": params["unet"]}, x, timestep, draws["y"])
            return diffusion.p_mean_variance(d, model_output.astype(jnp.float32), x, i)

        if guided:
            def encode_image(images):
                return models.clip.apply({"params": params["clip"]}, images, method="encode_image")

            networks = {"clip": encode_image}
            if uses_lpips(models, options):
                target = lpips_init_features(models, params, init) if init_features is None else init_features

                def lpips_to_init(background):
                    features = models.lpips.apply({"params": params["lpips"]}, background, method="features")
                    return models.lpips.apply({"params": params["lpips"]}, features, target, method="distance")
                networks["lpips"] = lpips_to_init

            def loss_fn(pred_xstart, x):
                fac = jnp.asarray(d.sqrt_one_minus_alphas_cumprod)[i]
                return guidance_loss(pred_xstart, x, fac, mask=mask, init=init, text_embed=text_embed,
                                     augment=lambda images: augment(images, draws["aug_keys"]),
                                     networks=networks, options=options)

            out, grad, terms = value_and_guidance(denoise, loss_fn, x)
        else:  # an empty prompt: the reference's cond_fn returns zeros
            out, grad, terms = denoise(x), jnp.zeros_like(x), {}

        sample, out = update(d, out, x, i, grad, draws["noise"])
        if not options.local_clip_guided_diffusion:
            # The background is noised to level i while the sample is now at level i-1: the
            # reference's off-by-one, reproduced. One noise draw is shared by the whole batch.
            background = diffusion.q_sample(d, init, i, draws["background_noise"])
            sample = sample * mask + background * (1 - mask)
        return {"sample": sample, "pred_xstart": out["pred_xstart"], "grad": grad, "terms": terms}

    return step


def uses_lpips(models: Models, options: EditOptions) -> bool:
    """Whether the guidance runs the LPIPS network: the options need it and the models have it
    (without it, a term needing it fails with a clear error when the step is traced)."""
    return models.lpips is not None and needs_lpips(options)


def lpips_init_features(models: Models, params, init):
    """LPIPS's VGG features of the init image(s) [B or 1, H, W, C] in [-1, 1]."""
    return models.lpips.apply({"params": params["lpips"]}, init, method="features")


def step_draws(models: Models, options: EditOptions, keys, background_keys, i, shape) -> dict:
    """The randomness of step i: per-sample from each sample's key, the background noise from
    the sample's seed's background key alone (the same for every sample of that seed)."""
    split = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, i), 3))(keys)
    aug_keys, noise_keys, class_keys = split[:, 0], split[:, 1], split[:, 2]
    y = None
    num_classes = getattr(models.unet, "num_classes", None)
    if num_classes is not None:
        if options.randomize_class:  # a fresh random class per sample and step, as the reference
            y = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_classes))(class_keys)
        else:
            y = jnp.zeros((len(keys),), jnp.int32)
    return {
        "noise": jax.vmap(lambda k: jax.random.normal(k, shape[1:]))(noise_keys),
        "background_noise": jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:]))(
            background_keys),
        "aug_keys": aug_keys,
        "y": y,
    }


def steps_per_call(num_steps: int) -> int:
    """How many steps one call of `Sampler.advance` runs in the editor: the largest divisor of
    `num_steps` up to a tenth of it, so a run is about ten equal calls of one compiled scan
    (progress and cancellation between calls) and the chunking never depends on whether a
    progress bar is shown."""
    return max(k for k in range(1, max(1, num_steps // 10) + 1) if num_steps % k == 0)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so jax.jit can take it
class Sampler:
    """The sampler of one configuration, as three pure functions and their composition.

    begin(params, init, mask, text_embed, sample_ids, seeds) -> state
    advance(params, state, indices) -> state: the steps at `indices` (descending respaced step
        indices), one `lax.scan`
    end(params, state) -> {"images", "distances", "pred_xstart", "scores"}
    Calling the Sampler runs begin, one scan over every step in `indices`, and end. Every leaf of
    the state has the samples along its first axis, so it shards like the inputs.
    """
    begin: Callable
    advance: Callable
    end: Callable
    indices: Any  # numpy int32 [num_steps]: first, ..., 0

    def __call__(self, params, init, mask, text_embed, sample_ids, seeds):
        state = self.begin(params, init, mask, text_embed, sample_ids, seeds)
        return self.end(params, self.advance(params, state, jnp.asarray(self.indices)))


def make_sampler(models: Models, options: EditOptions, *, guided: bool,
                 augment: Callable | None = None) -> Sampler:
    """The sampler of one configuration (see `Sampler`); its call is
    sampler(params, init, mask, text_embed, sample_ids, seeds) -> {"images", "distances", "pred_xstart",
    "scores"}.

    Per sample: init [B, H, W, C] in [-1, 1]; mask [B, H, W, 1] in {0, 1} (1 = edit); text_embed
    [B, D]; sample_ids [B] int; seeds [B] int (inputs of size 1 along B broadcast, so one edit can
    pass [1, ...] arrays and a scalar seed). images are [B, H, W, C] in [0, 1]; distances are the
    reference's ranking distances (lower is better); scores are every result's quality scores
    (bdjax/scores.py), each [B].
    """
    d = diffusion.make_diffusion(timestep_respacing=options.timestep_respacing)
    # The options are validated with the request (bdjax/request.py); this guards only the schedule
    # index, which an out-of-range skip_timesteps would otherwise wrap silently into garbage.
    options.check_start(d.num_timesteps)
    first = d.num_timesteps - options.skip_timesteps - 1
    step = make_step(models, options, d, guided=guided, augment=augment)

    def begin(params, init, mask, text_embed, sample_ids, seeds):
        keys, background_keys = sample_keys(seeds, sample_ids)
        batch = keys.shape[0]
        init_keys, step_root = jax.vmap(lambda k: tuple(jax.random.split(k)))(keys)
        noise = jax.vmap(lambda k: jax.random.normal(k, init.shape[1:], init.dtype))(init_keys)
        rows = lambda a, ndim: jnp.broadcast_to(a, (batch, *jnp.shape(a)[-ndim:]))  # noqa: E731
        state = {"init": rows(init, 3), "mask": rows(mask, 3), "text_embed": rows(text_embed, 1),
                 "step_keys": step_root, "background_keys": background_keys}
        if guided and uses_lpips(models, options):
            # The background loss compares with the unchanging init: its features once, not every step.
            features = lpips_init_features(models, params, init)
            state["init_features"] = jax.tree.map(lambda f: rows(f, 3), features)
        state["x"] = diffusion.q_sample(d, state["init"], first, noise)
        state["pred_xstart"] = jnp.zeros_like(state["x"])
        return state

    def advance(params, state, indices):
        def body(carry, i):
            x, _ = carry
            draws = step_draws(models, options, state["step_keys"], state["background_keys"], i, x.shape)
            out = step(params, x, i, draws, state["init"], state["mask"], state["text_embed"],
                       state.get("init_features"))
            return (out["sample"], out["pred_xstart"]), None

        (x, pred_xstart), _ = jax.lax.scan(body, (state["x"], state["pred_xstart"]), indices)
        return {**state, "x": x, "pred_xstart": pred_xstart}

    def end(params, state):
        return finish(models, options, params, state["pred_xstart"], state["init"], state["mask"],
                      state["text_embed"])

    return Sampler(begin=begin, advance=advance, end=end, indices=np.arange(first, -1, -1, dtype=np.int32))


def result_images(options: EditOptions, pred_xstart, init, mask):
    """The kept result of a prediction in [0, 1]: the background pasted back (hard) unless the
    options keep the prediction whole."""
    result = pred_xstart
    if options.enforce_background and not options.local_clip_guided_diffusion:
        result = init * (1 - mask) + pred_xstart * mask
    return jnp.clip((result + 1) / 2, 0, 1)


def finish(models: Models, options: EditOptions, params, pred_xstart, init, mask, text_embed):
    """The kept result (hard background paste), the reference's ranking distance and the
    results' quality scores (bdjax/scores.py)."""
    images = result_images(options, pred_xstart, init, mask)
    distances = scores_lib.ranking_distance(models, params, images, mask, text_embed)
    scores = scores_lib.result_scores(models, params, images, init, mask, text_embed, distances)
    return {"images": images, "distances": distances, "pred_xstart": pred_xstart, "scores": scores}
