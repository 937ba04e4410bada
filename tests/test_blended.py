"""Behaviour of the Blended Diffusion sampler (bdjax/blended.py): blending, guidance, the step.

Analytic models stand in for the networks where behaviour (not parity) is tested: the UNet is
the exact denoiser for Gaussian data x0 ~ N(MU, S^2 I) (its eps prediction is E[eps | x_t]),
and CLIP is a differentiable colour target: an image's embedding is its mean colour minus grey,
the "text" embedding a fixed colour direction. Parity with the PyTorch reference is in
test_blended_parity.py; the editor API around the sampler (bdjax/editor.py) in test_editor.py.
"""

import flax.linen as nn
import jax.extend
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import blended, diffusion, smoke
from bdjax.blended import Models
from bdjax.options import EditOptions
from bdjax.models import unet as unet_lib

SIZE = 32
MU, S = 0.0, 0.5
RED = jnp.array([1.0, -1.0, -1.0])


class GaussianDenoiser(nn.Module):
    """E[eps | x_t] for x0 ~ N(MU, S^2 I), at the original timestep t; v = 0 (mid variance)."""
    image_size: int = SIZE
    num_classes: None = None

    @nn.compact
    def __call__(self, x, t, y=None):
        abar_all = jnp.asarray(np.cumprod(1 - diffusion.linear_betas(diffusion.NUM_TRAIN_STEPS)), jnp.float32)
        abar = abar_all[jnp.round(jnp.asarray(t)).astype(jnp.int32)]
        eps = jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * MU) / (abar * S ** 2 + 1 - abar)
        return jnp.concatenate([eps, jnp.zeros_like(x)], axis=-1)


class ColourCLIP(nn.Module):
    """Embedding = mean colour - grey over the image; text embedding = RED."""
    context_length: int = 77
    image_resolution: int = 224  # the size the sampler feeds it, as a real CLIP declares

    def encode_image(self, images, normalize=True):
        return jnp.mean(images - 0.5, axis=(1, 2))

    def encode_text(self, tokens):
        return jnp.broadcast_to(RED, (tokens.shape[0], 3))

    def __call__(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens)


ANALYTIC = Models(unet=GaussianDenoiser(), clip=ColourCLIP())
NO_PARAMS = {"unet": {}, "clip": {}}


@pytest.fixture(scope="module")
def scene():
    rng = np.random.RandomState(0)
    init = rng.uniform(-0.6, 0.6, (1, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((1, SIZE, SIZE, 1), np.float32)
    mask[:, 8:24, 8:24] = 1
    return jnp.asarray(init), jnp.asarray(mask)


def run(options, scene, guided=True, ids=(0, 1), seed=3):
    init, mask = scene
    sampler = jax.jit(blended.make_sampler(ANALYTIC, options, guided=guided))
    return sampler(NO_PARAMS, init, mask, RED, jnp.asarray(ids, jnp.int32), seed)


def redness(images, mask):
    """Mean of R - (G + B) / 2 over the masked pixels, per image ([0, 1] images)."""
    m = np.asarray(mask)[0, ..., 0] > 0
    im = np.asarray(images)[:, m]
    return im[..., 0].mean(-1) - im[..., 1:].mean((-1, -2))


# Strong guidance: the colour target's gradient per pixel is ~1/(224*224) of a real CLIP's scale.
STRONG = dict(skip_timesteps=70, clip_guidance_lambda=3e5, range_lambda=0.0, batch_size=2)


def test_edit_moves_the_masked_region_toward_the_prompt_and_keeps_the_background(scene):
    init, mask = scene
    guided = run(EditOptions(**STRONG), scene)
    plain = run(EditOptions(**STRONG), scene, guided=False)
    gain = redness(guided["images"], mask) - redness(plain["images"], mask)
    assert (gain > 0.05).all(), gain
    # enforce_background: outside the mask the result is the input, exactly.
    keep = np.asarray(mask)[0, ..., 0] == 0
    want = np.clip((np.asarray(init)[0] + 1) / 2, 0, 1)[keep]
    for image in np.asarray(guided["images"]):
        np.testing.assert_array_equal(image[keep], want)
    # The ranking distance prefers the redder result.
    assert (np.asarray(guided["distances"]) < np.asarray(plain["distances"])).all()


def test_algorithm1_background_drifts_and_the_preservation_loss_holds_it(scene):
    init, mask = scene
    keep = np.asarray(mask)[0, ..., 0] == 0
    target = np.clip((np.asarray(init)[0] + 1) / 2, 0, 1)[keep]

    def background_change(**kw):
        out = run(EditOptions(**STRONG, local_clip_guided_diffusion=True, lpips_sim_lambda=0.0, **kw), scene)
        return np.abs(np.asarray(out["images"])[:, keep] - target).mean()

    free = background_change()
    held = background_change(background_preservation_loss=True, l2_sim_lambda=3e5)
    assert free > 0.02  # no blending, no paste: the background is resampled
    assert held < 0.5 * free, (free, held)


def test_one_unet_forward_per_guided_step(scene):
    """Count UNet applications while tracing a guided step, and convolutions in its jaxpr."""
    init, mask = scene
    calls = []

    class Counting:
        num_classes = None

        def __init__(self, module):
            self.module = module

        def apply(self, *args, **kw):
            calls.append(1)
            return self.module.apply(*args, **kw)

    config = dict(unet_lib.preset("adm256_uncond"), image_size=SIZE, model_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16)
    unet = unet_lib.UNetModel(**config)
    params = {"unet": jax.eval_shape(unet.init, jax.random.key(0), init, jnp.zeros((1,)))["params"], "clip": {}}
    options = EditOptions(batch_size=2)
    d = diffusion.make_diffusion(timestep_respacing=options.timestep_respacing)
    x = jnp.zeros((2, SIZE, SIZE, 3))
    keys, background_key = blended.sample_keys(0, jnp.arange(2))

    def jaxpr(guided):
        step = blended.make_step(Models(Counting(unet), ColourCLIP()), options, d, guided=guided)
        draws = blended.step_draws(Models(unet, ColourCLIP()), options, keys, background_key, 5, x.shape)
        return jax.make_jaxpr(lambda p: step(p, x, 5, draws, init, mask, RED))(params)

    forward_only = count_convolutions(jaxpr(guided=False).jaxpr)
    assert calls == [1]
    guided_convs = count_convolutions(jaxpr(guided=True).jaxpr)
    assert calls == [1, 1]  # one application of the UNet in the guided step too
    # Forward + input-gradient convolutions; a second forward would add forward_only more.
    assert guided_convs == 2 * forward_only, (forward_only, guided_convs)


def test_a_new_guidance_term_reaches_the_step_with_no_other_change(scene, monkeypatch):
    """A term appended to guidance.TERMS, weighted by a new option, is reported by the guided step
    and moves its gradient; with its weight at 0 the step is the one without it, exactly."""
    import dataclasses

    from bdjax import guidance

    @dataclasses.dataclass(frozen=True)
    class WithBrightness(EditOptions):
        brightness_lambda: float = 0.0

    init, mask = scene
    d = diffusion.make_diffusion(timestep_respacing="100")
    x = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, 3))
    keys, background_key = blended.sample_keys(0, jnp.arange(2))

    def step(options):
        draws = blended.step_draws(ANALYTIC, options, keys, background_key, 40, x.shape)
        return jax.jit(blended.make_step(ANALYTIC, options, d, guided=True))(NO_PARAMS, x, 40, draws, init, mask, RED)

    plain = step(EditOptions(aug_num=1, batch_size=2))
    monkeypatch.setattr(guidance, "TERMS", guidance.TERMS + (
        guidance.Term("brightness_loss", "brightness_lambda", lambda inputs, options: jnp.sum(inputs.x_in * inputs.mask)),))
    base = WithBrightness(aug_num=1, batch_size=2)
    off, on = step(base), step(dataclasses.replace(base, brightness_lambda=-1e4))
    assert set(off["terms"]) == {"clip_loss", "range_loss"}
    assert set(on["terms"]) == {"clip_loss", "range_loss", "brightness_loss"}
    for key in ("sample", "grad"):
        np.testing.assert_array_equal(off[key], plain[key])
    # Rewarding brightness pushes the masked region's gradient up, and nothing else.
    change = np.asarray(on["grad"]) - np.asarray(off["grad"])
    assert (change[:, 8:24, 8:24] > 0).all() and np.abs(change[:, :8]).max() < 1e-6 * np.abs(change).max()


def count_convolutions(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += count_convolutions(sub)
    return n


def test_bfloat16_step_within_tolerance_of_float32():
    """One guided step of the smoke networks with bfloat16 activations and parameters against
    float32, same inputs and draws. Tolerance: max abs error <= 5e-2 x max |float32| for x_{i-1},
    pred_xstart and the guidance gradient (measured ~1e-3, ~8e-3, ~1.3e-2); the schedule
    arithmetic stays float32, so x_{i-1} is float32."""
    from bdjax import smoke

    rng = np.random.RandomState(0)
    init = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    mask = np.zeros((1, 64, 64, 1), np.float32)
    mask[:, 16:48, 16:48] = 1
    x = rng.randn(2, 64, 64, 3).astype(np.float32)
    text_embed = rng.randn(smoke.CLIP_CONFIG["embed_dim"]).astype(np.float32)
    options = EditOptions(aug_num=4, batch_size=2)
    d = diffusion.make_diffusion(timestep_respacing=options.timestep_respacing)

    def run_step(dtype):
        nets = smoke.networks(with_lpips=False, dtype=dtype)
        models = Models(nets["unet"][0], nets["clip"][0])
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), {"unet": nets["unet"][1], "clip": nets["clip"][1]})
        keys, background_keys = blended.sample_keys(0, jnp.arange(2))
        draws = blended.step_draws(models, options, keys, background_keys, 40, x.shape)
        out = jax.jit(blended.make_step(models, options, d, guided=True))(params, x, 40, draws, init, mask, text_embed)
        return out

    full, half = run_step(jnp.float32), run_step(jnp.bfloat16)
    assert half["sample"].dtype == jnp.float32
    for key in ("sample", "pred_xstart", "grad"):
        want = np.asarray(full[key])
        err = np.abs(np.asarray(half[key], np.float32) - want).max() / np.abs(want).max()
        assert 0 < err <= 5e-2, (key, err)


def test_class_conditional_model_gets_a_fresh_random_class_per_sample_and_step(scene):
    """The 512 model path: randomize_class draws a label per sample and step (the reference
    redraws model_kwargs["y"] every step); without it the label is 0 (the reference's start)."""
    config = dict(unet_lib.preset("adm512_cond"), image_size=SIZE, model_channels=32, channel_mult=(1, 2),
                  num_res_blocks=1, attention_resolutions=(2,), num_head_channels=16, num_classes=1000)
    unet = unet_lib.UNetModel(**config)
    models = Models(unet, ColourCLIP())
    keys, background_keys = blended.sample_keys(5, jnp.arange(64))
    labels = np.stack([np.asarray(blended.step_draws(models, EditOptions(), keys, background_keys, i,
                                                     (64, SIZE, SIZE, 3))["y"]) for i in range(3)])
    assert labels.shape == (3, 64) and labels.min() >= 0 and labels.max() < 1000
    assert len(np.unique(labels)) > 150  # fresh draws across samples and steps
    fixed = blended.step_draws(models, EditOptions(randomize_class=False), keys, background_keys, 0, (64, SIZE, SIZE, 3))
    np.testing.assert_array_equal(fixed["y"], 0)
    # A guided step of the class-conditional UNet traces with the labels wired in.
    init, mask = scene
    params = {"unet": jax.eval_shape(unet.init, jax.random.key(0), init, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"],
              "clip": {}}
    d = diffusion.make_diffusion(timestep_respacing="100")
    step = blended.make_step(models, EditOptions(batch_size=2), d, guided=True)
    draws = blended.step_draws(models, EditOptions(), keys[:2], background_keys[:2], 7, (2, SIZE, SIZE, 3))
    out = jax.eval_shape(lambda p: step(p, jnp.zeros((2, SIZE, SIZE, 3)), 7, draws, init, mask, RED), params)
    assert out["sample"].shape == (2, SIZE, SIZE, 3)


def test_background_loss_computes_the_init_images_lpips_features_once(scene):
    """Algorithm 1 with the LPIPS background loss: the VGG trunk runs on the unchanging init image
    once, before the scan over timesteps; inside it only the sample's background goes through the
    trunk (forward and input gradient). The step given those features equals the step that
    computes them itself (float32, 1e-6)."""
    from bdjax.models import lpips as lpips_lib

    init, mask = scene
    module = lpips_lib.LPIPS()
    models = Models(unet=GaussianDenoiser(), clip=ColourCLIP(), lpips=module)
    options = EditOptions(**STRONG, local_clip_guided_diffusion=True, background_preservation_loss=True)
    shapes = {"unet": {}, "clip": {}, "lpips": lpips_lib.param_shapes(module, SIZE)}
    sampler = blended.make_sampler(models, options, guided=True)
    ids = jnp.arange(2, dtype=jnp.int32)
    jaxpr = jax.make_jaxpr(sampler)(shapes, init, mask, RED, ids, 3).jaxpr
    trunk = len([i for indices in lpips_lib.VGG16_SLICES for i in indices])

    (at,) = [i for i, e in enumerate(jaxpr.eqns) if e.primitive.name == "scan"]
    scan = jaxpr.eqns[at]
    convolutions = lambda eqns: [e for e in eqns if e.primitive.name == "conv_general_dilated"]  # noqa: E731
    before, after = convolutions(jaxpr.eqns[:at]), convolutions(jaxpr.eqns[at + 1:])
    assert len(before) == trunk and all(e.invars[0].aval.shape[0] == init.shape[0] for e in before)
    inside = count_convolutions(scan.params["jaxpr"].jaxpr)
    heads = len(lpips_lib.VGG16_CHANNELS)
    assert inside == 2 * (trunk + heads), inside  # the background's forward and input gradient only
    # After the scan, once: the background_lpips score (bdjax/scores.py), the results' and the
    # inputs' backgrounds through the trunk as one batch, then the heads.
    assert len(after) == trunk + heads and {e.invars[0].aval.shape[0] for e in after[:trunk]} == {2 * len(ids)}

    image = jax.ShapeDtypeStruct(init.shape, jnp.float32)
    params = {"unet": {}, "clip": {}, "lpips": smoke.random_params(module, image, image, seed=1)}
    d = diffusion.make_diffusion(timestep_respacing=options.timestep_respacing)
    step = blended.make_step(models, options, d, guided=True)
    x = jax.random.normal(jax.random.key(2), (2, SIZE, SIZE, 3))
    keys, background_key = blended.sample_keys(0, ids)
    draws = blended.step_draws(models, options, keys, background_key, 5, x.shape)
    features = blended.lpips_init_features(models, params, init)
    given = step(params, x, 5, draws, init, mask, RED, features)
    itself = step(params, x, 5, draws, init, mask, RED)
    assert np.isfinite(given["terms"]["lpips_loss"]) and float(given["terms"]["lpips_loss"]) != 0
    np.testing.assert_allclose(given["grad"], itself["grad"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(given["terms"]["lpips_loss"], itself["terms"]["lpips_loss"], rtol=1e-6)
