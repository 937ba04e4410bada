"""The analytic cost of a guided edit with the real networks (ADM 256x256 and CLIP ViT-B/16),
for estimates before a run and for model FLOP utilisation.

Each forward is counted from the architecture as 2 FLOP per multiply-add of its convolutions and
matmuls (a 3x3 convolution at h x w from c to c' channels: 2 * 9 * h * w * c * c'); norms,
activations and residual adds are left out (well under 1 %).

ADM 256 (bdjax/models/unet.py, preset adm256_uncond), one 256x256 sample:
    3x3 and 1x1 convolutions        1101.3 G multiply-adds
    attention qkv and proj_out        12.3 G  (at 32x32, 16x16 and 8x8)
    attention scores and values        6.1 G  (q.k and the weighted sum of v)
    timestep MLP, ResBlock embeddings  0.05 G
    total 1119.8 G multiply-adds = 2.24 TFLOP

CLIP ViT-B/16 image tower (bdjax/models/clip.py, preset vit_b16), one 224x224 crop: 197 tokens
(196 patches and the class token) of width 768, 12 layers, 12 heads:
    patch embedding                    0.116 G multiply-adds (196 x 768 x 768)
    qkv, out_proj and the MLP         16.73 G  (12 layers x 197 x 12 x 768^2)
    attention scores and values        0.715 G (12 layers x 2 x 197^2 x 768)
    projection to the embedding        0.0004 G
    total 17.56 G multiply-adds = 35.1 GFLOP

XLA's count of the same forwards (the lowered program's cost analysis, tests/test_cost.py) agrees:
the UNet's is 1.1 % lower, because XLA leaves out the taps of each 3x3 window that fall on the
zero padding (from 0.5 % of the taps at 256x256 to 16 % at 8x8) and adds the elementwise ops
(0.25 %); the ViT's is 0.3 % higher, its elementwise ops (layer norms, softmax, QuickGELU).

By the usual convention a backward counts as two forwards, so a guided step is 3 forwards of each:
about 7.56 TFLOP per sample-step with 8 crops. The guidance takes gradients with respect to the
image only, never the weights, so each backward costs about one forward: XLA counts about two
thirds of this figure for the editor's guided step (5.0 TFLOP per sample-step with 8 crops).
"""

ADM256_FORWARD_FLOPS = 2.24e12
VIT_B16_FORWARD_FLOPS = 35.1e9


def guided_step_flops(aug_num: int) -> float:
    """FLOPs of one guided step of one sample: the UNet and `aug_num` CLIP crops, forward and backward."""
    return 3 * (ADM256_FORWARD_FLOPS + aug_num * VIT_B16_FORWARD_FLOPS)
