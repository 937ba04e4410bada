"""bdjax/cost.py's analytic FLOP counts against XLA's count of the real networks.

The networks are built at their real sizes (ADM 256x256, CLIP ViT-B/16) and traced from shapes
only: no weights, nothing compiled. XLA's count is the cost analysis of the lowered program
(HloCostAnalysis before optimisation): 2 FLOP per multiply-add of each dot and convolution, as
the analytic count, plus 1 FLOP per element of each elementwise op, which the analytic count leaves
out. One sample is traced: the counts are linear in the batch.
"""

import math

import jax
import jax.numpy as jnp
import pytest

from bdjax import cost, parallel
from bdjax.models import clip as clip_lib
from bdjax.models import unet as unet_lib


def xla_flops(lowered) -> float:
    return float(lowered.cost_analysis()["flops"])


def test_adm256_forward_matches_xla():
    """Within 1.5 %: XLA leaves out the 3x3 taps on the zero padding (1.4 % of this UNet's
    convolution work, most of it at the coarse levels) and adds the elementwise ops (0.25 %)."""
    unet = unet_lib.UNetModel(**unet_lib.preset("adm256_uncond"))
    size = unet.image_size
    lowered = jax.jit(lambda params, x, t: unet.apply({"params": params}, x, t)).lower(
        unet_lib.param_shapes(unet), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32))
    assert math.isclose(xla_flops(lowered), cost.ADM256_FORWARD_FLOPS, rel_tol=0.015)


def test_vit_b16_forward_matches_xla():
    """Within 1 %: the ViT has no padding, and its elementwise ops (layer norms, softmax,
    QuickGELU) add 0.3 %. Leaving out the attention scores and values (1.4 GFLOP) misses by 4 %."""
    clip = clip_lib.CLIP(**clip_lib.preset("vit_b16"))
    size = clip.image_resolution
    lowered = jax.jit(lambda params, images: clip.apply({"params": params}, images, method="encode_image")).lower(
        clip_lib.param_shapes(clip), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    assert math.isclose(xla_flops(lowered), cost.VIT_B16_FORWARD_FLOPS, rel_tol=0.01)


@pytest.fixture(scope="module")
def guided_step():
    """(XLA's FLOPs of one guided step of one sample, aug_num): the editor's sampler for the real
    networks, as bench/compile_report.py builds it, its advance program lowered for a batch of
    one on one device. XLA counts a loop body once, so the program's count is one step's."""
    from bench import compile_report

    mesh = parallel.make_mesh(jax.devices()[:1])
    sampler, options, params, size, embed_dim = compile_report.build_sampler("real", "fp32", "none", None, mesh)
    sharded = parallel.batch_sharded(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)  # noqa: E731
    inputs = (spec((1, size, size, 3), jnp.float32), spec((1, size, size, 1), jnp.float32),
              spec((1, embed_dim), jnp.float32), spec((1,), jnp.int32), spec((1,), jnp.int32))
    state = jax.tree.map(lambda s: spec(s.shape, s.dtype), jax.eval_shape(sampler.begin, params, *inputs))
    chunk = jax.ShapeDtypeStruct(sampler.chunks[0].shape, jnp.int32, sharding=parallel.replicated_sharding(mesh))
    return xla_flops(sampler.advance.lower(params, state, chunk)), options.aug_num


def test_guided_step_counts_backwards_as_two_forwards_where_xla_counts_one(guided_step):
    """The analytic step is 3 forwards of each network; the editor differentiates with respect to
    the image only, so XLA counts about 2 forwards (a backward through attention costs a little more
    than its forward), within the UNet's 1.5 %."""
    flops, aug_num = guided_step
    assert cost.guided_step_flops(aug_num) == 3 * (cost.ADM256_FORWARD_FLOPS + aug_num * cost.VIT_B16_FORWARD_FLOPS)
    assert math.isclose(flops, 2 / 3 * cost.guided_step_flops(aug_num), rel_tol=0.015)
