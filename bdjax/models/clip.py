"""OpenAI CLIP (ViT image tower + causal text transformer) as Flax Linen modules, NHWC.

Parameter paths mirror OpenAI's state-dict keys with each numeric index joined
to its parent by "_": `visual.transformer.resblocks.3.mlp.c_fc.weight` is
`visual/transformer/resblocks_3/mlp/c_fc/kernel` here, so conversion is a rename
plus a transpose (see checkpoints_convert/clip.py).

Precision follows the reference's fp16 mode: `dtype` is the activation dtype of
the residual stream, convolutions and matmuls; layer norms and the attention
softmax run in float32 and cast back, as OpenAI's `LayerNorm` subclass does.

    module, params = clip.load("weights/")
    image_embed = module.apply({"params": params}, images, method="encode_image")   # [0,1] NHWC
    text_embed = module.apply({"params": params}, tokenizer.tokenize(prompts), method="encode_text")
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bdjax import checkpoint
from bdjax.models import remat as remat_lib

CHECKPOINT_NAME = "clip"

# CLIP's image normalisation (OpenAI's preprocess), applied inside encode_image.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def preset(name: str) -> dict:
    """OpenAI's released ViT CLIPs by name ("vit_b16", "vit_b32", "vit_l14", and "vit_l14_336"
    for ViT-L/14@336px: an input resolution other than 224 is a suffix) -> CLIP fields.

    Both towers use 64-channel heads, as OpenAI's build_model assumes.
    """
    match = re.fullmatch(r"vit_([bl])(\d+)(?:_(\d+))?", name)
    if not match:
        raise ValueError(f"unknown CLIP preset {name!r}; known: vit_b16, vit_b32, vit_l14, vit_l14_336")
    size, patch, resolution = match.group(1), int(match.group(2)), int(match.group(3) or 224)
    vision_width, vision_layers = {"b": (768, 12), "l": (1024, 24)}[size]
    text_width = {"b": 512, "l": 768}[size]
    return dict(embed_dim=text_width, image_resolution=resolution, vision_layers=vision_layers,
                vision_width=vision_width, vision_patch_size=patch, vision_heads=vision_width // 64,
                context_length=77, vocab_size=49408, transformer_width=text_width,
                transformer_heads=text_width // 64, transformer_layers=12)


class LayerNorm(nn.Module):
    """LayerNorm (eps 1e-5) computed in float32 and cast back to the input dtype."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        y = x.astype(jnp.float32)
        y = y - y.mean(-1, keepdims=True)
        y = y * jax.lax.rsqrt((y * y).mean(-1, keepdims=True) + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention self-attention: one packed q,k,v projection, then out_proj."""

    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, length, width = x.shape
        qkv = nn.Dense(3 * width, dtype=self.dtype, name="in_proj")(x)
        q, k, v = (t.reshape(batch, length, self.heads, width // self.heads)
                   for t in jnp.split(qkv, 3, axis=-1))
        # Scales q.k by 1/sqrt(head_dim) and takes the softmax in float32.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out.reshape(batch, length, width))


def quick_gelu(x):
    """OpenAI's GELU approximation, which CLIP was trained with."""
    return x * jax.nn.sigmoid(1.702 * x)


class Mlp(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = quick_gelu(nn.Dense(4 * width, dtype=self.dtype, name="c_fc")(x))
        return nn.Dense(width, dtype=self.dtype, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        attn = MultiheadAttention(self.heads, self.causal, self.dtype, name="attn")
        x = x + attn(LayerNorm(name="ln_1")(x))
        return x + Mlp(self.dtype, name="mlp")(LayerNorm(name="ln_2")(x))


class Transformer(nn.Module):
    layers: int
    heads: int
    causal: bool = False
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        block = remat_lib.block(ResidualAttentionBlock, self.remat)
        for i in range(self.layers):
            x = block(self.heads, self.causal, self.dtype, name=f"resblocks_{i}")(x)
        return x


class PatchEmbedding(nn.Module):
    """The ViT's patch convolution (kernel = stride = patch, no bias, no padding) as one matmul of
    the flattened patches: the same sums (float32 results within ~1e-5 relative of the conv), and
    its input gradient is a matmul too rather than a strided transposed convolution, which XLA:CPU
    runs slowly. Parameter `kernel` [patch, patch, 3, width], as nn.Conv names and lays it out."""

    patch_size: int
    width: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, height, width, channels = x.shape
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, channels, self.width))
        patches = x.reshape(batch, height // p, p, width // p, p, channels).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), p * p * channels)  # row-major patches
        return patches.astype(self.dtype) @ kernel.reshape(p * p * channels, self.width).astype(self.dtype)


class VisionTransformer(nn.Module):
    """Patches -> [class token; patches] + positions -> ln_pre -> blocks -> ln_post(class) @ proj."""

    input_resolution: int
    patch_size: int
    width: int
    layers: int
    heads: int
    output_dim: int
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, x):
        grid = self.input_resolution // self.patch_size
        if x.shape[1:] != (self.input_resolution, self.input_resolution, 3):
            raise ValueError(f"CLIP image tower expects [batch, {self.input_resolution}, "
                             f"{self.input_resolution}, 3] images, got {x.shape}")
        scale = self.width ** -0.5
        x = PatchEmbedding(self.patch_size, self.width, dtype=self.dtype, name="conv1")(x.astype(self.dtype))
        class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
        positional_embedding = self.param("positional_embedding", nn.initializers.normal(scale),
                                          (grid * grid + 1, self.width))
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (x.shape[0], 1, self.width))
        x = jnp.concatenate([cls, x], axis=1) + positional_embedding.astype(self.dtype)
        x = LayerNorm(name="ln_pre")(x)
        x = Transformer(self.layers, self.heads, dtype=self.dtype, remat=self.remat, name="transformer")(x)
        x = LayerNorm(name="ln_post")(x[:, 0])
        proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))
        return x @ proj.astype(self.dtype)


class CLIP(nn.Module):
    """OpenAI's `clip.model.CLIP` with a ViT image tower; fields as in its constructor."""

    embed_dim: int
    image_resolution: int  # the side of the images encode_image takes (224 for ViT-B/16)
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    context_length: int
    vocab_size: int
    transformer_width: int
    transformer_heads: int
    transformer_layers: int
    dtype: Any = jnp.float32
    remat: str = "none"  # the image tower's blocks in the guidance gradient (bdjax/models/remat.py)

    def setup(self):
        self.visual = VisionTransformer(self.image_resolution, self.vision_patch_size, self.vision_width,
                                        self.vision_layers, self.vision_heads, self.embed_dim, self.dtype,
                                        self.remat)
        width = self.transformer_width
        self.token_embedding = nn.Embed(self.vocab_size, width, dtype=self.dtype,
                                        embedding_init=nn.initializers.normal(0.02))
        self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                               (self.context_length, width))
        self.transformer = Transformer(self.transformer_layers, self.transformer_heads, causal=True,
                                       dtype=self.dtype)
        self.ln_final = LayerNorm()
        self.text_projection = self.param("text_projection", nn.initializers.normal(width ** -0.5),
                                          (width, self.embed_dim))
        # Kept so the checkpoint round-trips completely; Blended Diffusion never uses it.
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(math.log(1 / 0.07)), ())

    def encode_image(self, images, normalize: bool = True):
        """[batch, R, R, 3] RGB in [0, 1] -> [batch, embed_dim] (not unit-normalised).

        normalize=False feeds the pixels as they are, as the reference's result ranking does.
        """
        if normalize:
            images = (images - jnp.asarray(MEAN)) / jnp.asarray(STD)
        return self.visual(images)

    def encode_text(self, tokens):
        """[batch, context_length] int token ids (tokenizer.tokenize) -> [batch, embed_dim]."""
        x = self.token_embedding(tokens) + self.positional_embedding[:tokens.shape[-1]].astype(self.dtype)
        x = self.ln_final(self.transformer(x))
        # Pool at the end-of-text token, which has the largest id in CLIP's vocabulary.
        x = x[jnp.arange(x.shape[0]), jnp.argmax(tokens, axis=-1)]
        return x @ self.text_projection.astype(self.dtype)

    def __call__(self, images, tokens):
        return self.encode_image(images), self.encode_text(tokens)


def spherical_distance(a, b):
    """d(a, b) = 2 arcsin(|a/|a| - b/|b|| / 2)^2, the reference's CLIP loss, over the last axis."""
    a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    return 2 * jnp.arcsin(jnp.linalg.norm(a - b, axis=-1) / 2) ** 2


def config_from_json(config: dict) -> dict:
    names = {f.name for f in dataclasses.fields(CLIP)} - {"parent", "name", "dtype", "remat"}
    if set(config) != names:
        raise ValueError(f"CLIP config fields {sorted(config)} differ from the module's {sorted(names)}")
    return dict(config)


def param_shapes(module: CLIP) -> dict:
    """The params tree of `module` as ShapeDtypeStructs (no computation, no memory)."""
    size = module.image_resolution
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, module.context_length), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), images, tokens)["params"]


def load(directory: str, dtype=jnp.float32, param_dtype=None, remat: str = "none", *,
         verify: bool = True) -> tuple[CLIP, dict]:
    """Read `clip.safetensors` + `clip.json` written by checkpoints_convert.clip.

    `dtype` is the activation dtype; `param_dtype` optionally casts the stored
    float32 parameters (e.g. to bfloat16); `verify=False` skips the digest check
    (see bdjax/checkpoint.py). No torch import.
    """
    def build(config: dict) -> CLIP:
        fields = config_from_json(config)
        checkpoint.check_fields(CLIP, fields)
        return CLIP(**fields, dtype=dtype, remat=remat)

    return checkpoint.load(directory, CHECKPOINT_NAME, model="clip", build=build, shapes=param_shapes,
                           param_dtype=param_dtype, verify=verify)
