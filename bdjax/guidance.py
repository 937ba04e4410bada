"""The guidance loss of Blended Diffusion and its gradient through the UNet.

Step 2 of the reference's guided step: the loss is evaluated on
x_in = pred_xstart * fac + x * (1 - fac), fac = sqrt(1 - alpha_bar_i), where pred_xstart comes
from the UNet at (x, i), and the gradient is taken with respect to x THROUGH the UNet. The
reference runs the UNet twice per step (a no-grad pass for the step, a second pass inside the
gradient); here one `jax.vjp` gives the step's mean, variance and pred_xstart together with the
gradient. The loss is a weighted sum of the terms in `TERMS`, each weighted and switched on by
options named there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bdjax.models.clip import spherical_distance
from bdjax.options import EditOptions


def range_loss(x):
    """Mean over H, W, C of the squared distance to [-1, 1]; one value per sample."""
    return jnp.mean(jnp.square(x - jnp.clip(x, -1, 1)), axis=(1, 2, 3))


def clip_loss(image_embeds, text_embed, batch: int):
    """Sum over samples of the mean spherical distance over each sample's augmented copies.

    `image_embeds` are in the augmentation order [batch samples] x aug_num; `text_embed` is
    [batch, D] (each sample's prompt) or [D].
    """
    copies = image_embeds.shape[0] // batch
    text = jnp.broadcast_to(text_embed, (batch, image_embeds.shape[-1]))
    dists = spherical_distance(image_embeds.astype(jnp.float32), jnp.tile(text, (copies, 1)).astype(jnp.float32))
    return jnp.sum(jnp.mean(dists.reshape(copies, batch), axis=0))


@dataclasses.dataclass
class LossInputs:
    """What a guidance term may look at. x_in = pred_xstart * fac + x * (1 - fac) is the image
    the reference's losses see; `networks` maps a network's name to its callable (see `TERMS`)."""
    pred_xstart: Any
    x_in: Any
    mask: Any
    init: Any
    text_embed: Any
    augment: Callable
    networks: dict[str, Callable]

    @functools.cached_property
    def background(self):
        """x_in outside the mask (both background terms use it)."""
        return self.x_in * (1 - self.mask)


def _clip_term(inputs: LossInputs, options: EditOptions) -> jax.Array:
    copies = inputs.augment(inputs.x_in * inputs.mask)
    embeds = inputs.networks["clip"]((copies + 1) / 2)
    return clip_loss(embeds, inputs.text_embed, inputs.x_in.shape[0])


def _range_term(inputs: LossInputs, options: EditOptions) -> jax.Array:
    return jnp.sum(range_loss(inputs.pred_xstart))


def _lpips_term(inputs: LossInputs, options: EditOptions) -> jax.Array:
    return jnp.sum(inputs.networks["lpips"](inputs.background))


def _l2_term(inputs: LossInputs, options: EditOptions) -> jax.Array:
    # The reference's mse_loss averages over its whole batch of `batch_size` samples, so its
    # per-sample L2 weight is l2_sim_lambda / batch_size. Keeping that divisor the option (not the
    # device batch) reproduces it while a sample's result stays batch-independent; with
    # batch_size="auto" the divisor is the default batch of 4 (EditOptions.nominal_batch), so that
    # results do not depend on the device's memory either.
    per_sample = jnp.mean(jnp.square(inputs.background - inputs.init), axis=(1, 2, 3))
    return jnp.sum(per_sample) / options.nominal_batch


@dataclasses.dataclass(frozen=True)
class Term:
    """One guidance loss term: `loss(inputs, options)` (unweighted, summed over the batch) times
    the option named `weight`, reported as `name`. It is on when that weight is non-zero and the
    bool option named `switch` (if any) is set; `networks` names the networks it calls."""
    name: str
    weight: str
    loss: Callable[[LossInputs, EditOptions], jax.Array]
    networks: tuple[str, ...] = ()
    switch: str | None = None

    def is_on(self, options: EditOptions) -> bool:
        return bool(getattr(options, self.weight)) and (self.switch is None or bool(getattr(options, self.switch)))


# The terms in the order they are summed (the reference's order).
TERMS = (
    Term("clip_loss", "clip_guidance_lambda", _clip_term, networks=("clip",)),
    Term("range_loss", "range_lambda", _range_term),
    Term("lpips_loss", "lpips_sim_lambda", _lpips_term, networks=("lpips",), switch="background_preservation_loss"),
    Term("l2_loss", "l2_sim_lambda", _l2_term, switch="background_preservation_loss"),
)


def active_terms(options: EditOptions) -> tuple[Term, ...]:
    """The terms `options` switches on, in summation order."""
    return tuple(term for term in TERMS if term.is_on(options))


def needs_lpips(options: EditOptions) -> bool:
    """Whether a run with these options needs the LPIPS network."""
    return any("lpips" in term.networks for term in active_terms(options))


def guidance_loss(pred_xstart, x, fac, *, mask, init, text_embed, augment: Callable,
                  networks: dict[str, Callable], options: EditOptions):
    """The scalar guidance loss (step 2 of a guided step) for a batch, and its weighted terms for
    reporting; weights and switches are read from `options` (an EditOptions).

    augment: [B,H,W,C] in [-1,1] -> [aug_num*B, R, R, C] in [-1,1] (copies of each sample), R
    CLIP's input resolution (its `image_resolution`, 224 for ViT-B/16).
    networks["clip"]: [N,R,R,C] in [0,1] -> CLIP embeddings (CLIP normalisation inside).
    networks["lpips"]: background [B,H,W,C] in [-1,1] -> per-sample LPIPS distance to the init
    image (whose features the caller computes once); needed only when a term using it is on.
    """
    inputs = LossInputs(pred_xstart=pred_xstart, x_in=pred_xstart * fac + x * (1 - fac), mask=mask, init=init,
                        text_embed=text_embed, augment=augment, networks=networks)
    terms = {}
    for term in active_terms(options):
        missing = [name for name in term.networks if networks.get(name) is None]
        if missing:
            raise ValueError(f"{term.name} ({term.weight}={getattr(options, term.weight)}) needs the "
                             f"{', '.join(missing)} network, which was not given")
        terms[term.name] = term.loss(inputs, options) * getattr(options, term.weight)
    loss = sum(terms.values()) if terms else jnp.zeros((), jnp.float32)
    return loss, terms


def value_and_guidance(denoise: Callable, loss_fn: Callable, x):
    """One UNet forward and one backward: (p_mean_variance output, g = -dloss/dx, loss terms).

    denoise: x -> p_mean_variance dict (runs the UNet once).
    loss_fn: (pred_xstart, x) -> (scalar loss, terms).
    """
    def forward(x):
        out = denoise(x)
        loss, terms = loss_fn(out["pred_xstart"], x)
        return loss, (out, terms)

    loss, backward, (out, terms) = jax.vjp(forward, x, has_aux=True)
    (grad,) = backward(jnp.ones_like(loss))
    return out, -grad, terms
