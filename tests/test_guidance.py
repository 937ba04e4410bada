"""The guidance terms table: which terms a run's options switch on, which networks they need, and
that the loss is their weighted sum in table order, so a new term is one entry of `TERMS`.

Stand-in networks keep it fast: the "CLIP" embedding is an image's mean colour, the "LPIPS"
distance a per-sample mean absolute difference to the init image.
"""

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from bdjax import guidance
from bdjax.options import EditOptions

B, S = 2, 8
RNG = np.random.RandomState(0)
PRED_XSTART = jnp.asarray(RNG.uniform(-1.5, 1.5, (B, S, S, 3)), jnp.float32)
X = jnp.asarray(RNG.randn(B, S, S, 3), jnp.float32)
INIT = jnp.asarray(RNG.uniform(-1, 1, (1, S, S, 3)), jnp.float32)
MASK = jnp.asarray(np.pad(np.ones((1, 4, 4, 1), np.float32), ((0, 0), (2, 2), (2, 2), (0, 0))))
TEXT = jnp.asarray([1.0, -1.0, -1.0])
FAC = 0.3


def augment(images):
    return jnp.concatenate([images, images[:, ::-1]])  # two copies of each sample


NETWORKS = {"clip": lambda images: jnp.mean(images - 0.5, axis=(1, 2)),
            "lpips": lambda background: jnp.mean(jnp.abs(background - INIT), axis=(1, 2, 3))}


def loss(options, networks=NETWORKS):
    return guidance.guidance_loss(PRED_XSTART, X, FAC, mask=MASK, init=INIT, text_embed=TEXT, augment=augment,
                                  networks=networks, options=options)


# Every on/off combination of the four weights and the background switch.
COMBINATIONS = [dict(clip_guidance_lambda=clip, range_lambda=rng, background_preservation_loss=background,
                     lpips_sim_lambda=lpips, l2_sim_lambda=l2)
                for clip, rng, background, lpips, l2 in itertools.product((0.0, 1000.0), (0.0, 50.0), (False, True),
                                                                          (0.0, 1000.0), (0.0, 10000.0))]


@pytest.mark.parametrize("kw", COMBINATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_each_term_is_on_exactly_when_its_weight_and_switch_are(kw):
    options = EditOptions(batch_size=4, **kw)
    total, terms = loss(options)
    background = kw["background_preservation_loss"]
    want = [name for name, on in (("clip_loss", kw["clip_guidance_lambda"]), ("range_loss", kw["range_lambda"]),
                                  ("lpips_loss", background and kw["lpips_sim_lambda"]),
                                  ("l2_loss", background and kw["l2_sim_lambda"])) if on]
    assert list(terms) == want  # in summation order
    assert [t.name for t in guidance.active_terms(options)] == want
    assert guidance.needs_lpips(options) == bool(background and kw["lpips_sim_lambda"])
    # The loss is Python's sum of the terms in that order, bit for bit (0 when none is on).
    assert np.asarray(total).tobytes() == np.asarray(sum(terms.values()) if terms else jnp.float32(0)).tobytes()


def test_terms_are_the_reference_losses_times_their_weights():
    """Each term against its formula written out; the L2 term divides by the batch_size option
    (the reference's mse_loss over its whole batch), not the arrays' batch."""
    options = EditOptions(background_preservation_loss=True, batch_size=4)
    _, terms = loss(options)
    x_in = PRED_XSTART * FAC + X * (1 - FAC)
    background = x_in * (1 - MASK)
    copies = augment(x_in * MASK)
    want = {
        "clip_loss": guidance.clip_loss(NETWORKS["clip"]((copies + 1) / 2), TEXT, B) * 1000.0,
        "range_loss": jnp.sum(jnp.mean(jnp.square(PRED_XSTART - jnp.clip(PRED_XSTART, -1, 1)), axis=(1, 2, 3)))
        * 50.0,
        "lpips_loss": jnp.sum(NETWORKS["lpips"](background)) * 1000.0,
        "l2_loss": jnp.sum(jnp.mean(jnp.square(background - INIT), axis=(1, 2, 3))) / 4 * 10000.0,
    }
    assert list(terms) == list(want)
    for name in want:
        assert np.asarray(terms[name]).tobytes() == np.asarray(want[name]).tobytes(), name
        assert float(terms[name]) != 0, name


def test_a_term_whose_network_is_missing_is_a_clear_error():
    options = EditOptions(background_preservation_loss=True)
    with pytest.raises(ValueError, match="lpips_loss .*lpips network"):
        loss(options, {"clip": NETWORKS["clip"]})
    loss(dataclasses.replace(options, lpips_sim_lambda=0.0), {"clip": NETWORKS["clip"]})  # not needed: fine


@dataclasses.dataclass(frozen=True)
class WithBrightness(EditOptions):
    """EditOptions plus the weight of a new term."""
    brightness_lambda: float = 0.0


def brightness(inputs, options):
    """A new term: the masked region's brightness; it asks for the LPIPS network to show that
    needs_lpips follows the table."""
    return jnp.sum(inputs.x_in * inputs.mask)


def test_a_new_term_is_one_table_entry(monkeypatch):
    monkeypatch.setattr(guidance, "TERMS", guidance.TERMS + (
        guidance.Term("brightness_loss", "brightness_lambda", brightness, networks=("lpips",)),))
    off = WithBrightness(range_lambda=0.0)
    on = dataclasses.replace(off, brightness_lambda=3.0)
    assert not guidance.needs_lpips(off) and guidance.needs_lpips(on)
    total_off, terms_off = loss(off)
    total, terms = loss(on)
    assert list(terms_off) == ["clip_loss"] and list(terms) == ["clip_loss", "brightness_loss"]
    want = brightness(guidance.LossInputs(PRED_XSTART, PRED_XSTART * FAC + X * (1 - FAC), MASK, INIT, TEXT,
                                          augment, NETWORKS), on) * 3.0
    assert np.asarray(terms["brightness_loss"]).tobytes() == np.asarray(want).tobytes()
    assert np.asarray(total).tobytes() == np.asarray(terms_off["clip_loss"] + want).tobytes()
