"""Gaussian diffusion maths of guided-diffusion, as pure functions on arrays.

A `Diffusion` holds the (respaced) schedule: every array is derived in float64
exactly as guided-diffusion does and stored in float32, which is the precision
the reference uses when it indexes them (`_extract_into_tensor(...).float()`).
Index arguments `t` are respaced indices (0 = the last step), either a scalar
or one per sample; `timestep_map[t]` is the original timestep the UNet sees.

Images are NHWC; model outputs are NHWC with eps in the first C channels and,
for learned-range variance, the variance interpolation value v in the rest.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

from bdjax.errors import OptionError

VAR_TYPES = ("learned_range", "fixed_small", "fixed_large")

# The length of the trained (unrespaced) process; respacings select steps from it.
NUM_TRAIN_STEPS = 1000


def linear_betas(num_timesteps: int) -> np.ndarray:
    """Ho et al.'s linear schedule, rescaled so that it stays comparable for any step count."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def named_betas(name: str, num_timesteps: int) -> np.ndarray:
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown noise schedule {name!r}; choose 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str) -> list[int]:
    """The original timesteps kept by a respacing string, ascending.

    "" keeps every step; "100" keeps round(k * 999 / 99) for k = 0..99; "10,20,30" splits the
    process into three equal sections strided to those counts (a section may keep 0); "ddimN"
    uses the DDIM paper's fixed integer stride and must give exactly N steps. Counts are plain
    decimal digits; anything else, or a string that keeps no step, is a ValueError.
    """
    if not isinstance(section_counts, str):
        raise _bad_respacing(section_counts, "is not a string")
    if not section_counts:
        return list(range(num_timesteps))
    if section_counts.startswith("ddim"):
        desired = _step_count(section_counts[len("ddim"):])
        if desired is None:
            raise _bad_respacing(section_counts, "needs a step count after 'ddim'")
        if desired == 0:
            raise _bad_respacing(section_counts, "keeps no step")
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == desired:
                return list(range(0, num_timesteps, stride))
        raise _bad_respacing(section_counts, f"cannot take exactly {desired} of {num_timesteps} steps "
                                             "with an integer stride")
    counts = [_step_count(c) for c in section_counts.split(",")]
    if None in counts:
        raise _bad_respacing(section_counts, "is not a step count or comma-separated step counts")
    if not any(counts):
        raise _bad_respacing(section_counts, "keeps no step")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, kept = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise _bad_respacing(section_counts, f"asks for {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride  # accumulated, not k * stride: the rounding must match the reference's
        start += size
    return sorted(set(kept))


def respaced_length(respacing: str) -> int:
    """The number of steps a respacing string keeps of the trained process (ValueError for a bad one)."""
    return len(space_timesteps(NUM_TRAIN_STEPS, respacing))


def _step_count(text: str) -> int | None:
    """A non-negative count written as ASCII digits only (no sign, space, underscore), else None."""
    return int(text) if text.isascii() and text.isdigit() else None


def _bad_respacing(value, why: str) -> ValueError:
    return OptionError("timestep_respacing", f"timestep_respacing={value!r} {why}: use a step count ('100'), "
                       "steps per section ('10,20,30') or a DDIM step count ('ddim50')")


@flax.struct.dataclass
class Diffusion:
    """A (respaced) diffusion schedule. Arrays are float32, indexed by respaced step."""
    betas: np.ndarray
    log_betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_alphas_cumprod: np.ndarray
    sqrt_one_minus_alphas_cumprod: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    fixed_large_variance: np.ndarray
    fixed_large_log_variance: np.ndarray
    timestep_map: np.ndarray  # int32: respaced index -> original timestep
    model_var_type: str = flax.struct.field(pytree_node=False, default="learned_range")

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_diffusion(steps: int = NUM_TRAIN_STEPS, noise_schedule: str = "linear", timestep_respacing: str = "",
                   model_var_type: str = "learned_range") -> Diffusion:
    """The schedule of guided-diffusion's SpacedDiffusion (epsilon prediction)."""
    if model_var_type not in VAR_TYPES:
        raise ValueError(f"unknown model_var_type {model_var_type!r}; choose one of {VAR_TYPES}")
    base = named_betas(noise_schedule, steps)
    kept = space_timesteps(steps, timestep_respacing)
    # Respaced betas come from the kept alpha-bar values, as SpacedDiffusion computes them.
    abar = np.cumprod(1.0 - base)[kept]
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    return _from_betas(betas, np.asarray(kept, np.int32), model_var_type)


def _from_betas(betas: np.ndarray, timestep_map: np.ndarray, model_var_type: str) -> Diffusion:
    betas = np.asarray(betas, np.float64)
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at the first step; its log is clipped with the second entry.
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    fixed_large = np.append(post_var[1], betas[1:])
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return Diffusion(
        betas=f32(betas),
        log_betas=f32(np.log(betas)),
        alphas_cumprod=f32(abar),
        alphas_cumprod_prev=f32(abar_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(abar)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - abar)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / abar)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / abar - 1)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_log_var),
        posterior_mean_coef1=f32(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        posterior_mean_coef2=f32((1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)),
        fixed_large_variance=f32(fixed_large),
        fixed_large_log_variance=f32(np.log(fixed_large)),
        timestep_map=timestep_map,
        model_var_type=model_var_type,
    )


def _per_sample(v, ndim: int):
    """A scalar or per-sample (B,) value shaped to broadcast against an NHWC batch."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim)) if v.ndim else v


def _at(arr, t, ndim: int):
    """arr[t] for a scalar t or one index per sample, broadcastable against NHWC."""
    return _per_sample(jnp.asarray(arr)[t], ndim)


def q_sample(d: Diffusion, x_start, t, noise):
    """Sample q(x_t | x_0) with the given standard normal noise."""
    return _at(d.sqrt_alphas_cumprod, t, x_start.ndim) * x_start \
        + _at(d.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise


def q_posterior_mean(d: Diffusion, x_start, x_t, t):
    return _at(d.posterior_mean_coef1, t, x_t.ndim) * x_start + _at(d.posterior_mean_coef2, t, x_t.ndim) * x_t


def predict_xstart_from_eps(d: Diffusion, x_t, t, eps):
    return _at(d.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - _at(d.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps


def predict_eps_from_xstart(d: Diffusion, x_t, t, pred_xstart):
    return (_at(d.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart) \
        / _at(d.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)


def p_mean_variance(d: Diffusion, model_output, x, t, clip_denoised: bool = False) -> dict:
    """p(x_{t-1} | x_t) from an epsilon-predicting model's output at (x, t).

    Returns {"mean", "variance", "log_variance", "pred_xstart", "eps"}.
    """
    channels = x.shape[-1]
    want = 2 * channels if d.model_var_type == "learned_range" else channels
    if model_output.shape[-1] != want:
        raise ValueError(f"model output has {model_output.shape[-1]} channels; {d.model_var_type} variance "
                         f"needs {want} (slice the eps channels for a fixed variance)")
    eps = model_output[..., :channels]
    if d.model_var_type == "learned_range":
        # v in [-1, 1] interpolates the log variance between the posterior's and beta's.
        frac = (model_output[..., channels:] + 1) / 2
        min_log = _at(d.posterior_log_variance_clipped, t, x.ndim)
        max_log = _at(d.log_betas, t, x.ndim)
        log_variance = frac * max_log + (1 - frac) * min_log
        variance = jnp.exp(log_variance)
    else:
        var, log_var = ((d.posterior_variance, d.posterior_log_variance_clipped)
                        if d.model_var_type == "fixed_small"
                        else (d.fixed_large_variance, d.fixed_large_log_variance))
        variance = jnp.broadcast_to(_at(var, t, x.ndim), x.shape)
        log_variance = jnp.broadcast_to(_at(log_var, t, x.ndim), x.shape)
    pred_xstart = predict_xstart_from_eps(d, x, t, eps)
    if clip_denoised:
        pred_xstart = jnp.clip(pred_xstart, -1, 1)
    return {"mean": q_posterior_mean(d, pred_xstart, x, t), "variance": variance,
            "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}


def condition_mean(out: dict, grad) -> dict:
    """Sohl-Dickstein et al.'s guidance: mean + variance * grad(log p(y | x))."""
    return {**out, "mean": out["mean"] + out["variance"] * grad}


def condition_score(d: Diffusion, out: dict, x, t, grad) -> dict:
    """Song et al.'s guidance (DDIM): eps' = eps - sqrt(1 - alpha_bar) * grad; x0 and mean recomputed."""
    eps = predict_eps_from_xstart(d, x, t, out["pred_xstart"])
    eps = eps - jnp.sqrt(1 - _at(d.alphas_cumprod, t, x.ndim)) * grad
    pred_xstart = predict_xstart_from_eps(d, x, t, eps)
    return {**out, "pred_xstart": pred_xstart, "eps": eps, "mean": q_posterior_mean(d, pred_xstart, x, t)}


def _nonzero(t, ndim: int):
    """1 where t > 0: the last step adds no noise."""
    return _per_sample((jnp.asarray(t) != 0).astype(jnp.float32), ndim)


def p_sample(out: dict, t, noise):
    """One ancestral step: mean + [t > 0] * exp(log_variance / 2) * noise."""
    return out["mean"] + _nonzero(t, noise.ndim) * jnp.exp(0.5 * out["log_variance"]) * noise


def ddim_sample(d: Diffusion, out: dict, x, t, noise, eta: float = 0.0):
    """One DDIM step (Song et al. eq. 12) from `out`'s pred_xstart; noise matters only if eta > 0."""
    eps = predict_eps_from_xstart(d, x, t, out["pred_xstart"])
    abar = _at(d.alphas_cumprod, t, x.ndim)
    abar_prev = _at(d.alphas_cumprod_prev, t, x.ndim)
    sigma = eta * jnp.sqrt((1 - abar_prev) / (1 - abar)) * jnp.sqrt(1 - abar / abar_prev)
    mean_pred = out["pred_xstart"] * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev - sigma ** 2) * eps
    return mean_pred + _nonzero(t, x.ndim) * sigma * noise


# Samplers by name: one step x_t -> x_{t-1}, each conditioning `out` (p_mean_variance at (x, t))
# on the guidance gradient `grad` its own way. A step returns x_{t-1} and the conditioned output
# (DDIM's conditioning changes pred_xstart, which the caller reports).

def ddpm_step(d: Diffusion, out: dict, x, t, grad, noise):
    """An ancestral step with the guidance added to the mean (`condition_mean`)."""
    out = condition_mean(out, grad)
    return p_sample(out, t, noise), out


def ddim_step(d: Diffusion, out: dict, x, t, grad, noise):
    """A deterministic DDIM step (eta = 0) with the guidance applied to the score (`condition_score`)."""
    out = condition_score(d, out, x, t, grad)
    return ddim_sample(d, out, x, t, noise, eta=0.0), out


SAMPLERS = {"ddpm": ddpm_step, "ddim": ddim_step}


def sampler(name: str):
    """The step function of the sampler called `name` (a key of SAMPLERS):
    (d, out, x, t, grad, noise) -> (x_{t-1}, conditioned out)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
