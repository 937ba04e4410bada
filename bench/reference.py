"""The authors' guided Blended Diffusion step, rebuilt in PyTorch for parity tests and timing.

The formulas are those of the authors' published code (omriav/blended-diffusion: ImageEditor's
cond_fn and postprocess_fn, ImageAugmentations, d_clip_loss, range_loss) on the packages it runs:
guided_diffusion's SpacedDiffusion (rescale_timesteps=True, as the authors configure it) and
UNetModel, clip-anytorch's CLIP, lpips.LPIPS and kornia. tests/test_blended_parity.py compares
bdjax's step with it and bench/benchmark.py times it. It imports torch, so bdjax never imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import kornia.augmentation as K
import torch
import torch.nn.functional as F
import torchvision
from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps
from kornia.geometry.transform import warp_affine, warp_perspective

from bdjax.diffusion import NUM_TRAIN_STEPS
from bdjax.models import clip as clip_lib

CLIP_NORMALIZE = torchvision.transforms.Normalize(mean=clip_lib.MEAN, std=clip_lib.STD)


def spaced_diffusion(timestep_respacing: str) -> SpacedDiffusion:
    """The authors' diffusion: linear schedule, epsilon prediction, learned-range variance."""
    return SpacedDiffusion(use_timesteps=space_timesteps(NUM_TRAIN_STEPS, timestep_respacing),
                           betas=gd.get_named_beta_schedule("linear", NUM_TRAIN_STEPS),
                           model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.LEARNED_RANGE,
                           loss_type=gd.LossType.MSE, rescale_timesteps=True)


def random_networks(unet_config: dict, clip_config: dict, *, fp16: bool, device) -> tuple:
    """(UNetModel, CLIP) of guided_diffusion and clip-anytorch at bdjax's configuration fields, with
    random weights drawn from torch's global generator, in eval mode and frozen. `fp16` converts
    them as the authors' code does on CUDA (use_fp16 UNet, clip.load's fp16 weights)."""
    from clip.model import CLIP, VisionTransformer, convert_weights
    from guided_diffusion.unet import UNetModel

    unet = UNetModel(**unet_config, use_fp16=fp16)
    with torch.no_grad():  # guided_diffusion zero-initialises output convs: draw every weight instead
        for name, p in unet.named_parameters():
            if p.ndim > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.zero_()
    if fp16:
        unet.convert_to_fp16()
    clip_model = CLIP(**{k: v for k, v in clip_config.items() if k != "vision_heads"})
    if clip_config["vision_heads"] != clip_config["vision_width"] // 64:  # CLIP derives vision_width // 64
        clip_model.visual = VisionTransformer(clip_config["image_resolution"], clip_config["vision_patch_size"],
                                              clip_config["vision_width"], clip_config["vision_layers"],
                                              clip_config["vision_heads"], clip_config["embed_dim"])
    if fp16:
        convert_weights(clip_model)  # fp16 matmuls, fp32 layer norms
    unet, clip_model = unet.to(device).eval(), clip_model.to(device).eval()
    for p in [*unet.parameters(), *clip_model.parameters()]:
        p.requires_grad_(False)
    return unet, clip_model


def image_augmentations(size: int, aug_num: int, augment: Callable) -> Callable:
    """The authors' ImageAugmentations: images average-pooled to CLIP's input size `size` (their
    clip_model.visual.input_resolution), aug_num copies of the batch (row a * batch + b), the first
    copy kept as is and the others through `augment`."""
    pool = torch.nn.AdaptiveAvgPool2d((size, size))

    def apply(images):
        batch = images.shape[0]
        copies = torch.tile(pool(images), (aug_num, 1, 1, 1))
        return torch.cat([copies[:batch], augment(copies[batch:])])
    return apply


def random_augmentations() -> torch.nn.Module:
    """The authors' random augmentations of the extra copies (kornia)."""
    return torch.nn.Sequential(K.RandomAffine(degrees=15, translate=0.1, p=0.7, padding_mode="border"),
                               K.RandomPerspective(0.7, p=0.7))


def warp_augmentations(affine, perspective, apply_affine, apply_perspective) -> Callable:
    """The same augmentations with given transforms instead of random ones: kornia's affine warp
    (border padding) where `apply_affine`, then its perspective warp (zero padding) where
    `apply_perspective`; one 3x3 matrix and one flag per copy. The output size is the input's."""
    affine, perspective = torch.as_tensor(affine), torch.as_tensor(perspective)
    apply_affine = torch.as_tensor(apply_affine)[:, None, None, None]
    apply_perspective = torch.as_tensor(apply_perspective)[:, None, None, None]

    def apply(images):
        size = tuple(images.shape[-2:])
        warped = warp_affine(images, affine[:, :2], size, align_corners=False, padding_mode="border")
        images = torch.where(apply_affine, warped, images)
        warped = warp_perspective(images, perspective, size, align_corners=False, padding_mode="zeros")
        return torch.where(apply_perspective, warped, images)
    return apply


def d_clip(x, y):
    """The authors' d_clip_loss: squared spherical distance between normalised embeddings."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


@contextlib.contextmanager
def _randn_like_returns(noise):
    """torch.randn_like returns `noise` inside (guided_diffusion's p_sample draws its noise with it)."""
    if noise is None:
        yield
        return
    original = torch.randn_like
    torch.randn_like = lambda like, *args, **kwargs: noise
    try:
        yield
    finally:
        torch.randn_like = original


def guided_step(diffusion: SpacedDiffusion, networks: tuple, options, x, t, init, mask, text_embed,
                augment: Callable, *, noise=None, background_noise=None) -> dict:
    """One step of the authors' sampler at respaced index `t`: guided_diffusion's p_sample with their
    cond_fn (or, with options.ddim, the score-conditioned DDIM step at eta 0), then their
    postprocess_fn's blend with the noised background unless options.local_clip_guided_diffusion.

    `networks`: (UNet, CLIP, LPIPS or None); `options`: bdjax's EditOptions (weights and switches);
    tensors NCHW in [-1, 1], `init` and `mask` of batch 1, `text_embed` (1, D), `t` the index per
    sample; `augment`: masked images to the CLIP crops (image_augmentations). `noise` and
    `background_noise` replace the step's and the background's draws when given. Returns the
    sample x_{t-1}, pred_xstart and cond_fn's output (the guidance loss's negative gradient).
    """
    unet, clip_model, lpips_model = networks
    batch = x.shape[0]
    grads = []

    def cond_fn(x, t, y=None):
        # p_sample has already run the UNet without grad; the guidance runs it again with grad.
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            t = (t * (diffusion.num_timesteps / 1000)).long()  # undo rescale_timesteps
            out = diffusion.p_mean_variance(unet, x, t, clip_denoised=False, model_kwargs={})
            fac = diffusion.sqrt_one_minus_alphas_cumprod[t[0].item()]
            x_in = out["pred_xstart"] * fac + x * (1 - fac)
            augmented = augment(x_in * mask).add(1).div(2)
            dists = d_clip(clip_model.encode_image(CLIP_NORMALIZE(augmented)).float(), text_embed)
            # The mean over each sample's augmentations, summed over the batch.
            loss = sum(dists[i::batch].mean() for i in range(batch)) * options.clip_guidance_lambda
            loss = loss + (out["pred_xstart"] - out["pred_xstart"].clamp(-1, 1)).pow(2).mean([1, 2, 3]).sum() \
                * options.range_lambda
            if options.background_preservation_loss:
                background = x_in * (1 - mask)
                loss = loss + lpips_model(background, init).sum() * options.lpips_sim_lambda
                loss = loss + F.mse_loss(background, init.expand_as(background)) * options.l2_sim_lambda
            grad = -torch.autograd.grad(loss, x)[0]
            grads.append(grad)
            return grad

    if options.ddim:
        out = diffusion.p_mean_variance(unet, x, t, clip_denoised=False, model_kwargs={})
        out = diffusion.condition_score(cond_fn, out, x, t, model_kwargs={})
        eps = diffusion._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar_prev = torch.tensor(diffusion.alphas_cumprod_prev[t[0].item()], dtype=torch.float32, device=x.device)
        sample = out["pred_xstart"] * abar_prev.sqrt() + (1 - abar_prev).sqrt() * eps  # eta = 0
    else:
        with _randn_like_returns(noise):
            out = diffusion.p_sample(unet, x, t, clip_denoised=False, cond_fn=cond_fn, model_kwargs={})
        sample = out["sample"]
    if not options.local_clip_guided_diffusion:
        background = diffusion.q_sample(init, t[0], noise=background_noise)
        sample = sample * mask + torch.tile(background, (batch, 1, 1, 1)) * (1 - mask)
    return {"sample": sample, "pred_xstart": out["pred_xstart"], "grad": grads[0]}
