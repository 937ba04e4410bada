"""The smoke preset: the complete pipeline on tiny RANDOM networks, no weights, no downloads.

Every stage runs exactly as with the real models (the ADM topology at a small width, a small
CLIP ViT at the real 224 input, the real LPIPS VGG16 trunk), so the whole pipeline can be run
and checked on a laptop CPU. Its outputs are noise-like images and are labelled as random-model
outputs wherever they are written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bdjax.models import clip as clip_lib
from bdjax.models import lpips as lpips_lib
from bdjax.models import unet as unet_lib

LABEL = "SMOKE TEST: random untrained networks, the images are not meaningful"
IMAGE_SIZE = 64

# Fewer steps than the reference's 75, so that a run on a CPU stays short.
OPTIONS = dict(timestep_respacing="25", skip_timesteps=15, aug_num=4, batch_size=2)


def unet_config(image_size: int = IMAGE_SIZE) -> dict:
    """The adm256_uncond topology (scale-shift norm, up/down ResBlocks, legacy attention) at width 32."""
    return dict(unet_lib.preset("adm256_uncond"), image_size=image_size, model_channels=32,
                channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(4,), num_head_channels=32)


CLIP_CONFIG = dict(embed_dim=64, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=32,
                   vision_heads=2, context_length=77, vocab_size=49408, transformer_width=64,
                   transformer_heads=2, transformer_layers=2)


def random_params(module, *args, seed: int) -> dict:
    """Random params for `module` without compiling anything (shapes from eval_shape, values
    from numpy): kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02^2), scales 1, biases 0."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = str(path[-1].key)
        if name == "bias":
            return np.zeros(shape.shape, np.float32)
        if name == "scale":
            return np.ones(shape.shape, np.float32)
        std = 1 / np.sqrt(max(1, int(np.prod(shape.shape[:-1])))) if name == "kernel" else 0.02
        return (rng.standard_normal(shape.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def networks(seed: int = 0, image_size: int = IMAGE_SIZE, dtype=jnp.float32, with_lpips: bool = True) -> dict:
    """{"unet": (module, params), "clip": ..., "lpips": ... or None}, randomly initialised."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    unet = unet_lib.UNetModel(**unet_config(image_size), dtype=dtype)
    unet_params = random_params(unet, x, jax.ShapeDtypeStruct((1,), jnp.float32), seed=seed)
    clip = clip_lib.CLIP(**CLIP_CONFIG, dtype=dtype)
    pixels = jax.ShapeDtypeStruct((1, clip.image_resolution, clip.image_resolution, 3), jnp.float32)
    clip_params = random_params(clip, pixels, jax.ShapeDtypeStruct((1, clip.context_length), jnp.int32), seed=seed + 1)
    lpips = None
    if with_lpips:
        module = lpips_lib.LPIPS(dtype=dtype)
        lpips = (module, random_params(module, x, x, seed=seed + 2))
    return {"unet": (unet, unet_params), "clip": (clip, clip_params), "lpips": lpips}


def editor(seed: int = 0, image_size: int = IMAGE_SIZE, dtype=jnp.float32, with_lpips: bool = True, mesh=None):
    """A BlendedDiffusion on the smoke networks whose edits default to OPTIONS, the short schedule
    `--config=smoke` runs (options passed to `edit` override them)."""
    from bdjax.editor import BlendedDiffusion

    nets = networks(seed, image_size, dtype, with_lpips)
    return BlendedDiffusion(nets["unet"], nets["clip"], nets["lpips"], mesh, defaults=OPTIONS, label=LABEL)
