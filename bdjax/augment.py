"""Extending augmentations of Blended Diffusion, as pure JAX functions on NHWC images.

The reference (`ImageAugmentations` in omriav/blended-diffusion) pools each 256 image to CLIP's
input resolution (224 for ViT-B/16) with `torch.nn.AdaptiveAvgPool2d`, tiles `aug_num` copies in
the order [all B samples] x aug_num, keeps the first B copies as they are and passes the others
through kornia's `RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border")` followed
by `RandomPerspective(0.7, p=0.7)` (two separate resamplings, the second of the first's output).

What kornia 0.9.0 does there, reproduced here:
- RandomAffine, `translate=0.1` given as a float: kornia reads a scalar as the range
  [-0.1, 0.1] clamped below at 0, i.e. (0.0, 0.1), and then uses its first entry as the
  horizontal limit and its second as the vertical one. The shift is therefore
  (0, U(-0.1, 0.1) * H): vertical only. Rotation U(-15, 15) degrees about the centre
  ((W - 1) / 2, (H - 1) / 2); scale 1 and shear 0. The source->destination pixel matrix is
  [[cos a, -sin a, cx - cx cos a + cy sin a + tx], [sin a, cos a, cy - cx sin a - cy cos a + ty]]
  (a positive angle turns the picture clockwise as displayed).
- RandomPerspective(distortion_scale=0.7): start points are the pixel-centre corners
  (0, 0), (W-1, 0), (W-1, H-1), (0, H-1); each corner moves inward by U(0, 1) * 0.35 * (W, H),
  one independent draw per corner and axis (0.35 = distortion_scale / 2, times W and H, not
  W-1 and H-1). The matrix maps start points to end points, normalised to m22 = 1.
- warp_affine / warp_perspective with align_corners=False and output size = input size: the
  normalisation to [-1, 1] and grid_sample's unnormalisation cancel, so output pixel (x, y) takes
  the bilinear sample of the input at M^-1 (x, y, 1) in pixel coordinates, pixel centres at
  integers. Border padding clamps that point to [0, W-1] x [0, H-1]; zero padding gives
  each bilinear tap outside the image weight 0. Affine uses border, perspective zeros; on
  [-1, 1] data zero padding is mid-grey.
- Each transform is applied per copy with an independent Bernoulli(0.7) (kornia draws
  `rand < p` per sample, computes the warp for every sample and selects).

Differences from kornia that remain:
- Random streams: parameters come from `jax.random`, so the draws follow the same distributions
  but are not the same numbers as torch's. Tests inject kornia's own parameters to compare pixels.
- Float rounding: we map coordinates in pixel space, kornia in normalised space; both carry
  ~5e-5 px of float32 rounding. On uniform [-1, 1] noise at 224 x 224 (slope up to 2 per pixel)
  our float32 warps differ from kornia's float32 by at most 1.6e-4 (mean 8e-6), while kornia
  float32 is itself up to 1e-4 from kornia float64; on smooth images the whole augmented batch
  agrees within 1e-4. In float64 (jax x64) the warps agree with kornia's to 1e-8.
- Against the kornia the authors ran (2021 releases, before kornia's fix of its issue #3904 in
  PR #3945; derived from those reports, not run here): those releases normalised matrices with
  the corner-aligned convention while grid_sample used align_corners=False. With
  S(p) = c + (p - c) * W / (W - 1), a scaling about the centre c by 224/223, their affine warp
  sampled S(M^-1(S^-1(x))): rotations about the centre unchanged, translations 224/223 times
  larger (at most 0.1 px more). Their perspective warp (corner-aligned output grid as well)
  sampled S(M^-1(x)): the picture shrunk by 223/224 about the centre on top of the
  perspective (at most 0.5 px at the border). We follow kornia 0.9.0, as installed for the tests.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The reference's ImageAugmentations settings.
DEGREES = 15.0
TRANSLATE = 0.1
DISTORTION_SCALE = 0.7
P = 0.7
PADDINGS = ("border", "zeros")


# ----------------------------------------------------------------------------- pooling

@functools.lru_cache(maxsize=None)
def _pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix of torch's adaptive pooling: row i averages floor(i*in/out)..ceil((i+1)*in/out)."""
    matrix = np.zeros((out_size, in_size), np.float64)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def adaptive_avg_pool(x: jax.Array, out_size: int | tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d on NHWC (or HWC) images; out_size is S or (S_h, S_w)."""
    out_h, out_w = (out_size, out_size) if isinstance(out_size, int) else out_size
    in_h, in_w = x.shape[-3], x.shape[-2]
    dtype = jnp.result_type(x.dtype, jnp.float32)
    rows = jnp.asarray(_pool_matrix(in_h, out_h), dtype)
    cols = jnp.asarray(_pool_matrix(in_w, out_w), dtype)
    # HIGHEST: on GPU a default-precision float32 einsum may run in TF32 and lose ~3 digits.
    pooled = jnp.einsum("oh,...hwc->...owc", rows, x.astype(dtype), precision=jax.lax.Precision.HIGHEST)
    pooled = jnp.einsum("pw,...owc->...opc", cols, pooled, precision=jax.lax.Precision.HIGHEST)
    return pooled.astype(x.dtype)


# ----------------------------------------------------------------------------- warps

def _invert_3x3(matrix: jax.Array) -> jax.Array:
    """Closed-form inverse: column j is row_{j+1} x row_{j+2} / det (elementwise, no LAPACK, no TF32)."""
    r0, r1, r2 = matrix[0], matrix[1], matrix[2]
    adjugate = jnp.stack([jnp.cross(r1, r2), jnp.cross(r2, r0), jnp.cross(r0, r1)], axis=1)
    return adjugate / jnp.dot(r0, jnp.cross(r1, r2), precision=jax.lax.Precision.HIGHEST)


def _to_planes(image: jax.Array) -> jax.Array:
    """(..., H, W, C) images -> (C, count * H * W): one flat plane per channel, images one after another."""
    return jnp.moveaxis(image.reshape(-1, image.shape[-1]), -1, 0)


def _from_planes(planes: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of _to_planes for images of `shape` (..., H, W, C)."""
    return jnp.moveaxis(planes, 0, -1).reshape(shape)


def _sample_planes(planes: jax.Array, x: jax.Array, y: jax.Array, padding: str, height: int,
                   width: int) -> jax.Array:
    """grid_sample(bilinear, align_corners=False) of a channel-major stack at pixel coordinates.

    planes: (C, count * H * W), see _to_planes; x, y: (count, P), point [k, p] samples image k.
    Returns (C, count, P). Each bilinear tap is one gather along the flat pixel axis whose slices
    are the C values of one pixel, and its gradient one scatter-add of such slices. With the
    channels as the minor axis (NHWC), each slice would be 3 floats of a minor dimension, which
    XLA:TPU pads to a whole lane tile per gathered pixel.
    """
    count = x.shape[0]
    if padding == "border":
        x = jnp.clip(x, 0.0, width - 1.0)
        y = jnp.clip(y, 0.0, height - 1.0)
    elif padding != "zeros":
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    dtype = jnp.result_type(planes.dtype, x.dtype)
    if count == 0:  # e.g. aug_num=1: no augmented copies
        return jnp.zeros((planes.shape[0],) + x.shape, dtype)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    x1, y1 = x0 + 1.0, y0 + 1.0
    first = (jnp.arange(count, dtype=jnp.int32) * (height * width))[:, None]
    out = jnp.zeros((planes.shape[0],) + x.shape, dtype)
    for yi, wy in ((y0, y1 - y), (y1, y - y0)):
        for xi, wx in ((x0, x1 - x), (x1, x - x0)):
            inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
            # The weight, not the gathered value, is zeroed, so a non-finite coordinate (a point
            # behind the perspective's horizon) gives 0 and no NaN in the images' gradient.
            weight = jnp.where(inside, wx * wy, 0.0)
            index = first + (jnp.clip(yi, 0, height - 1).astype(jnp.int32) * width
                             + jnp.clip(xi, 0, width - 1).astype(jnp.int32))
            out = out + jnp.take(planes, index, axis=1, mode="clip") * weight
    return out


def _bilinear_sample(image: jax.Array, x: jax.Array, y: jax.Array, padding: str) -> jax.Array:
    """grid_sample(bilinear, align_corners=False) at pixel coordinates (x, y) of (..., H, W, C) images.

    x and y are (..., H_out, W_out) with the image's leading dims: point [..., i, j] samples image
    [...].
    """
    *lead, height, width, channels = image.shape
    count = int(np.prod(lead, dtype=np.int64))
    out = _sample_planes(_to_planes(image), x.reshape(count, -1), y.reshape(count, -1), padding, height, width)
    return _from_planes(out, x.shape + (channels,)).astype(image.dtype)


def _source_points(matrix: jax.Array, height: int, width: int) -> jax.Array:
    """Homogeneous source points (..., H, W, 3) that every output pixel samples: M^-1 (x, y, 1),
    for matrices (..., 3, 3).

    One matmul, so XLA materialises the points once. Computed elementwise, they would be
    recomputed inside each consumer fusion with different FMA contraction, and points an ulp
    apart on either side of an integer would make the gather and the bilinear weights pick
    different pixels (a whole-pixel error). HIGHEST keeps accelerators from using TF32.
    """
    dtype = jnp.result_type(matrix.dtype, jnp.float32)  # float64 under jax x64 with a float64 matrix
    inverse = jnp.vectorize(_invert_3x3, signature="(3,3)->(3,3)")(matrix.astype(dtype))
    y, x = jnp.meshgrid(jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype), indexing="ij")
    pixels = jnp.stack([x, y, jnp.ones_like(x)], axis=-1)
    return jnp.einsum("hwj,...ij->...hwi", pixels, inverse, precision=jax.lax.Precision.HIGHEST)


def _affine_points(matrix: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Source pixel coordinates (x, y), each (..., H, W), of an affine warp by (..., 2|3, 3) matrices."""
    matrix = jnp.asarray(matrix)
    last_row = jnp.broadcast_to(jnp.array([0, 0, 1], matrix.dtype), matrix.shape[:-2] + (1, 3))
    points = _source_points(jnp.concatenate([matrix[..., :2, :], last_row], axis=-2), height, width)
    return points[..., 0], points[..., 1]


def _perspective_points(matrix: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Source pixel coordinates (x, y), each (..., H, W), of a perspective warp by (..., 3, 3) matrices."""
    points = _source_points(jnp.asarray(matrix), height, width)
    return points[..., 0] / points[..., 2], points[..., 1] / points[..., 2]


def warp_affine(image: jax.Array, matrix: jax.Array, padding: str = "border") -> jax.Array:
    """kornia.geometry.transform.warp_affine(align_corners=False, bilinear) of (..., H, W, C) images.

    matrix: (..., 2, 3) or (..., 3, 3) source->destination pixel matrices, as kornia takes them,
    one per image; the output keeps the input size. padding: "border" or "zeros".
    """
    height, width = image.shape[-3:-1]
    return _bilinear_sample(image, *_affine_points(matrix, height, width), padding)


def warp_perspective(image: jax.Array, matrix: jax.Array, padding: str = "zeros") -> jax.Array:
    """kornia.geometry.transform.warp_perspective(align_corners=False, bilinear) of (..., H, W, C) images.

    matrix: (..., 3, 3) source->destination pixel homographies, one per image; the output keeps
    the input size.
    """
    height, width = image.shape[-3:-1]
    return _bilinear_sample(image, *_perspective_points(matrix, height, width), padding)


# ----------------------------------------------------------------------------- transform matrices

def affine_matrix(angle: jax.Array, translation: jax.Array, height: int, width: int) -> jax.Array:
    """kornia's RandomAffine matrix (3, 3): rotate by `angle` degrees about the centre, then shift by (tx, ty) px."""
    cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
    radians = jnp.deg2rad(jnp.asarray(angle))
    cos, sin = jnp.cos(radians), jnp.sin(radians)
    return jnp.stack([
        jnp.stack([cos, -sin, cx - cos * cx + sin * cy + translation[0]]),
        jnp.stack([sin, cos, cy - sin * cx - cos * cy + translation[1]]),
        jnp.array([0.0, 0.0, 1.0], cos.dtype),
    ]).astype(cos.dtype)


def _square_to_quad(points: jax.Array) -> jax.Array:
    """Homography taking the unit square's corners (0,0), (1,0), (1,1), (0,1) to `points` (Heckbert 1989)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    dx1, dx2, sx = x1 - x2, x3 - x2, x0 - x1 + x2 - x3
    dy1, dy2, sy = y1 - y2, y3 - y2, y0 - y1 + y2 - y3
    denominator = dx1 * dy2 - dy1 * dx2
    g = (sx * dy2 - sy * dx2) / denominator
    h = (dx1 * sy - dy1 * sx) / denominator
    return jnp.stack([
        jnp.stack([x1 - x0 + g * x1, x3 - x0 + h * x3, x0]),
        jnp.stack([y1 - y0 + g * y1, y3 - y0 + h * y3, y0]),
        jnp.stack([g, h, jnp.ones_like(g)]),
    ])


def perspective_matrix(start_points: jax.Array, end_points: jax.Array) -> jax.Array:
    """The (3, 3) homography taking four (x, y) start points to four end points, with m22 = 1
    (what kornia.geometry.transform.get_perspective_transform returns)."""
    start_points, end_points = jnp.asarray(start_points), jnp.asarray(end_points)
    dtype = jnp.result_type(start_points.dtype, end_points.dtype, jnp.float32)
    start_points, end_points = start_points.astype(dtype), end_points.astype(dtype)
    matrix = jnp.matmul(_square_to_quad(end_points), _invert_3x3(_square_to_quad(start_points)),
                        precision=jax.lax.Precision.HIGHEST)
    return matrix / matrix[2, 2]


# ----------------------------------------------------------------------------- parameter samplers

def sample_affine_params(key: jax.Array, height: int, width: int, degrees: float = DEGREES,
                         translate: float = TRANSLATE, symmetric_translation: bool = False):
    """RandomAffine's draws: (angle in degrees U(-degrees, degrees), translation (tx, ty) in px).

    By default tx = 0 and ty = U(-translate, translate) * H, the reference's vertical-only quirk.
    symmetric_translation=True gives tx = U(-translate, translate) * W as well, which is what
    kornia's docs promise for translate=(a, a); ty is the same draw in both modes.
    """
    angle_key, translate_key = jax.random.split(key)
    angle = jax.random.uniform(angle_key, (), jnp.float32, -degrees, degrees)
    translation = jax.random.uniform(translate_key, (2,), jnp.float32, -translate, translate)
    translation = translation * jnp.array([width, height], jnp.float32)
    if not symmetric_translation:
        # Reproduced on purpose: kornia reads the scalar translate=0.1 as limits (x 0.0, y 0.1).
        translation = translation.at[0].set(0.0)
    return angle, translation


def sample_perspective_points(key: jax.Array, height: int, width: int,
                              distortion_scale: float = DISTORTION_SCALE):
    """RandomPerspective's draws: the corner start points (4, 2) and end points moved inward by
    U(0, 1) * distortion_scale / 2 * (W, H), independently per corner and axis."""
    start_points = jnp.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], jnp.float32)
    inward = jnp.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], jnp.float32)
    largest_offset = distortion_scale * jnp.array([width, height], jnp.float32) / 2
    end_points = start_points + largest_offset * jax.random.uniform(key, (4, 2), jnp.float32) * inward
    return start_points, end_points


class AugmentationParams(NamedTuple):
    """The transform of one augmented copy; the matrices map source to destination pixels."""
    affine_matrix: jax.Array       # (3, 3), kornia's RandomAffine.transform_matrix
    perspective_matrix: jax.Array  # (3, 3), kornia's RandomPerspective.transform_matrix
    apply_affine: jax.Array        # () bool
    apply_perspective: jax.Array   # () bool


def sample_augmentation_params(key: jax.Array, height: int, width: int, p: float = P,
                               symmetric_translation: bool = False) -> AugmentationParams:
    """Draw one copy's affine and perspective transforms and, independently, whether each applies."""
    affine_key, perspective_key, apply_affine_key, apply_perspective_key = jax.random.split(key, 4)
    angle, translation = sample_affine_params(affine_key, height, width,
                                              symmetric_translation=symmetric_translation)
    start_points, end_points = sample_perspective_points(perspective_key, height, width)
    return AugmentationParams(
        affine_matrix=affine_matrix(angle, translation, height, width),
        perspective_matrix=perspective_matrix(start_points, end_points),
        apply_affine=jax.random.bernoulli(apply_affine_key, p),
        apply_perspective=jax.random.bernoulli(apply_perspective_key, p),
    )


# ----------------------------------------------------------------------------- the augmentations

def augment_copy(image: jax.Array, params: AugmentationParams) -> jax.Array:
    """One augmented copy of each (..., H, W, C) image: affine (border) then perspective (zeros) of
    its output; `params` fields have the images' leading dims."""
    *_, height, width, _ = image.shape
    return _from_planes(_augment_planes(_to_planes(image), params, height, width), image.shape)


def _augment_planes(planes: jax.Array, params: AugmentationParams, height: int, width: int,
                    unroll_warps: bool = False) -> jax.Array:
    """augment_copy of a channel-major stack (C, count * H * W), see _to_planes.

    The stack stays channel-major from the first warp to the second, and the two warps are the
    two iterations of a loop. Written one after the other, XLA fuses the affine warp into the
    perspective's gathers and recomputes it for each of their four taps (an optimization barrier
    does not stop XLA:CPU from doing so); a loop iteration's input is materialised.
    `unroll_warps` writes the two iterations out instead (the same values): XLA's cost analysis
    counts a loop body once whatever its trip count, so a program meant for counting the work
    (bench/compile_report.py) must have no loop.
    """
    count = int(np.prod(params.apply_affine.shape, dtype=np.int64))
    if count == 0:  # an empty stack: nothing to warp (a loop over it breaks under shard_map)
        return planes

    def warp(planes, points, apply, padding):
        x, y = (coordinate.reshape(count, -1) for coordinate in points)
        sampled = _sample_planes(planes, x, y, padding, height, width)  # (C, count, H * W)
        kept = jnp.where(jnp.reshape(apply, (1, count, 1)), sampled, planes.reshape(sampled.shape))
        return kept.reshape(planes.shape).astype(planes.dtype)

    def affine(planes):
        return warp(planes, _affine_points(params.affine_matrix, height, width), params.apply_affine, "border")

    def perspective(planes):
        return warp(planes, _perspective_points(params.perspective_matrix, height, width),
                    params.apply_perspective, "zeros")

    def step(planes, which):
        return jax.lax.switch(which, (affine, perspective), planes), None

    return jax.lax.scan(step, planes, jnp.arange(2), unroll=unroll_warps)[0]


def sample_extending_params(keys: jax.Array, aug_num: int, output_size: int, p: float = P,
                            symmetric_translation: bool = False) -> AugmentationParams:
    """The transforms of copies 1..aug_num-1 of every sample, each field with leading axes (B, aug_num - 1).

    keys: (B,) per-sample PRNG keys (typed, or raw uint32 of shape (B, 2)). Copy a of sample b
    uses fold_in(keys[b], a) only, so it depends neither on the batch nor on aug_num.
    """
    copies = jnp.arange(1, aug_num)

    def sample_copies(key):
        return jax.vmap(lambda copy: sample_augmentation_params(
            jax.random.fold_in(key, copy), output_size, output_size, p, symmetric_translation))(copies)

    return jax.vmap(sample_copies)(keys)


def apply_extending_augmentations(images: jax.Array, params: AugmentationParams, output_size: int,
                                  unroll_warps: bool = False) -> jax.Array:
    """Pool (B, H, W, C) images to output_size and stack the unaugmented copy with the copies that
    `params` (leading axes (B, aug_num - 1)) describe, in the reference's order [B samples] x aug_num:
    row a * B + b is copy a of sample b, and rows 0..B-1 are the pooled images unchanged.
    `unroll_warps`: the warps without a loop, for counting the work (see _augment_planes)."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    batch = images.shape[0]
    if params.apply_affine.ndim != 2 or params.apply_affine.shape[0] != batch:
        raise ValueError(f"params must have leading axes (B={batch}, aug_num - 1), "
                         f"got {params.apply_affine.shape}")
    pooled = adaptive_avg_pool(images, output_size)
    if params.apply_affine.shape[1] == 0:  # aug_num=1: the pooled images are the whole batch
        return pooled
    # The copies are tiled channel-major from the pooled images and transposed back once, in the
    # output's order.
    height, width, channels = pooled.shape[1:]
    planes_shape = (channels, batch, params.apply_affine.shape[1], height, width)
    planes = jnp.broadcast_to(jnp.moveaxis(pooled, -1, 0)[:, :, None], planes_shape).reshape(channels, -1)
    planes = _augment_planes(planes, params, height, width, unroll_warps).reshape(planes_shape)
    copies_first = jnp.concatenate([pooled[None], jnp.transpose(planes, (2, 1, 3, 4, 0))])  # (aug_num, B, S, S, C)
    return copies_first.reshape((-1,) + pooled.shape[1:])


def extending_augmentations(images: jax.Array, keys: jax.Array, aug_num: int, output_size: int,
                            p: float = P, symmetric_translation: bool = False,
                            unroll_warps: bool = False) -> jax.Array:
    """The reference's ImageAugmentations on (B, H, W, C) images in [-1, 1], with one PRNG key per sample.
    output_size is CLIP's input resolution (`image_resolution`).

    Returns (aug_num * B, output_size, output_size, C): row a * B + b is copy a of sample b;
    copy 0 is the pooled image, copies 1..aug_num-1 are augmented (see sample_extending_params).
    `unroll_warps` gives the same values from a program without a loop, for counting its work.
    """
    if keys.shape[0] != images.shape[0]:
        raise ValueError(f"need one key per sample: {images.shape[0]} images, keys of shape {keys.shape}")
    if aug_num < 1:
        raise ValueError(f"aug_num must be at least 1, got {aug_num}")
    params = sample_extending_params(keys, aug_num, output_size, p, symmetric_translation)
    return apply_extending_augmentations(images, params, output_size, unroll_warps)
