"""CLIP's input size comes from the CLIP model: a CLIP whose image resolution is not 224, saved
and loaded like converted weights, gets images of its own size from the guidance's augmentations
and from the ranking's resize, through the whole sampler (smoke-sized random networks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import blended, checkpoint, smoke
from bdjax.models import clip as clip_lib
from bdjax.models import unet as unet_lib
from bdjax.options import EditOptions

RESOLUTION = 96  # patch 32: a 3 x 3 grid
SIZE, B, AUG = 32, 2, 2
# Two steps of the "25" schedule (respaced indices 1 and 0).
OPTIONS = EditOptions(timestep_respacing="25", skip_timesteps=23, aug_num=AUG, batch_size=B)


class RecordingCLIP:
    """A CLIP module whose `apply` records (image shape, normalize) of every encode_image call,
    at trace time; everything else is the module's."""

    def __init__(self, module):
        self.module = module
        self.encoded = []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def apply(self, variables, *args, method=None, **kwargs):
        if method == "encode_image":
            self.encoded.append((tuple(args[0].shape), kwargs.get("normalize", True)))
        return self.module.apply(variables, *args, method=method, **kwargs)


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """The smoke UNet at SIZE and the smoke CLIP at RESOLUTION, the CLIP through a checkpoint."""
    unet = unet_lib.UNetModel(**smoke.unet_config(SIZE))
    unet_params = smoke.random_params(unet, jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32),
                                      jax.ShapeDtypeStruct((1,), jnp.float32), seed=0)
    config = dict(smoke.CLIP_CONFIG, image_resolution=RESOLUTION)
    clip = clip_lib.CLIP(**config)
    clip_params = smoke.random_params(clip, jax.ShapeDtypeStruct((1, RESOLUTION, RESOLUTION, 3), jnp.float32),
                                      jax.ShapeDtypeStruct((1, config["context_length"]), jnp.int32), seed=1)
    directory = str(tmp_path_factory.mktemp("clip96"))
    checkpoint.save(directory, clip_lib.CHECKPOINT_NAME, checkpoint.flatten(clip_params), config, model="clip")
    clip, clip_params = clip_lib.load(directory)
    return unet, unet_params, clip, clip_params


def test_loaded_clip_has_its_resolution(networks):
    _, _, clip, params = networks
    assert clip.image_resolution == RESOLUTION
    grid = RESOLUTION // clip.vision_patch_size
    assert params["visual"]["positional_embedding"].shape == (grid * grid + 1, clip.vision_width)


def test_sampler_feeds_clip_images_of_its_resolution(networks):
    unet, unet_params, clip, clip_params = networks
    recording = RecordingCLIP(clip)
    models = blended.Models(unet=unet, clip=recording)
    params = {"unet": unet_params, "clip": clip_params}
    rng = np.random.RandomState(0)
    init = jnp.asarray(rng.uniform(-1, 1, (1, SIZE, SIZE, 3)), jnp.float32)
    mask = jnp.zeros((1, SIZE, SIZE, 1)).at[:, 8:24, 6:26].set(1)
    text_embed = jnp.asarray(rng.randn(1, clip.embed_dim), jnp.float32)

    sampler = blended.make_sampler(models, OPTIONS, guided=True)
    assert len(sampler.indices) == 2
    out = jax.jit(sampler)(params, init, mask, text_embed, jnp.arange(B), 0)

    # Guidance: aug_num copies of each sample, normalised inside CLIP; ranking: one unnormalised
    # image per sample; the clip_whole score: one normalised image per sample. All at the CLIP's
    # resolution, not 224.
    assert sorted(set(recording.encoded)) == [((B, RESOLUTION, RESOLUTION, 3), False),
                                              ((B, RESOLUTION, RESOLUTION, 3), True),
                                              ((AUG * B, RESOLUTION, RESOLUTION, 3), True)]
    images, distances = np.asarray(out["images"]), np.asarray(out["distances"])
    assert images.shape == (B, SIZE, SIZE, 3) and np.isfinite(images).all()
    assert distances.shape == (B,) and np.isfinite(distances).all()

    # The ranking distance is CLIP's distance of mask * image resized to RESOLUTION.
    resized = jax.image.resize(images * np.asarray(mask), (B, RESOLUTION, RESOLUTION, 3), "bilinear",
                               antialias=False)
    embeds = clip.apply({"params": clip_params}, resized, normalize=False, method="encode_image")
    np.testing.assert_allclose(distances, np.asarray(clip_lib.spherical_distance(embeds, text_embed)),
                               rtol=1e-5, atol=1e-6)
