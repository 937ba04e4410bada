"""One step of Blended Diffusion against the same step assembled from the PyTorch references.

Reference: the authors' step (omriav/blended-diffusion, ImageEditor.cond_fn + postprocess_fn)
as bench.reference rebuilds it from guided_diffusion's UNetModel and SpacedDiffusion
(rescale_timesteps=True, as the authors configure it), clip-anytorch's CLIP, lpips.LPIPS(net="vgg")
and kornia's warp_affine / warp_perspective. The augmentations are made deterministic by injecting the same transform
matrices and apply-flags into both, and the step noise and background noise are shared.
Networks are tiny (UNet) or random (CLIP, VGG) but of the real architectures, converted by the
real converters. Tolerance: max abs error <= 1e-4 x max |reference| for x_{i-1}, pred_xstart and
the guidance gradient, float32.
"""

import jax
import jax.numpy as jnp
import lpips as lpips_torch
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from clip.model import CLIP as TorchCLIP
from guided_diffusion.unet import UNetModel as TorchUNet
from kornia.geometry.transform import get_perspective_transform

from bdjax import augment, blended, checkpoint, diffusion
from bdjax.blended import EditOptions, Models
from bdjax.models import clip as clip_lib
from bdjax.models import lpips as lpips_lib
from bdjax.models import unet as unet_lib
from checkpoints_convert import clip as convert_clip
from checkpoints_convert import lpips as convert_lpips
from bench import reference
from checkpoints_convert import unet as convert_unet
from checkpoints_convert.common import read_torch_state_dict
from test_unet import randomize_

RTOL = 1e-4
B, SIZE, AUG = 2, 32, 4
STEP = 40  # respaced index of the step under test ("100" respacing)
UNET = dict(image_size=SIZE, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=None, num_heads=2, num_head_channels=-1,
            num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=False)
CLIP = dict(embed_dim=32, image_resolution=224, vision_layers=2, vision_width=64, vision_patch_size=32,
            context_length=77, vocab_size=49408, transformer_width=32, transformer_heads=2, transformer_layers=1)


def to_jax_params(flat, expected):
    return checkpoint.restore({k: np.asarray(v) for k, v in flat.items()}, expected, what="test")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    torch.manual_seed(0)
    t_unet = randomize_(TorchUNet(**UNET).eval(), seed=3)
    unet = unet_lib.UNetModel(**UNET)
    unet_params = to_jax_params(convert_unet.convert_state_dict({k: v.numpy() for k, v in t_unet.state_dict().items()}),
                                unet_lib.param_shapes(unet))

    t_clip = TorchCLIP(**CLIP).eval()
    state = {k: v.numpy() for k, v in t_clip.state_dict().items()}
    clip = clip_lib.CLIP(**convert_clip.infer_config(state, heads=(1, CLIP["transformer_heads"])))
    clip_params = to_jax_params(convert_clip.convert_state_dict(state), clip_lib.param_shapes(clip))

    vgg_path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(torchvision.models.vgg16().state_dict(), vgg_path)
    vgg = read_torch_state_dict(str(vgg_path))
    t_lpips = lpips_torch.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False).eval()
    slice_of = {i: k + 1 for k, indices in enumerate(lpips_lib.VGG16_SLICES) for i in indices}
    t_lpips.net.load_state_dict({f"slice{slice_of[int(k.split('.')[1])]}.{k[len('features.'):]}": torch.from_numpy(v)
                                 for k, v in vgg.items() if k.startswith("features.")})
    lpips = lpips_lib.LPIPS()
    flat = {**convert_lpips.convert_vgg(vgg),
            **convert_lpips.convert_lin(read_torch_state_dict(convert_lpips.default_lin_path()))}
    lpips_params = to_jax_params(flat, lpips_lib.param_shapes(lpips))
    for p in [*t_unet.parameters(), *t_clip.parameters(), *t_lpips.parameters()]:
        p.requires_grad_(False)
    return {"torch": (t_unet, t_clip, t_lpips), "models": Models(unet, clip, lpips),
            "params": {"unet": unet_params, "clip": clip_params, "lpips": lpips_params}}


@pytest.fixture(scope="module")
def case():
    """Inputs, shared noise and the injected transforms of every augmented copy."""
    rng = np.random.RandomState(0)
    init = rng.uniform(-1, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    mask = np.zeros((1, SIZE, SIZE, 1), np.float32)
    mask[:, 6:26, 4:20] = 1
    n_aug = (AUG - 1) * B  # copies B.. in the reference's order: row a * B + b
    angles = rng.uniform(-15, 15, n_aug)
    shifts = rng.uniform(-0.1, 0.1, n_aug) * 224
    affine = np.stack([np.asarray(augment.affine_matrix(a, np.array([0.0, s]), 224, 224)) for a, s in zip(angles, shifts)])
    corners = np.array([[0, 0], [223, 0], [223, 223], [0, 223]], np.float64)
    inward = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], np.float64)
    ends = corners + rng.uniform(0, 1, (n_aug, 4, 2)) * 0.35 * 224 * inward
    perspective = get_perspective_transform(torch.from_numpy(np.broadcast_to(corners, ends.shape).copy()),
                                            torch.from_numpy(ends)).numpy().astype(np.float32)
    return {
        "init": init, "mask": mask,
        "x": (0.6 * init + 0.8 * rng.randn(B, SIZE, SIZE, 3)).astype(np.float32),
        "noise": rng.randn(B, SIZE, SIZE, 3).astype(np.float32),
        "background_noise": rng.randn(1, SIZE, SIZE, 3).astype(np.float32),
        "affine": affine.astype(np.float32), "perspective": perspective,
        "apply_affine": rng.rand(n_aug) < 0.7, "apply_perspective": rng.rand(n_aug) < 0.7,
        "text_embed": rng.randn(CLIP["embed_dim"]).astype(np.float32),
    }


def nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def jax_augment(case):
    """The injected augmentation for bdjax: the case's transforms, in the reference's order."""
    params = augment.AugmentationParams(
        jnp.asarray(case["affine"]), jnp.asarray(case["perspective"]),
        jnp.asarray(case["apply_affine"]), jnp.asarray(case["apply_perspective"]))

    def fn(images, keys):
        pooled = augment.adaptive_avg_pool(images, 224)
        copies = jnp.tile(pooled, (AUG, 1, 1, 1))
        augmented = jax.vmap(augment.augment_copy)(copies[B:], params)
        return jnp.concatenate([copies[:B], augmented])
    return fn


def torch_step(nets, case, options: EditOptions):
    """The authors' step (bench.reference) on the case's inputs, transforms and noise."""
    augment = reference.image_augmentations(CLIP["image_resolution"], AUG, reference.warp_augmentations(
        case["affine"], case["perspective"], case["apply_affine"], case["apply_perspective"]))
    out = reference.guided_step(reference.spaced_diffusion(options.timestep_respacing), nets["torch"], options,
                                nchw(case["x"]), torch.full((B,), STEP), nchw(case["init"]), nchw(case["mask"]),
                                torch.from_numpy(case["text_embed"])[None], augment, noise=nchw(case["noise"]),
                                background_noise=nchw(case["background_noise"]))
    return {k: nhwc(v) for k, v in out.items()}


def jax_step(nets, case, options: EditOptions):
    d = diffusion.make_diffusion(timestep_respacing=options.timestep_respacing)
    step = blended.make_step(nets["models"], options, d, guided=True, augment=jax_augment(case))
    draws = {"noise": case["noise"], "background_noise": case["background_noise"],
             "aug_keys": jax.random.split(jax.random.key(0), B), "y": None}
    out = jax.jit(step)(nets["params"], case["x"], STEP, draws, case["init"], case["mask"], case["text_embed"])
    return {k: np.asarray(out[k]) for k in ("sample", "pred_xstart", "grad")}


CASES = {
    "algorithm2": EditOptions(aug_num=AUG, batch_size=B),
    "algorithm1_background_loss": EditOptions(aug_num=AUG, batch_size=B, local_clip_guided_diffusion=True,
                                              background_preservation_loss=True),
    "ddim": EditOptions(aug_num=AUG, batch_size=B, ddim=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_step_matches_reference(name, nets, case):
    options = CASES[name]
    want = torch_step(nets, case, options)
    got = jax_step(nets, case, options)
    for key in ("grad", "pred_xstart", "sample"):
        scale = np.abs(want[key]).max()
        assert scale > 1e-3, (key, scale)  # the reference is not degenerate
        err = np.abs(got[key] - want[key]).max() / scale
        assert err <= RTOL, (name, key, err)


def test_guidance_terms_all_contribute(nets, case):
    """The gradient changes when any one loss is switched off, so each term is exercised."""
    base = jax_step(nets, case, CASES["algorithm1_background_loss"])["grad"]
    for change in (dict(clip_guidance_lambda=0.0), dict(lpips_sim_lambda=0.0), dict(l2_sim_lambda=0.0),
                   dict(range_lambda=0.0)):
        options = EditOptions(**{**CASES["algorithm1_background_loss"].__dict__, **change})
        other = jax_step(nets, case, options)["grad"]
        assert np.abs(other - base).max() > 1e-6 * np.abs(base).max(), change


def test_ranking_distance_matches_reference(nets, case):
    """mask * result, bilinear resize to 224 (torch's interpolate, no antialiasing), CLIP
    without normalisation, spherical distance to the text embedding."""
    _, t_clip, _ = nets["torch"]
    rng = np.random.RandomState(1)
    pred_xstart = rng.uniform(-1.2, 1.2, (B, SIZE, SIZE, 3)).astype(np.float32)
    options = EditOptions(aug_num=AUG, batch_size=B)
    got = blended.finish(nets["models"], options, nets["params"], pred_xstart, case["init"], case["mask"],
                         case["text_embed"])
    init, mask = nchw(case["init"]), nchw(case["mask"])
    pasted = (init * (1 - mask) + nchw(pred_xstart) * mask).add(1).div(2).clamp(0, 1)
    np.testing.assert_allclose(np.asarray(got["images"]), nhwc(pasted), atol=1e-6)
    with torch.no_grad():
        resized = F.interpolate(mask * pasted, size=(224, 224), mode="bilinear", align_corners=False)
        text_embed = torch.from_numpy(case["text_embed"])[None]
        want = reference.d_clip(t_clip.encode_image(resized).float(), text_embed).numpy()
    np.testing.assert_allclose(np.asarray(got["distances"]), want, rtol=1e-5)
