"""Networks: the ADM diffusion UNet, CLIP and LPIPS, as Flax Linen modules (NHWC)."""
