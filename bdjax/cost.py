"""The analytic cost of a guided edit with the real networks (ADM 256x256 and CLIP ViT-B/16),
for estimates before a run and for model FLOP utilisation.

ADM 256's forward costs 2.24 TFLOP per sample and CLIP ViT-B/16's image forward 33.7 GFLOP per
crop. By the usual convention a backward counts as two forwards, so a guided step is 3 forwards of
each: about 7.5 TFLOP per sample-step with 8 crops. (The guidance needs no weight gradients, so
the work actually done is less; XLA's own count, which bench.benchmark reports, shows it.)
"""

ADM256_FORWARD_FLOPS = 2.24e12
VIT_B16_FORWARD_FLOPS = 33.7e9


def guided_step_flops(aug_num: int) -> float:
    """FLOPs of one guided step of one sample: the UNet and `aug_num` CLIP crops, forward and backward."""
    return 3 * (ADM256_FORWARD_FLOPS + aug_num * VIT_B16_FORWARD_FLOPS)
