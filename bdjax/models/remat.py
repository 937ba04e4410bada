"""Rematerialisation policies for the guidance gradient, shared by the UNet and CLIP.

The guidance gradient is taken through both networks; keeping every activation for the backward
pass is what limits the batch on an accelerator. A policy trades that memory for recomputation:
"none" keeps every activation, "dots" recomputes all but convolution and matmul outputs inside
each block, "blocks" keeps only each block's input and recomputes the block in the backward pass.
"""

from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,   # keep conv/matmul outputs, recompute the rest
    "blocks": jax.checkpoint_policies.nothing_saveable,
}


def block(cls, policy: str):
    """`cls` (a Linen module class) wrapped for `policy`; the parameters are unchanged."""
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {sorted(POLICIES)}")
    return cls if policy == "none" else nn.remat(cls, policy=POLICIES[policy])
