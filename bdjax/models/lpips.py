"""LPIPS v0.1 with the VGG16 trunk (Zhang et al., CVPR 2018), as used by the lpips package.

d(x0, x1) = sum over the five VGG16 taps l of mean_{h,w} lin_l((f0_l - f1_l)^2), where f_l is
the tap's activation unit-normalised over channels and lin_l a 1x1 convolution to one channel
with non-negative learned weights and no bias. Inputs are NHWC in [-1, 1].

Names mirror the PyTorch modules so that conversion is a rename and a transpose: the trunk is
`net` with torchvision's `features.N` convolutions as `features_N`, the heads are `lin0`..`lin4`
(lpips' `linK.model.1`, the index 1 coming from a dropout layer that is a no-op at inference).
Convert weights with `python -m checkpoints_convert.lpips`; `load()` reads them without torch.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bdjax import checkpoint

CHECKPOINT_NAME = "lpips"
# Written into lpips.json by the converter; load() refuses anything else.
CONFIG = {"net": "vgg16", "version": "0.1"}

# lpips ScalingLayer: moves [-1, 1] inputs to the ImageNet statistics the trunk was trained on.
# Rounded to float32 as in lpips' buffers, so a float64 run sees the reference's exact constants.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# torchvision vgg16().features indices of the 3x3 convolutions, grouped by the LPIPS slice whose
# last ReLU is tapped (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3); a 2x2 max-pool precedes
# every slice but the first. The trunk's final pool (index 30) feeds no tap and is left out.
VGG16_SLICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
VGG16_CHANNELS = (64, 128, 256, 512, 512)


def accumulation_dtype(dtype):
    """float32 for float32 and bfloat16 activations; float64 stays float64 (parity tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def normalize_tensor(x: jax.Array, eps: float = 1e-10) -> jax.Array:
    """lpips.normalize_tensor: divide by the channel L2 norm (+eps, outside the sqrt, as there)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / (norm + eps)


class VGG16Features(nn.Module):
    """torchvision VGG16 `features` up to relu5_3; returns the five LPIPS taps (NHWC)."""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x) -> tuple[jax.Array, ...]:
        # Low-precision convolutions still accumulate and add their bias in float32.
        conv = functools.partial(jax.lax.conv_general_dilated,
                                 preferred_element_type=accumulation_dtype(self.dtype))
        x = x.astype(self.dtype)
        taps = []
        for k, (indices, channels) in enumerate(zip(VGG16_SLICES, VGG16_CHANNELS)):
            if k > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # torchvision MaxPool2d(2, 2), floor mode
            for i in indices:
                x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                            conv_general_dilated=conv, name=f"features_{i}")(x)
                x = nn.relu(x).astype(self.dtype)
            taps.append(x)
        return tuple(taps)


class LPIPS(nn.Module):
    """lpips.LPIPS(net="vgg", version="0.1"): one distance per image pair, shape (B,).

    `dtype` is the trunk's activation dtype; normalisation, heads and averages run in
    `accumulation_dtype(dtype)`, float32 unless dtype is float64. With bfloat16 the distances stay
    within 1e-2 of float32 but the input gradients move by about 15% (L2): use float32 where the
    gradient steers sampling and precision matters.
    `features` and `distance` split the call, so that the features of an image compared at every
    step (the init image of the background loss) are computed once.
    Per-tap distances are sown into the "intermediates" collection as `res` for probing.
    """
    dtype: Any = jnp.float32

    def setup(self):
        self.net = VGG16Features(dtype=self.dtype)
        for kk in range(len(VGG16_CHANNELS)):
            setattr(self, f"lin{kk}", nn.Conv(1, (1, 1), use_bias=False, dtype=accumulation_dtype(self.dtype)))

    def __call__(self, in0, in1) -> jax.Array:
        batch = in0.shape[0]
        feats = self.features(jnp.concatenate([in0, in1]))  # both images as one trunk batch
        return self.distance(tuple(f[:batch] for f in feats), tuple(f[batch:] for f in feats))

    def features(self, images) -> tuple[jax.Array, ...]:
        """The five channel-normalised VGG taps of images in [-1, 1] (NHWC)."""
        acc = accumulation_dtype(self.dtype)
        x = (images.astype(acc) - jnp.asarray(SHIFT, acc)) / jnp.asarray(SCALE, acc)
        return tuple(normalize_tensor(out.astype(acc)) for out in self.net(x))

    def distance(self, feats0, feats1) -> jax.Array:
        """LPIPS between two images given by their `features`; a batch of 1 broadcasts."""
        val = 0.0
        for kk, (feat0, feat1) in enumerate(zip(feats0, feats1)):
            diff = jnp.square(feat0 - feat1)
            res = jnp.mean(getattr(self, f"lin{kk}")(diff), axis=(1, 2, 3))  # spatial average
            self.sow("intermediates", "res", res)
            val = val + res
        return val


def param_shapes(module: LPIPS, image_size: int = 64) -> dict:
    """The params tree of `module` as ShapeDtypeStructs (no computation, no memory)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(module.init, jax.random.key(0), x, x)["params"]


def load(directory: str, dtype=jnp.float32, param_dtype=None, *, verify: bool = True) -> tuple[LPIPS, dict]:
    """Read `lpips.safetensors` + `lpips.json` written by checkpoints_convert.lpips.

    `dtype` is the trunk's activation dtype; `param_dtype` optionally casts the stored float32
    parameters; `verify=False` skips the digest check (see bdjax/checkpoint.py). No torch import.
    """
    def build(config: dict) -> LPIPS:
        if config != CONFIG:
            raise ValueError(f"expected LPIPS config {CONFIG}, got {config}")
        return LPIPS(dtype=dtype)

    return checkpoint.load(directory, CHECKPOINT_NAME, model="lpips", build=build, shapes=param_shapes,
                           param_dtype=param_dtype, verify=verify)
