"""Diffusion maths parity with guided-diffusion's SpacedDiffusion (guided-diffusion-sdk).

Reference: guided_diffusion.respace.SpacedDiffusion with the linear schedule over 1000 steps,
epsilon prediction, respacings "100", "25" and "ddim50". Every function gets the same model
output, gradient and noise as the reference. Tolerance: max abs error <= 1e-6 x max |reference|
for each array (float32 arithmetic on both sides; the schedules are derived in float64).
"""

import numpy as np
import pytest
import torch

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps as ref_space_timesteps

from bdjax import diffusion

RTOL = 1e-6
B, H, W, C = 3, 8, 8, 3


def assert_close(ours, ref, rtol=RTOL):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= rtol * scale, (np.abs(ours - ref).max(), scale)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.detach().numpy().transpose(0, 2, 3, 1)


def reference(respacing, var_type=gd.ModelVarType.LEARNED_RANGE):
    return SpacedDiffusion(
        use_timesteps=ref_space_timesteps(1000, respacing),
        betas=gd.get_named_beta_schedule("linear", 1000),
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=gd.LossType.MSE,
    )


VAR_TYPES = {
    "learned_range": gd.ModelVarType.LEARNED_RANGE,
    "fixed_small": gd.ModelVarType.FIXED_SMALL,
    "fixed_large": gd.ModelVarType.FIXED_LARGE,
}


@pytest.mark.parametrize("respacing", ["100", "25", "ddim50", "10,20,30", ""])
def test_space_timesteps_match_reference(respacing):
    assert diffusion.space_timesteps(1000, respacing) == sorted(ref_space_timesteps(1000, respacing or "1000"))


def test_respacing_100_keeps_the_spec_timesteps():
    kept = diffusion.space_timesteps(1000, "100")
    assert kept == [round(k * 999 / 99) for k in range(100)]
    assert kept[:3] == [0, 10, 20] and kept[-2:] == [989, 999]


def test_bad_respacing_is_a_clear_error():
    with pytest.raises(ValueError, match="timestep_respacing"):
        diffusion.space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="integer stride"):
        diffusion.space_timesteps(1000, "ddim400")


@pytest.mark.parametrize("respacing", ["100", "25", "ddim50"])
def test_schedule_arrays_match_reference(respacing):
    ref = reference(respacing)
    ours = diffusion.make_diffusion(timestep_respacing=respacing)
    assert list(ours.timestep_map) == ref.timestep_map
    for name in ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                 "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1",
                 "posterior_mean_coef2"]:
        ours_arr = getattr(ours, name)
        assert ours_arr.dtype == np.float32, name
        np.testing.assert_allclose(ours_arr, getattr(ref, name).astype(np.float32), rtol=RTOL, err_msg=name)
    np.testing.assert_allclose(ours.log_betas, np.log(ref.betas).astype(np.float32), rtol=RTOL)


def test_cosine_schedule_matches_reference():
    np.testing.assert_allclose(diffusion.cosine_betas(1000), gd.get_named_beta_schedule("cosine", 1000), rtol=1e-12)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.RandomState(0)
    return {
        "x": rng.randn(B, H, W, C).astype(np.float32),
        "x0": rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32),
        "eps": rng.randn(B, H, W, C).astype(np.float32),
        "v": rng.uniform(-1, 1, (B, H, W, C)).astype(np.float32),
        "grad": (0.3 * rng.randn(B, H, W, C)).astype(np.float32),
    }


def model_output(a, var_type):
    return np.concatenate([a["eps"], a["v"]], -1) if var_type == "learned_range" else a["eps"]


def fake_model(output_nhwc):
    """A 'model' for the reference that returns a fixed output, whatever (x, t)."""
    out = nchw(output_nhwc)
    return lambda x, t, **kw: out


# Respaced indices per sample: the last step (0, no noise), the first, and one in between.
T_CASES = {"100": [0, 99, 41], "25": [0, 24, 7], "ddim50": [0, 49, 13]}


@pytest.mark.parametrize("respacing", ["100", "25", "ddim50"])
def test_q_sample_matches_reference(respacing, arrays):
    ref, ours = reference(respacing), diffusion.make_diffusion(timestep_respacing=respacing)
    t = np.array(T_CASES[respacing])
    want = ref.q_sample(nchw(arrays["x0"]), torch.from_numpy(t), noise=nchw(arrays["eps"]))
    assert_close(diffusion.q_sample(ours, arrays["x0"], t, arrays["eps"]), nhwc(want))
    # A scalar index applies to the whole batch.
    want = ref.q_sample(nchw(arrays["x0"]), torch.full((B,), 5), noise=nchw(arrays["eps"]))
    assert_close(diffusion.q_sample(ours, arrays["x0"], 5, arrays["eps"]), nhwc(want))


@pytest.mark.parametrize("var_type", list(VAR_TYPES))
@pytest.mark.parametrize("respacing", ["100", "25", "ddim50"])
@pytest.mark.parametrize("clip_denoised", [False, True])
def test_p_mean_variance_matches_reference(respacing, var_type, clip_denoised, arrays):
    ref = reference(respacing, VAR_TYPES[var_type])
    ours = diffusion.make_diffusion(timestep_respacing=respacing, model_var_type=var_type)
    t = np.array(T_CASES[respacing])
    out_np = model_output(arrays, var_type)
    want = ref.p_mean_variance(fake_model(out_np), nchw(arrays["x"]), torch.from_numpy(t),
                               clip_denoised=clip_denoised)
    got = diffusion.p_mean_variance(ours, out_np, arrays["x"], t, clip_denoised=clip_denoised)
    for key in ["mean", "variance", "log_variance", "pred_xstart"]:
        assert_close(got[key], nhwc(want[key]))


def test_p_mean_variance_rejects_wrong_channel_count(arrays):
    d = diffusion.make_diffusion(timestep_respacing="100")
    with pytest.raises(ValueError, match="needs 6"):
        diffusion.p_mean_variance(d, arrays["eps"], arrays["x"], 3)


@pytest.mark.parametrize("respacing", ["100", "25", "ddim50"])
def test_guided_ancestral_step_matches_reference(respacing, arrays):
    """condition_mean + p_sample against SpacedDiffusion.p_sample with a cond_fn, same noise."""
    ref, ours = reference(respacing), diffusion.make_diffusion(timestep_respacing=respacing)
    t = np.array(T_CASES[respacing])
    out_np = model_output(arrays, "learned_range")
    grad = nchw(arrays["grad"])
    torch.manual_seed(7)
    want = ref.p_sample(fake_model(out_np), nchw(arrays["x"]), torch.from_numpy(t), clip_denoised=False,
                        cond_fn=lambda x, t, **kw: grad, model_kwargs={})
    torch.manual_seed(7)
    noise = nhwc(torch.randn(B, C, H, W))  # p_sample's own randn_like draw, replayed

    out = diffusion.p_mean_variance(ours, out_np, arrays["x"], t)
    guided = diffusion.condition_mean(out, arrays["grad"])
    sample = diffusion.p_sample(guided, t, noise)
    assert_close(sample, nhwc(want["sample"]))
    assert_close(guided["pred_xstart"], nhwc(want["pred_xstart"]))
    # condition_mean on its own, against the reference's.
    ref_out = ref.p_mean_variance(fake_model(out_np), nchw(arrays["x"]), torch.from_numpy(t), clip_denoised=False)
    want_mean = ref.condition_mean(lambda x, t, **kw: grad, ref_out, nchw(arrays["x"]), torch.from_numpy(t),
                                   model_kwargs={})
    assert_close(guided["mean"], nhwc(want_mean))
    # The last step (t = 0, sample 0) adds no noise.
    np.testing.assert_array_equal(np.asarray(sample)[0], np.asarray(guided["mean"])[0])


@pytest.mark.parametrize("respacing", ["100", "25", "ddim50"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_guided_ddim_step_matches_reference(respacing, eta, arrays):
    """condition_score + ddim_sample against SpacedDiffusion.condition_score and ddim_sample."""
    ref, ours = reference(respacing), diffusion.make_diffusion(timestep_respacing=respacing)
    t = np.array(T_CASES[respacing])
    tt = torch.from_numpy(t)
    out_np = model_output(arrays, "learned_range")
    grad = nchw(arrays["grad"])
    cond_fn = lambda x, t, **kw: grad  # noqa: E731

    ref_out = ref.p_mean_variance(fake_model(out_np), nchw(arrays["x"]), tt, clip_denoised=False)
    want_cond = ref.condition_score(cond_fn, ref_out, nchw(arrays["x"]), tt, model_kwargs={})
    out = diffusion.p_mean_variance(ours, out_np, arrays["x"], t)
    guided = diffusion.condition_score(ours, out, arrays["x"], t, arrays["grad"])
    for key in ["pred_xstart", "mean"]:
        assert_close(guided[key], nhwc(want_cond[key]))

    torch.manual_seed(11)
    want = ref.ddim_sample(fake_model(out_np), nchw(arrays["x"]), tt, clip_denoised=False, cond_fn=cond_fn,
                          eta=eta, model_kwargs={})
    torch.manual_seed(11)
    noise = nhwc(torch.randn(B, C, H, W))
    assert_close(diffusion.ddim_sample(ours, guided, arrays["x"], t, noise, eta=eta), nhwc(want["sample"]))


def test_functions_trace_under_jit_with_a_traced_index(arrays):
    """The sampler indexes the schedule with a traced step inside lax.scan."""
    import jax

    d = diffusion.make_diffusion(timestep_respacing="100")
    out_np = model_output(arrays, "learned_range")

    @jax.jit
    def step(t, noise):
        out = diffusion.p_mean_variance(d, out_np, arrays["x"], t)
        return diffusion.p_sample(diffusion.condition_mean(out, arrays["grad"]), t, noise)

    eager_out = diffusion.p_mean_variance(d, out_np, arrays["x"], 37)
    eager = diffusion.p_sample(diffusion.condition_mean(eager_out, arrays["grad"]), 37, arrays["eps"])
    assert_close(step(np.int32(37), arrays["eps"]), eager)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_samplers_by_name_are_the_guided_steps(name, arrays):
    """diffusion.sampler(name) is, bit for bit, ddpm: condition_mean then p_sample; ddim:
    condition_score then ddim_sample with eta = 0. It also returns the conditioned output, whose
    pred_xstart DDIM's conditioning changes. Eager and under jit (as the sampler runs it)."""
    import jax

    def by_hand(d, out, x, t, grad, noise):
        if name == "ddpm":
            out = diffusion.condition_mean(out, grad)
            return diffusion.p_sample(out, t, noise), out
        out = diffusion.condition_score(d, out, x, t, grad)
        return diffusion.ddim_sample(d, out, x, t, noise, eta=0.0), out

    d = diffusion.make_diffusion(timestep_respacing="25")
    t = np.array(T_CASES["25"])
    out = diffusion.p_mean_variance(d, model_output(arrays, "learned_range"), arrays["x"], t)
    update = diffusion.sampler(name)
    assert update is diffusion.SAMPLERS[name]
    for wrap in (lambda f: f, jax.jit):
        sample, conditioned = wrap(update)(d, out, arrays["x"], t, arrays["grad"], arrays["eps"])
        want, want_out = wrap(by_hand)(d, out, arrays["x"], t, arrays["grad"], arrays["eps"])
        np.testing.assert_array_equal(sample, want)
        assert conditioned.keys() == want_out.keys()
        for key in want_out:
            np.testing.assert_array_equal(conditioned[key], want_out[key])
    if name == "ddim":  # the conditioning moved pred_xstart
        assert np.abs(np.asarray(conditioned["pred_xstart"]) - np.asarray(out["pred_xstart"])).max() > 0


def test_unknown_sampler_is_a_clear_error():
    from bdjax.options import EditOptions

    with pytest.raises(ValueError, match=r"unknown sampler 'euler'; known: ddpm, ddim"):
        diffusion.sampler("euler")
    assert {EditOptions(ddim=ddim).sampler for ddim in (False, True)} == set(diffusion.SAMPLERS)


def test_respaced_length_counts_the_kept_steps():
    assert diffusion.NUM_TRAIN_STEPS == 1000
    for respacing, want in (("100", 100), ("25", 25), ("ddim50", 50), ("10,0,20", 30), ("", 1000)):
        assert diffusion.respaced_length(respacing) == want
        assert diffusion.make_diffusion(timestep_respacing=respacing).num_timesteps == want
    with pytest.raises(ValueError, match="timestep_respacing"):
        diffusion.respaced_length("fast")
