"""Convert an OpenAI guided-diffusion UNet checkpoint (.pt) to bdjax's safetensors format.

    python -m checkpoints_convert.unet --input=256x256_diffusion_uncond.pt --output=DIR \
        [--preset=adm256_uncond | --config_json=FILE] [--overwrite]

Writes DIR/unet.safetensors and DIR/unet.json. The checkpoint is read with
`torch.load(weights_only=True)` and checked key by key and shape by shape
against the Flax module before anything is written.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from bdjax import checkpoint
from bdjax.models import unet
from checkpoints_convert.common import (ConversionError, cli, conv_kernel, dense_kernel, module_path,
                                        read_json_object, read_torch_state_dict)


def flax_key(torch_key: str, ndim: int) -> str:
    """`input_blocks.1.0.in_layers.2.weight` -> `input_blocks_1_0/in_layers_2/kernel`."""
    *modules, leaf = torch_key.split(".")
    merged = module_path(modules)
    if leaf == "weight":
        if merged and merged[-1] == "label_emb":
            leaf = "embedding"
        else:
            leaf = "scale" if ndim == 1 else "kernel"  # 1-D weights are GroupNorm's
    return checkpoint.SEP.join(merged + [leaf])


def flax_value(array: np.ndarray, key: str) -> np.ndarray:
    if not key.endswith("/kernel"):
        return array
    if array.ndim == 4:
        return conv_kernel(array)
    return dense_kernel(array)  # Linear (O, I) and the attention's 1x1 Conv1d (O, I, 1)


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """guided-diffusion state dict (numpy) -> flat Flax params, before validation."""
    flat = {}
    for key, value in state_dict.items():
        new = flax_key(key, value.ndim)
        flat[new] = flax_value(value, new)
    return flat


def read_config(path: str) -> dict:
    """UNetModel fields from a JSON file (--config_json); each problem one error naming the file."""
    config = read_json_object(path, "an object of UNetModel fields", "fix it, or pass --preset instead")
    try:
        return unet.config_from_json(config)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from None


def convert(input_path: str, output_dir: str, config: dict, overwrite: bool = False) -> tuple[str, str]:
    """Read, rename, validate against `jax.eval_shape` of the module, then write."""
    checkpoint.ensure_writable(output_dir, unet.CHECKPOINT_NAME, overwrite)
    module = unet.UNetModel(**unet.config_from_json(unet.config_to_json(config)))
    flat = convert_state_dict(read_torch_state_dict(input_path))
    checkpoint.check_params(flat, unet.param_shapes(module), what=input_path)
    return checkpoint.save(output_dir, unet.CHECKPOINT_NAME, flat, unet.config_to_json(config),
                           model="unet", source=os.path.basename(input_path), overwrite=overwrite)


FLAGS = flags.FLAGS


def define_flags():
    # Only when run as a program: the converters share flag names and may be imported together.
    flags.DEFINE_string("input", None, "guided-diffusion checkpoint (.pt state dict).")
    flags.DEFINE_string("output", None, "Directory for unet.safetensors and unet.json.")
    flags.DEFINE_enum("preset", "adm256_uncond", list(unet.PRESETS), "The UNet's named configuration.")
    flags.DEFINE_string("config_json", None, "JSON file of UNetModel fields; replaces --preset.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing converted checkpoint.")


@cli
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.input or not FLAGS.output:
        raise ConversionError("--input and --output are required")
    config = read_config(FLAGS.config_json) if FLAGS.config_json else unet.preset(FLAGS.preset)
    weights, meta = convert(FLAGS.input, FLAGS.output, config, FLAGS.overwrite)
    print(f"wrote {weights} and {meta}")


if __name__ == "__main__":
    from checkpoints_convert.common import run_program

    run_program(define_flags, main)
