"""The real ADM configurations: complete key sets, and one forward of the 256 model.

Reference: guided_diffusion.script_util.create_model with the settings of the released
checkpoints (so the presets' downsample rates and channel multipliers are checked against the
reference's own mapping), random weights. The 256 forward runs at 64x64 to keep the suite fast;
tolerance: max abs error <= 1e-4 x max |reference output| (fp32, 552 M parameters).
"""

import gc

import jax
import numpy as np
import pytest
import torch
from guided_diffusion.script_util import create_model

from bdjax import checkpoint
from bdjax.models import unet
from checkpoints_convert import unet as convert_unet

ADM256_TENSORS, ADM256_PARAMS = 566, 552_814_086

REFERENCE_SETTINGS = dict(num_channels=256, num_res_blocks=2, learn_sigma=True, attention_resolutions="32,16,8",
                          num_heads=4, num_head_channels=64, num_heads_upsample=-1, use_scale_shift_norm=True,
                          dropout=0.0, resblock_updown=True, use_fp16=False, use_new_attention_order=False)


def reference_model(image_size, class_cond):
    return create_model(image_size, class_cond=class_cond, **REFERENCE_SETTINGS)


@pytest.mark.parametrize("name,tensors,params", [("adm256_uncond", ADM256_TENSORS, ADM256_PARAMS)])
def test_preset_parameter_count(name, tensors, params):
    shapes = checkpoint.flatten(unet.param_shapes(unet.UNetModel(**unet.preset(name))))
    assert len(shapes) == tensors
    assert sum(int(np.prod(s.shape)) for s in shapes.values()) == params


def test_adm512_cond_key_set_matches_reference():
    """Every key and shape of the 512 class-conditional model, without allocating its weights."""
    with torch.device("meta"):
        model = reference_model(512, class_cond=True)
    state = {k: np.lib.stride_tricks.as_strided(np.zeros((), np.float32), v.shape, (0,) * v.ndim)
             for k, v in model.state_dict().items()}  # zero-stride views: shapes without memory
    flat = convert_unet.convert_state_dict(state)
    checkpoint.check_params(flat, unet.param_shapes(unet.UNetModel(**unet.preset("adm512_cond"))), "adm512 reference")
    assert len(flat) == len(state)
    assert "label_emb/embedding" in flat and flat["label_emb/embedding"].shape == (1000, 1024)


def test_adm256_uncond_converts_every_tensor_and_agrees(tmp_path):
    torch.manual_seed(0)
    model = reference_model(256, class_cond=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.any():  # zero_module'd output convs: re-draw so the test can fail
                bound = 1 / np.sqrt(p[0].numel())
                p.uniform_(-bound, bound)
            elif p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    pt = str(tmp_path / "256x256_diffusion_uncond.pt")
    torch.save(model.state_dict(), pt)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)
    t = np.array([613.0], np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1)
    del model
    gc.collect()

    convert_unet.convert(pt, str(tmp_path / "out"), unet.preset("adm256_uncond"))
    _, flat = checkpoint.read(str(tmp_path / "out"), "unet", model="unet")
    assert len(flat) == ADM256_TENSORS
    assert sum(v.size for v in flat.values()) == ADM256_PARAMS
    del flat

    module, params = unet.load(str(tmp_path / "out"))
    out = np.asarray(jax.jit(module.apply)({"params": params}, x, t))
    assert out.shape == ref.shape == (1, 64, 64, 6)
    assert np.abs(ref).max() > 0.1
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
