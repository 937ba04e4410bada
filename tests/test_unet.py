"""ADM UNet parity with guided-diffusion on tiny configurations, and the converter's error paths.

Reference: guided_diffusion.unet.UNetModel (guided-diffusion-sdk), fp32, random weights with every
parameter non-zero (the zero-initialised output convs re-drawn), saved with torch.save, converted by
checkpoints_convert.unet and loaded by bdjax.models.unet.load. Tolerance: max abs error <= 1e-5 x
max |reference output|.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from guided_diffusion.unet import UNetModel as TorchUNet

from bdjax import checkpoint
from bdjax.models import unet
from checkpoints_convert import unet as convert_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5
BF16_RTOL = 5e-2

TINY = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=None, num_heads=2,
            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
            resblock_updown=True, use_new_attention_order=False)

CONFIGS = {
    "scale_shift_updown_legacy": dict(TINY),
    "plain_conv_resample_new_order": dict(TINY, use_scale_shift_norm=False, resblock_updown=False,
                                          use_new_attention_order=True, num_head_channels=16),
    "class_cond_new_order": dict(TINY, num_classes=10, use_new_attention_order=True, resblock_updown=False,
                                 num_heads_upsample=1),
    # A fractional channel multiplier as in the 512 model, three levels, attention at two rates.
    "class_cond_updown_legacy_half_mult": dict(TINY, num_classes=10, use_scale_shift_norm=False,
                                               model_channels=64, channel_mult=(0.5, 1, 1),
                                               attention_resolutions=(2, 4), num_head_channels=32),
}


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-zero random values everywhere, scaled per tensor so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # 1-D weights are GroupNorm scales (around 1); the rest are biases
                p.copy_((1.0 if name.endswith(".weight") else 0.0) + 0.2 * noise)
            else:
                fan_in = 1 if "label_emb" in name else p[0].numel()
                p.copy_(noise / np.sqrt(fan_in))
    return model


def torch_forward(model, x_nhwc, t, y=None):
    with torch.no_grad():
        out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                    None if y is None else torch.from_numpy(y))
    return out.numpy().transpose(0, 2, 3, 1)


def inputs(config, batch=3, seed=0):
    rng = np.random.RandomState(seed)
    size = config["image_size"]
    x = rng.uniform(-1, 1, (batch, size, size, config["in_channels"])).astype(np.float32)
    t = np.array([0.0, 999.0, 500.5][:batch], np.float32)  # original timesteps, fractional allowed
    y = None if config["num_classes"] is None else rng.randint(0, config["num_classes"], batch).astype(np.int64)
    return x, t, y


def max_rel_err(ours, ref):
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each tiny config: reference model, its .pt file, and the converted directory."""
    out = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        root = tmp_path_factory.mktemp(name)
        model = randomize_(TorchUNet(**config).eval(), seed=i)
        pt = str(root / "model.pt")
        torch.save(model.state_dict(), pt)
        if name == "class_cond_updown_legacy_half_mult":
            # One config goes through the command line exactly as a user runs it.
            cfg_file = root / "config.json"
            cfg_file.write_text(json.dumps(unet.config_to_json(config)))
            run_cli("--input", pt, "--output", str(root / "out"), "--config_json", str(cfg_file), check=True)
        else:
            convert_unet.convert(pt, str(root / "out"), config)
        out[name] = (model, pt, str(root / "out"))
    return out


def run_cli(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "checkpoints_convert.unet", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_matches_guided_diffusion(name, converted):
    model, _, directory = converted[name]
    module, params = unet.load(directory)
    assert module.use_new_attention_order == CONFIGS[name]["use_new_attention_order"]
    x, t, y = inputs(CONFIGS[name])
    ref = torch_forward(model, x, t, y)
    ours = module.apply({"params": params}, x, t, None if y is None else jnp.asarray(y, jnp.int32))
    assert ours.shape == ref.shape == (3, 16, 16, 6)
    assert np.abs(ref).max() > 0.1  # the reference output is not degenerate
    assert max_rel_err(ours, ref) <= RTOL


def test_forward_is_sensitive_to_each_input(converted):
    """Guard against a test that passes because the output ignores its inputs."""
    model, _, directory = converted["class_cond_new_order"]
    module, params = unet.load(directory)
    x, t, y = inputs(CONFIGS["class_cond_new_order"])
    base = np.asarray(module.apply({"params": params}, x, t, jnp.asarray(y, jnp.int32)))
    for changed in [(x * 0.5, t, y), (x, t + 100.0, y), (x, t, (y + 1) % 10)]:
        other = np.asarray(module.apply({"params": params}, changed[0], changed[1], jnp.asarray(changed[2], jnp.int32)))
        assert np.abs(other - base).max() > 1e-3


def test_bfloat16_activations_within_tolerance(converted):
    """bf16 convs/attention (GroupNorm, softmax, head in float32) vs float32: max abs error
    <= 5e-2 x max |float32 output| (bf16 has an 8-bit mantissa, ~4e-3 relative per op)."""
    _, _, directory = converted["scale_shift_updown_legacy"]
    module32, params = unet.load(directory)
    module16, params16 = unet.load(directory, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(params16)[0].dtype == jnp.bfloat16
    x, t, _ = inputs(CONFIGS["scale_shift_updown_legacy"])
    out32 = np.asarray(module32.apply({"params": params}, x, t))
    out16 = module16.apply({"params": params16}, x, t)
    assert out16.dtype == jnp.float32  # the output head runs in float32
    err = max_rel_err(out16, out32)
    assert 0 < err <= BF16_RTOL


def test_converted_files_hold_config_and_every_tensor(converted):
    model, _, directory = converted["class_cond_updown_legacy_half_mult"]
    config, flat = checkpoint.read(directory, "unet", model="unet")
    assert unet.config_from_json(config) == CONFIGS["class_cond_updown_legacy_half_mult"]
    assert len(flat) == len(model.state_dict())
    assert sum(v.size for v in flat.values()) == sum(p.numel() for p in model.parameters())
    # A 3x3 conv is transposed OIHW -> HWIO, a 1x1 Conv1d (attention qkv) becomes a Dense kernel.
    sd = model.state_dict()
    np.testing.assert_array_equal(flat["input_blocks_0_0/kernel"], sd["input_blocks.0.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(flat["input_blocks_3_1/qkv/kernel"], sd["input_blocks.3.1.qkv.weight"].numpy()[..., 0].T)
    np.testing.assert_array_equal(flat["label_emb/embedding"], sd["label_emb.weight"].numpy())


def test_key_renaming_is_mechanical():
    assert convert_unet.flax_key("input_blocks.1.0.in_layers.2.weight", 4) == "input_blocks_1_0/in_layers_2/kernel"
    assert convert_unet.flax_key("input_blocks.1.0.in_layers.0.weight", 1) == "input_blocks_1_0/in_layers_0/scale"
    assert convert_unet.flax_key("output_blocks.5.2.conv.bias", 1) == "output_blocks_5_2/conv/bias"
    assert convert_unet.flax_key("middle_block.1.qkv.weight", 3) == "middle_block_1/qkv/kernel"
    assert convert_unet.flax_key("time_embed.0.weight", 2) == "time_embed_0/kernel"
    assert convert_unet.flax_key("label_emb.weight", 2) == "label_emb/embedding"


# Converter error paths, through the command line as a user meets them.

def test_wrong_models_checkpoint_names_the_keys_and_writes_nothing(converted, tmp_path):
    _, pt, _ = converted["scale_shift_updown_legacy"]  # scale-shift, updown: other keys and shapes
    cfg = tmp_path / "other.json"
    cfg.write_text(json.dumps(unet.config_to_json(CONFIGS["plain_conv_resample_new_order"])))
    out = tmp_path / "out"
    proc = run_cli("--input", pt, "--output", str(out), "--config_json", str(cfg))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "does not match the module" in err and "unexpected" in err and "mis-shaped" in err
    assert "input_blocks_2_0/in_layers_0/scale" in err  # the downsampling ResBlock, absent from the conv-resample model
    assert not out.exists()


def test_real_preset_rejects_a_tiny_checkpoint(converted, tmp_path):
    _, pt, _ = converted["scale_shift_updown_legacy"]
    with pytest.raises(checkpoint.CheckpointMismatchError) as info:
        convert_unet.convert(pt, str(tmp_path / "out"), unet.preset("adm256_uncond"))
    assert info.value.missing and info.value.misshaped
    assert "input_blocks_17_0/in_layers_2/kernel" in info.value.missing
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "text", "missing"])
def test_unreadable_input_is_a_one_line_error(converted, tmp_path, damage):
    _, pt, _ = converted["scale_shift_updown_legacy"]
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        data = open(pt, "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "text":
        bad.write_text("this is not a checkpoint\n")
    proc = run_cli("--input", str(bad), "--output", str(tmp_path / "out"), "--config_json", str(_tiny_json(tmp_path)))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: ") and str(bad) in err
    assert not (tmp_path / "out").exists()


def _tiny_json(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(unet.config_to_json(CONFIGS["scale_shift_updown_legacy"])))
    return cfg


def test_existing_output_is_kept_unless_overwrite(converted, tmp_path):
    _, pt, _ = converted["scale_shift_updown_legacy"]
    cfg = _tiny_json(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "unet.json").write_text("precious")
    proc = run_cli("--input", pt, "--output", str(out), "--config_json", str(cfg))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "unet.json").read_text() == "precious"
    assert not (out / "unet.safetensors").exists()
    run_cli("--input", pt, "--output", str(out), "--config_json", str(cfg), "--overwrite", check=True)
    assert unet.load(str(out))[0].use_scale_shift_norm


def test_load_reports_missing_files_and_damaged_weights(converted, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoints_convert.unet"):
        unet.load(str(tmp_path))
    _, _, directory = converted["scale_shift_updown_legacy"]
    config, flat = checkpoint.read(directory, "unet", model="unet")
    del flat["out_2/bias"]
    flat["out_0/scale"] = flat["out_0/scale"][:-1]
    checkpoint.save(str(tmp_path), "unet", flat, config, model="unet")
    with pytest.raises(checkpoint.CheckpointMismatchError, match="out_2/bias") as info:
        unet.load(str(tmp_path))
    assert info.value.missing == ["out_2/bias"]
    assert info.value.misshaped == [("out_0/scale", (31,), (32,))]


def test_remat_policies_keep_values_gradients_and_parameters(converted):
    """Rematerialisation changes memory, not maths: same params tree, output and input gradient
    within 1e-5 x scale (XLA may fuse the recomputation differently)."""
    _, _, directory = converted["scale_shift_updown_legacy"]
    base, params = unet.load(directory)
    x, t, _ = inputs(CONFIGS["scale_shift_updown_legacy"])

    def value_and_grad(module):
        return jax.jit(jax.value_and_grad(lambda x: jnp.sum(module.apply({"params": params}, x, t) ** 2)))(x)

    want_value, want_grad = value_and_grad(base)
    for policy in ("dots", "blocks"):
        module, _ = unet.load(directory, remat=policy)
        assert jax.tree_util.tree_structure(unet.param_shapes(module)) == jax.tree_util.tree_structure(params)
        value, grad = value_and_grad(module)
        assert abs(float(value - want_value)) <= 1e-5 * abs(float(want_value))
        assert max_rel_err(grad, np.asarray(want_grad)) <= 1e-5
    with pytest.raises(ValueError, match="remat policy"):
        unet.UNetModel(**CONFIGS["scale_shift_updown_legacy"], remat="sometimes").apply({"params": params}, x, t)
