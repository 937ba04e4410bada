"""Extending augmentations parity with the reference's torch / kornia pipeline.

Reference: the authors' ImageAugmentations: torch.nn.AdaptiveAvgPool2d, then kornia 0.9.0
RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border") and
RandomPerspective(0.7, p=0.7) in a torch nn.Sequential, i.e. kornia.geometry.transform
warp_affine / warp_perspective, bilinear, align_corners=False.
Tolerances:
- pooling (float32): max abs error <= 1e-6 x max |reference|.
- warps on random [-1, 1] noise at 224 x 224: float64 on both sides (jax x64) max abs error
  <= 1e-8; float32 on both sides <= 1e-3, and our float32 error against kornia float64 at most
  twice kornia float32's own. Float32 rounding of the sampling coordinates (~5e-5 px) times the
  noise's slope (up to 2 per pixel) puts kornia float32 itself ~1e-4 from kornia float64, so
  1e-5 is out of reach for any float32 implementation on such data.
- end to end (float32, kornia's own sampled parameters injected, smooth 256 image): <= 1e-4 abs.
- gradient w.r.t. the image through both warps (float32, smooth image): <= 1e-4 x max |reference|.
- distributions (jax.random draws): exact ranges, binomial 5-sigma bounds on frequencies.
- against the pre-rewrite NHWC formulation kept below (reference_bilinear_sample), float32: values
  <= 1e-6 abs, gradients <= 1e-5 x max |reference| (see VALUE_ATOL: same arithmetic per tap, so
  only XLA's rounding and scatter accumulation order can differ).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import kornia.augmentation as K
from kornia.geometry.transform import (get_affine_matrix2d, get_perspective_transform, warp_affine,
                                       warp_perspective)

from bdjax import augment

SIZE = 224
INWARD = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float64)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def corners(height, width):
    return np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)


def smooth_images(batch, size, seed):
    """Low-frequency images in [-1, 1] (slope ~0.1 per pixel), like a pooled photograph."""
    rng = np.random.default_rng(seed)
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    out = np.zeros((batch, size, size, 3))
    for _ in range(6):
        fx, fy = rng.uniform(-0.08, 0.08, (2, batch, 1, 1, 3))
        phase = rng.uniform(0, 2 * np.pi, (batch, 1, 1, 3))
        out += np.sin(fx * x[None, ..., None] + fy * y[None, ..., None] + phase) / 6
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("in_size, out_size", [((256, 256), (224, 224)), ((37, 30), (13, 11))])
def test_pool_matches_adaptive_avg_pool2d(in_size, out_size):
    x = np.random.default_rng(0).uniform(-1, 1, (2,) + in_size + (3,)).astype(np.float32)
    ref = nhwc(torch.nn.AdaptiveAvgPool2d(out_size)(nchw(x)))
    ours = np.asarray(augment.adaptive_avg_pool(jnp.asarray(x), out_size))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()


# ----------------------------------------------------------------------------- warps

@pytest.fixture(scope="module")
def warp_case():
    """A noise image and kornia's matrices: rotation + translation, and perspectives from sampled corners."""
    gen = torch.Generator().manual_seed(0)
    batch = 3
    image = torch.rand(batch, 3, SIZE, SIZE, generator=gen, dtype=torch.float64) * 2 - 1
    angle = torch.rand(batch, generator=gen, dtype=torch.float64) * 30 - 15
    translation = (torch.rand(batch, 2, generator=gen, dtype=torch.float64) * 2 - 1) * 0.1 * SIZE
    centre = torch.full((batch, 2), SIZE / 2 - 0.5, dtype=torch.float64)
    affine = get_affine_matrix2d(translation, centre, torch.ones(batch, 2, dtype=torch.float64), angle)
    start = torch.from_numpy(corners(SIZE, SIZE)).expand(batch, 4, 2)
    offsets = torch.rand(batch, 4, 2, generator=gen, dtype=torch.float64) * 0.35 * SIZE
    perspective = get_perspective_transform(start, start + offsets * torch.from_numpy(INWARD))
    return image, affine, perspective


def kornia_warp(kind, image, matrix, padding):
    if kind == "affine":
        return warp_affine(image, matrix[:, :2], (SIZE, SIZE), align_corners=False, padding_mode=padding)
    return warp_perspective(image, matrix, (SIZE, SIZE), align_corners=False, padding_mode=padding)


OUR_WARPS = {"affine": augment.warp_affine, "perspective": augment.warp_perspective}


@pytest.mark.parametrize("kind, padding", [("affine", "border"), ("affine", "zeros"),
                                           ("perspective", "zeros"), ("perspective", "border")])
def test_warp_matches_kornia_float64(warp_case, kind, padding):
    image, affine, perspective = warp_case
    matrix = affine if kind == "affine" else perspective
    ref = nhwc(kornia_warp(kind, image, matrix, padding))
    with jax.enable_x64(True):
        warp = jax.jit(jax.vmap(OUR_WARPS[kind], in_axes=(0, 0, None)), static_argnums=2)
        ours = warp(jnp.asarray(nhwc(image)), jnp.asarray(matrix.numpy()), padding)
        assert ours.dtype == jnp.float64
        ours = np.asarray(ours)
    assert np.abs(ours - ref).max() <= 1e-8
    if padding == "zeros":
        assert (ref == 0).any()  # the padding is exercised


@pytest.mark.parametrize("kind, padding", [("affine", "border"), ("perspective", "zeros")])
def test_warp_matches_kornia_float32(warp_case, kind, padding):
    image, affine, perspective = warp_case
    matrix = (affine if kind == "affine" else perspective).float()
    image = image.float()
    ref = nhwc(kornia_warp(kind, image, matrix, padding))
    warp = jax.jit(jax.vmap(OUR_WARPS[kind], in_axes=(0, 0, None)), static_argnums=2)
    ours = np.asarray(warp(jnp.asarray(nhwc(image)), jnp.asarray(matrix.numpy()), padding))
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-3
    # As precise as kornia: our float32 error against kornia float64 is within twice kornia's own.
    exact = nhwc(kornia_warp(kind, warp_case[0], matrix.double(), padding))
    assert np.abs(ours - exact).max() <= 2 * np.abs(ref - exact).max()


def test_matrices_match_kornia(warp_case):
    _, affine, perspective = warp_case
    gen = torch.Generator().manual_seed(1)
    angle = torch.rand(3, generator=gen, dtype=torch.float64) * 30 - 15
    translation = torch.rand(3, 2, generator=gen, dtype=torch.float64) * 40 - 20
    centre = torch.full((3, 2), SIZE / 2 - 0.5, dtype=torch.float64)
    ref = get_affine_matrix2d(translation, centre, torch.ones(3, 2, dtype=torch.float64), angle).numpy()
    start = corners(SIZE, SIZE)
    end = start + np.random.default_rng(1).uniform(0, 0.35 * SIZE, (3, 4, 2)) * INWARD
    ref_perspective = get_perspective_transform(torch.from_numpy(np.broadcast_to(start, end.shape).copy()),
                                                torch.from_numpy(end)).numpy()
    with jax.enable_x64(True):
        ours = np.asarray(jax.vmap(augment.affine_matrix, in_axes=(0, 0, None, None))(
            jnp.asarray(angle.numpy()), jnp.asarray(translation.numpy()), SIZE, SIZE))
        ours_perspective = np.asarray(jax.vmap(augment.perspective_matrix, in_axes=(None, 0))(
            jnp.asarray(start), jnp.asarray(end)))
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(ours_perspective, ref_perspective, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- end to end with kornia's parameters

def test_augmented_batch_matches_kornia_with_injected_params():
    batch, aug_num = 2, 8
    images = smooth_images(batch, 256, seed=1)
    torch.manual_seed(404)
    affine = K.RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border")
    perspective = K.RandomPerspective(0.7, p=0.7)
    pooled = torch.nn.AdaptiveAvgPool2d((SIZE, SIZE))(nchw(images))
    tiled = torch.tile(pooled, (aug_num, 1, 1, 1))
    ref = nhwc(torch.cat([tiled[:batch], torch.nn.Sequential(affine, perspective)(tiled[batch:])]))

    a, p = affine._params, perspective._params
    assert (a["translations"][:, 0] == 0).all()  # the reference's vertical-only translation
    params = augment.AugmentationParams(
        affine_matrix=jax.vmap(augment.affine_matrix, in_axes=(0, 0, None, None))(
            jnp.asarray(a["angle"].numpy()), jnp.asarray(a["translations"].numpy()), SIZE, SIZE),
        perspective_matrix=jax.vmap(augment.perspective_matrix)(
            jnp.asarray(p["start_points"].numpy()), jnp.asarray(p["end_points"].numpy())),
        apply_affine=jnp.asarray(a["batch_prob"].numpy() > 0.5),
        apply_perspective=jnp.asarray(p["batch_prob"].numpy() > 0.5),
    )
    for flags in (params.apply_affine, params.apply_perspective):  # both branches are exercised
        assert flags.any() and not flags.all()
    # Where kornia applied a transform, its matrix is the one we build from its parameters.
    for ours_m, ref_m, applied in ((params.affine_matrix, affine.transform_matrix, params.apply_affine),
                                   (params.perspective_matrix, perspective.transform_matrix,
                                    params.apply_perspective)):
        applied = np.asarray(applied)
        np.testing.assert_allclose(np.asarray(ours_m)[applied], ref_m.numpy()[applied], rtol=1e-5, atol=1e-4)

    # kornia's row (a - 1) * B + b is copy a of sample b; ours take the params as (B, aug_num - 1).
    by_sample = jax.tree.map(lambda t: jnp.swapaxes(t.reshape((aug_num - 1, batch) + t.shape[1:]), 0, 1), params)
    apply = jax.jit(augment.apply_extending_augmentations, static_argnums=2)
    ours = np.asarray(apply(jnp.asarray(images), by_sample, SIZE))
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4


def test_gradient_matches_kornia():
    """The guidance differentiates through the augmentations: vjp w.r.t. the image vs torch autograd."""
    size, copies = 48, 6
    images = smooth_images(copies, size, seed=4)
    torch.manual_seed(7)
    affine = K.RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border")
    perspective = K.RandomPerspective(0.7, p=0.7)
    source = nchw(images).requires_grad_(True)
    cotangent = np.random.default_rng(4).normal(size=(copies, size, size, 3)).astype(np.float32)
    (torch.nn.Sequential(affine, perspective)(source) * nchw(cotangent)).sum().backward()
    ref = nhwc(source.grad)

    a, p = affine._params, perspective._params
    params = augment.AugmentationParams(
        affine_matrix=jnp.asarray(affine.transform_matrix.numpy()),
        perspective_matrix=jnp.asarray(perspective.transform_matrix.numpy()),
        apply_affine=jnp.asarray(a["batch_prob"].numpy() > 0.5),
        apply_perspective=jnp.asarray(p["batch_prob"].numpy() > 0.5),
    )
    _, vjp = jax.vjp(lambda x: jax.vmap(augment.augment_copy)(x, params), jnp.asarray(images))
    ours = np.asarray(jax.jit(vjp)(jnp.asarray(cotangent))[0])
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


# ----------------------------------------------------------------------------- parameter distributions

N_DRAWS = 20000


def binomial_ok(count, n, p, sigmas=5.0):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.fixture(scope="module")
def draws():
    keys = jax.random.split(jax.random.key(0), N_DRAWS)

    @jax.jit
    def sample(keys):
        def one(key):
            affine_key, perspective_key = jax.random.split(key)
            return (augment.sample_affine_params(affine_key, SIZE, SIZE),
                    augment.sample_affine_params(affine_key, SIZE, SIZE, symmetric_translation=True),
                    augment.sample_perspective_points(perspective_key, SIZE, SIZE),
                    augment.sample_augmentation_params(key, SIZE, SIZE))
        return jax.vmap(one)(keys)

    return jax.tree.map(np.asarray, sample(keys))


def assert_uniform(values, low, high, bins=10):
    assert values.min() >= low and values.max() <= high
    counts, _ = np.histogram(values, bins=bins, range=(low, high))
    assert all(binomial_ok(c, len(values), 1 / bins) for c in counts), counts


def test_affine_draws(draws):
    (angle, translation), (angle_sym, translation_sym), _, _ = draws
    assert_uniform(angle, -15, 15)
    assert np.all(translation[:, 0] == 0.0)  # horizontal shift exactly zero by default
    assert_uniform(translation[:, 1], -0.1 * SIZE, 0.1 * SIZE)
    assert_uniform(translation_sym[:, 0], -0.1 * SIZE, 0.1 * SIZE)
    assert_uniform(translation_sym[:, 1], -0.1 * SIZE, 0.1 * SIZE)
    np.testing.assert_array_equal(angle_sym, angle)
    np.testing.assert_array_equal(translation_sym[:, 1], translation[:, 1])


def test_perspective_draws(draws):
    _, _, (start, end), _ = draws
    np.testing.assert_array_equal(start, np.broadcast_to(corners(SIZE, SIZE), start.shape))
    inward = (end - start) * INWARD  # per corner and axis, the inward displacement
    assert_uniform(inward.reshape(-1, 8)[:, 0], 0, 0.35 * SIZE)
    assert_uniform(inward.reshape(-1), 0, 0.35 * SIZE)
    assert inward.min() >= 0 and inward.max() <= 0.35 * SIZE


def test_full_sampler(draws):
    _, _, _, params = draws
    # Apply flags: Bernoulli(0.7) each, independent.
    affine_on, perspective_on = params.apply_affine, params.apply_perspective
    assert binomial_ok(affine_on.sum(), N_DRAWS, 0.7)
    assert binomial_ok(perspective_on.sum(), N_DRAWS, 0.7)
    assert binomial_ok((affine_on & perspective_on).sum(), N_DRAWS, 0.49)
    # The affine matrix is a rotation within +-15 degrees about the centre plus a vertical shift.
    m = params.affine_matrix.astype(np.float64)
    angle = np.degrees(np.arctan2(m[:, 1, 0], m[:, 0, 0]))
    assert_uniform(angle, -15, 15)
    centre = np.full(2, (SIZE - 1) / 2)
    shift = m[:, :2, 2] - (centre - np.einsum("nij,j->ni", m[:, :2, :2], centre))
    assert np.abs(shift[:, 0]).max() < 1e-4
    assert np.abs(shift[:, 1]).max() <= 0.1 * SIZE + 1e-4 and np.abs(shift[:, 1]).max() > 0.099 * SIZE
    # The perspective matrix takes the pixel-centre corners inward by at most 0.35 * size.
    h = params.perspective_matrix.astype(np.float64)
    start = np.concatenate([corners(SIZE, SIZE), np.ones((4, 1))], axis=1)
    mapped = np.einsum("nij,kj->nki", h, start)
    inward = (mapped[..., :2] / mapped[..., 2:] - corners(SIZE, SIZE)) * INWARD
    assert inward.min() >= -1e-3 and inward.max() <= 0.35 * SIZE + 1e-3


# ----------------------------------------------------------------------------- the batch function

def test_extending_augmentations_order_and_batch_independence():
    batch, aug_num, size, out = 4, 4, 64, 56
    images = jnp.asarray(smooth_images(batch, size, seed=2))
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(404), i))(jnp.arange(batch))
    run = jax.jit(augment.extending_augmentations, static_argnames=("aug_num", "output_size"))
    full = np.asarray(run(images, keys, aug_num=aug_num, output_size=out))
    assert full.shape == (aug_num * batch, out, out, 3)
    # Rows 0..B-1 are the pooled images themselves.
    pooled = np.asarray(jax.jit(augment.adaptive_avg_pool, static_argnums=1)(images, out))
    np.testing.assert_array_equal(full[:batch], pooled)
    # The copies are augmented: each differs from its pooled image unless neither transform
    # applies (probability 0.09 per copy).
    copies = full[batch:].reshape(aug_num - 1, batch, out, out, 3)
    assert (np.abs(copies - pooled[None]).max(axis=(2, 3, 4)) > 1e-3).mean() > 0.5

    # Sample 2 alone, with its key, draws the same transforms and gives the same copies, which
    # therefore sit at rows a * B + 2. (Images agree to float rounding, not bit for bit: XLA
    # compiles the two batch sizes differently.)
    sample = jax.jit(augment.sample_extending_params, static_argnums=(1, 2))
    params_full, params_alone = sample(keys, aug_num, out), sample(keys[2:3], aug_num, out)
    for flags_full, flags_alone in ((params_full.apply_affine, params_alone.apply_affine),
                                    (params_full.apply_perspective, params_alone.apply_perspective)):
        np.testing.assert_array_equal(np.asarray(flags_full)[2], np.asarray(flags_alone)[0])
    for matrix_full, matrix_alone in ((params_full.affine_matrix, params_alone.affine_matrix),
                                      (params_full.perspective_matrix, params_alone.perspective_matrix)):
        np.testing.assert_allclose(np.asarray(matrix_full)[2], np.asarray(matrix_alone)[0], rtol=1e-6, atol=1e-5)
    alone = np.asarray(run(images[2:3], keys[2:3], aug_num=aug_num, output_size=out))
    np.testing.assert_allclose(full[2::batch], alone, rtol=0, atol=2e-5)
    # Raw uint32 keys are the same keys as their typed wrapping.
    raw = jax.random.key_data(keys)
    np.testing.assert_array_equal(np.asarray(run(images, raw, aug_num=aug_num, output_size=out)), full)


def test_single_copy_is_the_pooled_image():
    images = jnp.asarray(smooth_images(2, 16, seed=3))
    run = jax.jit(augment.extending_augmentations, static_argnames=("aug_num", "output_size"))
    out = run(images, jax.random.split(jax.random.key(0), 2), aug_num=1, output_size=14)
    assert out.shape == (2, 14, 14, 3)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(augment.adaptive_avg_pool(images, 14)))


# ----------------------------------------------------------------------------- the pre-rewrite formulation

def reference_bilinear_sample(image, x, y, padding):
    """The warps' sampling before they became channel-major (commit 6a08167), kept as the reference:
    NHWC images read as a flat (N * H * W, C) array by one gather per tap (slices of C values)."""
    *lead, height, width, channels = image.shape
    count = int(np.prod(lead, dtype=np.int64))
    if padding == "border":
        x = jnp.clip(x, 0.0, width - 1.0)
        y = jnp.clip(y, 0.0, height - 1.0)
    if count == 0:
        return jnp.zeros(x.shape + (channels,), image.dtype)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0
    flat = image.reshape(count * height * width, channels)
    first = (jnp.arange(count, dtype=jnp.int32) * (height * width)).reshape(*lead, *(1,) * (x.ndim - len(lead)))
    out = jnp.zeros(x.shape + (channels,), jnp.result_type(image.dtype, x.dtype))
    for yi, wy in ((y0, y1 - y), (y1, y - y0)):
        for xi, wx in ((x0, x1 - x), (x1, x - x0)):
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
            weight = jnp.where(inside, wx * wy, 0.0)
            index = first + (jnp.clip(yi, 0, height - 1).astype(jnp.int32) * width
                             + jnp.clip(xi, 0, width - 1).astype(jnp.int32))
            out = out + jnp.take(flat, index, axis=0, mode="clip") * weight[..., None]
    return out.astype(image.dtype)


def reference_warp_affine(image, matrix, padding="border"):
    height, width = image.shape[-3:-1]
    last_row = jnp.broadcast_to(jnp.array([0, 0, 1], matrix.dtype), matrix.shape[:-2] + (1, 3))
    points = augment._source_points(jnp.concatenate([matrix[..., :2, :], last_row], axis=-2), height, width)
    return reference_bilinear_sample(image, points[..., 0], points[..., 1], padding)


def reference_warp_perspective(image, matrix, padding="zeros"):
    height, width = image.shape[-3:-1]
    points = augment._source_points(matrix, height, width)
    return reference_bilinear_sample(image, points[..., 0] / points[..., 2], points[..., 1] / points[..., 2], padding)


def reference_extending_augmentations(images, keys, aug_num, output_size):
    params = augment.sample_extending_params(keys, aug_num, output_size)
    pooled = augment.adaptive_avg_pool(images, output_size)
    copies = jnp.broadcast_to(pooled[:, None], (images.shape[0], aug_num - 1) + pooled.shape[1:])
    flag = lambda f: f[..., None, None, None]  # noqa: E731
    copies = jnp.where(flag(params.apply_affine), reference_warp_affine(copies, params.affine_matrix, "border"), copies)
    copies = jnp.where(flag(params.apply_perspective),
                       reference_warp_perspective(copies, params.perspective_matrix, "zeros"), copies)
    return jnp.concatenate([pooled[None], jnp.moveaxis(copies, 1, 0)]).reshape((-1,) + pooled.shape[1:])


# Tolerances against the pre-rewrite formulation: both compute every tap's weight and index with
# the same operations and add the four taps in the same order, so values can differ only by float
# rounding in how XLA compiles the two programs (FMA contraction, fusion) and gradients also by the
# order in which the scatter-adds accumulate (up to hundreds of contributions on an edge pixel with
# border padding). Values: <= 1e-6 abs (images in [-1, 1]: a few float32 ulps); gradients:
# <= 1e-5 x max |reference|.
VALUE_ATOL = 1e-6
GRAD_RTOL = 1e-5


def assert_close_to_reference(ours, ref, atol, finite=True):
    """|ours - ref| <= atol; both finite, or (finite=False) non-finite at the same places."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    if finite:
        assert np.isfinite(ours).all() and np.isfinite(ref).all()
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    both = np.isfinite(ref)
    assert np.abs(ours[both] - ref[both]).max() <= atol


def value_and_vjp(fn, *args):
    """fn(*args) and its vjp with a fixed random cotangent, w.r.t. every argument."""
    out, vjp = jax.vjp(fn, *args)
    cotangent = jnp.asarray(np.random.default_rng(11).normal(size=out.shape), out.dtype)
    return out, vjp(cotangent)


def test_bilinear_sample_equals_reference_at_any_coordinates():
    """Non-square images, coordinates inside, outside, on the edges, on exact integers, and non-finite
    (a point behind the perspective's horizon): same values, same gradients w.r.t. image and
    coordinates. Values and image gradients are finite; the gradient w.r.t. a non-finite
    coordinate is NaN in both (0 times its infinite weight factor). Tolerances: VALUE_ATOL, GRAD_RTOL."""
    rng = np.random.default_rng(3)
    count, height, width = 3, 9, 13
    image = jnp.asarray(rng.uniform(-1, 1, (count, height, width, 3)), jnp.float32)
    x = rng.uniform(-3, width + 2, (count, 7, 11))
    y = rng.uniform(-3, height + 2, (count, 7, 11))
    x[:, 0, :6] = [0, width - 1, -1, width, 5, -0.5]  # edges and exact integers
    y[:, 0, :6] = [0, height - 1, 4, 2, -1, height - 0.5]
    x[:, 1, :4] = [np.inf, -np.inf, np.nan, 3.0]
    y[:, 1, :4] = [2.0, np.nan, 1.0, np.inf]
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    for padding in augment.PADDINGS:
        def run(sample):
            return jax.jit(lambda *a: value_and_vjp(lambda i, u, v: sample(i, u, v, padding), *a))(image, x, y)
        ours, ref = run(augment._bilinear_sample), run(reference_bilinear_sample)
        assert_close_to_reference(ours[0], ref[0], VALUE_ATOL)
        for ours_grad, ref_grad, finite in zip(ours[1], ref[1], (True, False, False)):
            scale = np.abs(np.nan_to_num(np.asarray(ref_grad), nan=0, posinf=0, neginf=0)).max()
            assert_close_to_reference(ours_grad, ref_grad, GRAD_RTOL * scale, finite)


@pytest.mark.parametrize("kind, padding", [("affine", "border"), ("affine", "zeros"),
                                           ("perspective", "zeros"), ("perspective", "border")])
def test_warp_equals_reference(kind, padding):
    """Each warp on a non-square noise stack with general matrices (rotations to 40 degrees, scales,
    shifts; perspectives with a horizon inside the image): values and gradients w.r.t. the images
    and the matrices (NaN in both for the horizon's matrix, finite for every image), to VALUE_ATOL
    and GRAD_RTOL."""
    rng = np.random.default_rng(5)
    count, height, width = 4, 40, 56
    images = jnp.asarray(rng.uniform(-1, 1, (count, height, width, 3)), jnp.float32)
    if kind == "affine":
        angle = rng.uniform(-40, 40, count)
        scale = rng.uniform(0.7, 1.4, count)
        shift = rng.uniform(-15, 15, (count, 2))
        cos, sin = scale * np.cos(np.radians(angle)), scale * np.sin(np.radians(angle))
        matrices = np.stack([np.stack([cos, -sin, shift[:, 0]], -1), np.stack([sin, cos, shift[:, 1]], -1)], 1)
        warp, ref_warp = augment.warp_affine, reference_warp_affine
    else:
        start = corners(height, width)
        end = start + rng.uniform(0, 0.35, (count, 4, 2)) * np.array([width, height]) * INWARD
        matrices = np.stack([np.asarray(augment.perspective_matrix(start, e)) for e in end])
        # The last image's homography sends the line x = 20 of the output to infinity.
        matrices[-1] = np.linalg.inv(np.array([[1.0, 0.1, 0], [0.05, 1, 0], [-1 / 20, 0, 1]]))
        warp, ref_warp = augment.warp_perspective, reference_warp_perspective
    matrices = jnp.asarray(matrices, jnp.float32)
    ours = jax.jit(lambda *a: value_and_vjp(lambda i, m: warp(i, m, padding), *a))(images, matrices)
    ref = jax.jit(lambda *a: value_and_vjp(lambda i, m: ref_warp(i, m, padding), *a))(images, matrices)
    assert_close_to_reference(ours[0], ref[0], VALUE_ATOL)
    for ours_grad, ref_grad, finite in zip(ours[1], ref[1], (True, False)):
        scale = np.abs(np.nan_to_num(np.asarray(ref_grad), nan=0, posinf=0, neginf=0)).max()
        assert_close_to_reference(ours_grad, ref_grad, GRAD_RTOL * scale, finite)
    if kind == "perspective" and padding == "zeros":
        assert (np.asarray(ref[0])[-1] == 0).any()  # the horizon case samples outside the image


@pytest.mark.parametrize("aug_num", [1, 8])
def test_extending_augmentations_equal_reference(aug_num):
    """The whole augmentation at the sampler's sizes (256 -> 224): values and gradient w.r.t. the
    images, to VALUE_ATOL and GRAD_RTOL."""
    images = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (2, 256, 256, 3)), jnp.float32)
    keys = jax.random.split(jax.random.key(5), 2)
    def run(augmentations):
        return jax.jit(lambda x: value_and_vjp(lambda x: augmentations(x, keys, aug_num, SIZE), x))(images)
    ours, ref = run(augment.extending_augmentations), run(reference_extending_augmentations)
    assert ours[0].shape == (aug_num * 2, SIZE, SIZE, 3)
    assert_close_to_reference(ours[0], ref[0], VALUE_ATOL)
    assert_close_to_reference(ours[1][0], ref[1][0], GRAD_RTOL * np.abs(np.asarray(ref[1][0])).max())


def test_single_copy_under_shard_map_vmap_and_grad():
    """aug_num=1 inside the sampler's transformations: jit of shard_map (one CPU device), jit of
    vmap, and the gradient through them; the result is the pooled images."""
    from jax.sharding import Mesh, PartitionSpec

    images = jnp.asarray(smooth_images(2, 16, seed=5))
    keys = jax.random.split(jax.random.key(1), 2)
    pooled = np.asarray(augment.adaptive_avg_pool(images, 14))

    def augment_one(images, keys):
        return augment.extending_augmentations(images, keys, aug_num=1, output_size=14)

    mesh = Mesh(np.asarray(jax.devices("cpu")[:1]), ("data",))  # as bdjax.parallel builds it
    sharded = jax.shard_map(augment_one, mesh=mesh, in_specs=(PartitionSpec("data"), PartitionSpec("data")),
                            out_specs=PartitionSpec("data"))
    np.testing.assert_array_equal(np.asarray(jax.jit(sharded)(images, keys)), pooled)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(sharded(x, keys) ** 2)))(images)
    assert grad.shape == images.shape and np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0

    batched = jax.jit(jax.vmap(augment_one))(images[:, None], keys[:, None])
    np.testing.assert_array_equal(np.asarray(batched)[:, 0], pooled)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(jax.vmap(augment_one)(x, keys[:, None]) ** 2)))(images[:, None])
    assert np.isfinite(np.asarray(grad)).all()
