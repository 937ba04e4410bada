"""OpenAI's ADM UNet (guided-diffusion `UNetModel`) as Flax Linen modules, NHWC.

Parameter paths mirror guided-diffusion's state-dict keys with each numeric
index joined to its parent by "_": `input_blocks.1.0.in_layers.2.weight` is
`input_blocks_1_0/in_layers_2/kernel` here, so conversion is a rename plus a
transpose (see checkpoints_convert/unet.py).

Precision follows the reference's `use_fp16` split: `dtype` is the activation
dtype of the torso's convolutions and attention projections; GroupNorm,
softmax, the timestep MLP and the output head run in float32.

`remat` trades compute for memory when the guidance gradient is taken through
the UNet (see bdjax/models/remat.py): its ResBlocks and attention blocks are
the units that are recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax import checkpoint
from bdjax.models import remat as remat_lib

CHECKPOINT_NAME = "unet"

REMAT_POLICIES = remat_lib.POLICIES

PRESETS = {
    # 256x256_diffusion_uncond.pt; attention at resolutions 32,16,8 = downsample rates 8,16,32.
    "adm256_uncond": dict(
        image_size=256, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
        attention_resolutions=(8, 16, 32), channel_mult=(1, 1, 2, 2, 4, 4), num_classes=None,
        num_heads=4, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False),
    # 512x512_diffusion.pt (class-conditional, ImageNet's 1000 classes).
    "adm512_cond": dict(
        image_size=512, in_channels=3, model_channels=256, out_channels=6, num_res_blocks=2,
        attention_resolutions=(16, 32, 64), channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_classes=1000,
        num_heads=4, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
        resblock_updown=True, use_new_attention_order=False),
}


def preset(name: str) -> dict:
    """The UNetModel fields of a named configuration."""
    if name not in PRESETS:
        raise ValueError(f"unknown UNet preset {name!r}; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] of (possibly fractional) timesteps, float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def group_norm(x, name: str):
    """GroupNorm32: 32 groups, eps 1e-5, computed in float32, returned in x's dtype."""
    y = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False,
                     name=name)(x.astype(jnp.float32))
    return y.astype(x.dtype)


def conv3x3(features: int, dtype, name: str, strides: int = 1):
    return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                   dtype=dtype, name=name)


def upsample_nearest(x):
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)


def avg_pool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (`conv`) when use_conv."""
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = upsample_nearest(x)
        if self.use_conv:
            x = conv3x3(x.shape[-1], self.dtype, "conv")(x)
        return x


class Downsample(nn.Module):
    """A stride-2 3x3 conv (`op`) when use_conv, else 2x2 average pooling."""
    use_conv: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            return conv3x3(x.shape[-1], self.dtype, "op", strides=2)(x)
        return avg_pool2(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding, optionally resampling."""
    out_channels: int
    use_scale_shift_norm: bool
    up: bool = False
    down: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, emb):
        h = nn.silu(group_norm(x, "in_layers_0"))
        # guided-diffusion resamples after the norm and before the conv, and resamples the skip too.
        if self.up:
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.down:
            h, x = avg_pool2(h), avg_pool2(x)
        h = conv3x3(self.out_channels, self.dtype, "in_layers_2")(h)

        emb_width = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        emb_out = nn.Dense(emb_width, dtype=jnp.float32, name="emb_layers_1")(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = group_norm(h, "out_layers_0") * (1 + scale) + shift
            h = nn.silu(h)
        else:
            h = nn.silu(group_norm(h + emb_out, "out_layers_0"))
        h = conv3x3(self.out_channels, self.dtype, "out_layers_3")(h)

        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip_connection")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Spatial self-attention. The legacy order (the released ADM weights) packs the qkv
    channels per head as [q_h; k_h; v_h]; the new order packs [q; k; v] over all heads."""
    num_heads: int = 1
    num_head_channels: int = -1
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        if self.num_head_channels == -1:
            heads = self.num_heads
        else:
            if c % self.num_head_channels:
                raise ValueError(f"{c} channels are not divisible by num_head_channels={self.num_head_channels}")
            heads = c // self.num_head_channels
        ch = c // heads
        tokens = group_norm(x, "norm").reshape(b, hgt * wid, c)
        qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(tokens)
        if self.use_new_attention_order:
            q, k, v = jnp.moveaxis(qkv.reshape(b, hgt * wid, 3, heads, ch), 2, 0)
        else:
            q, k, v = jnp.moveaxis(qkv.reshape(b, hgt * wid, heads, 3, ch), 3, 0)
        # Scale 1/sqrt(ch) = the reference's q and k each scaled by ch**-0.25; softmax in float32.
        a = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(ch))
        h = nn.Dense(c, dtype=self.dtype, name="proj_out")(a.reshape(b, hgt * wid, c))
        return x + h.reshape(b, hgt, wid, c)


class UNetModel(nn.Module):
    """guided-diffusion's UNetModel. Fields keep its names; `attention_resolutions` are
    downsample rates (as in UNetModel), not pixel resolutions (as in script_util)."""
    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    num_classes: int | None = None
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    def _block(self, cls):
        return remat_lib.block(cls, self.remat)

    def _res(self, name, out_channels, **kw):
        return self._block(ResBlock)(out_channels, self.use_scale_shift_norm, dtype=self.dtype, name=name, **kw)

    def _attn(self, name, num_heads):
        return self._block(AttentionBlock)(num_heads, self.num_head_channels, self.use_new_attention_order,
                                           dtype=self.dtype, name=name)

    @nn.compact
    def __call__(self, x, timesteps, y=None):
        """x: (B, H, W, in_channels) in [-1, 1]; timesteps: original float timesteps 0..999,
        shape (B,) or scalar; y: (B,) int class labels iff the model is class-conditional."""
        if self.dropout:
            raise ValueError("bdjax runs the UNet for inference only: dropout must be 0")
        if (y is None) != (self.num_classes is None):
            raise ValueError("pass class labels y if and only if the model is class-conditional "
                             f"(num_classes={self.num_classes})")
        batch = x.shape[0]
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
        emb = timestep_embedding(timesteps, self.model_channels)
        time_dim = 4 * self.model_channels
        emb = nn.Dense(time_dim, dtype=jnp.float32, name="time_embed_0")(emb)
        emb = nn.Dense(time_dim, dtype=jnp.float32, name="time_embed_2")(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes, time_dim, name="label_emb")(y)

        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        h = x.astype(self.dtype)
        h = conv3x3(int(self.channel_mult[0] * self.model_channels), self.dtype, "input_blocks_0_0")(h)
        hs = [h]
        block, ds = 1, 1
        for level, mult in enumerate(self.channel_mult):
            ch = int(mult * self.model_channels)
            for _ in range(self.num_res_blocks):
                h = self._res(f"input_blocks_{block}_0", ch)(h, emb)
                if ds in self.attention_resolutions:
                    h = self._attn(f"input_blocks_{block}_1", self.num_heads)(h)
                hs.append(h)
                block += 1
            if level != len(self.channel_mult) - 1:
                name = f"input_blocks_{block}_0"
                if self.resblock_updown:
                    h = self._res(name, ch, down=True)(h, emb)
                else:
                    h = Downsample(self.conv_resample, dtype=self.dtype, name=name)(h)
                hs.append(h)
                block += 1
                ds *= 2

        ch = h.shape[-1]
        h = self._res("middle_block_0", ch)(h, emb)
        h = self._attn("middle_block_1", self.num_heads)(h)
        h = self._res("middle_block_2", ch)(h, emb)

        block = 0
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            ch = int(mult * self.model_channels)
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = self._res(f"output_blocks_{block}_0", ch)(h, emb)
                layer = 1
                if ds in self.attention_resolutions:
                    h = self._attn(f"output_blocks_{block}_{layer}", heads_up)(h)
                    layer += 1
                if level and i == self.num_res_blocks:
                    name = f"output_blocks_{block}_{layer}"
                    if self.resblock_updown:
                        h = self._res(name, ch, up=True)(h, emb)
                    else:
                        h = Upsample(self.conv_resample, dtype=self.dtype, name=name)(h)
                    ds //= 2
                block += 1

        # The output head runs in float32, as in the reference's fp16 mode.
        h = nn.silu(group_norm(h.astype(jnp.float32), "out_0"))
        return conv3x3(self.out_channels, jnp.float32, "out_2")(h)


RUNTIME_FIELDS = ("dtype", "remat")  # how to run, not what the weights are: never stored


def config_to_json(module_fields: dict) -> dict:
    """UNetModel fields (no runtime choices) as JSON-friendly values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in module_fields.items()
            if k not in RUNTIME_FIELDS}


def config_from_json(config: dict) -> dict:
    names = {f.name for f in dataclasses.fields(UNetModel)} - {"parent", "name", *RUNTIME_FIELDS}
    unknown = set(config) - names
    if unknown:
        raise ValueError(f"unknown UNetModel field(s) {sorted(unknown)}; known: {sorted(names)}")
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}


def param_shapes(module: UNetModel, image_size: int | None = None) -> dict:
    """The params tree of `module` as ShapeDtypeStructs (no computation, no memory)."""
    size = image_size or module.image_size
    x = jax.ShapeDtypeStruct((1, size, size, module.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = None if module.num_classes is None else jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), x, t, y)["params"]


def load(directory: str, dtype=jnp.float32, param_dtype=None, remat: str = "none", *,
         image_size: int | None = None, verify: bool = True) -> tuple[UNetModel, dict]:
    """Read `unet.safetensors` + `unet.json` written by checkpoints_convert.unet.

    `dtype` is the activation dtype; `param_dtype` optionally casts the stored
    float32 parameters (e.g. to bfloat16); `remat` as in the module. A UNet made
    for another `image_size` than the one given is refused; `verify=False` skips
    the digest check (see bdjax/checkpoint.py). No torch import.
    """
    def build(config: dict) -> UNetModel:
        fields = config_from_json(config)
        checkpoint.check_fields(UNetModel, fields)
        return UNetModel(**fields, dtype=dtype, remat=remat)

    def check(module: UNetModel, config_path: str) -> None:
        if image_size is not None and module.image_size != image_size:
            got, preset_name = module.image_size, "adm256_uncond" if image_size == 256 else "adm512_cond"
            raise checkpoint.CheckpointError(
                config_path, f"holds a UNet for {got}x{got} images, but the run asks for {image_size}x{image_size} "
                f"(--model_output_size={image_size})", f"use weights converted for {image_size}x{image_size} "
                f"(python -m checkpoints_convert.unet --preset={preset_name} ...), or run at the size these are for")

    return checkpoint.load(directory, CHECKPOINT_NAME, model="unet", build=build, shapes=param_shapes,
                           param_dtype=param_dtype, verify=verify, check=check)
