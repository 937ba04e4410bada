"""Convert LPIPS (VGG16 trunk, v0.1 linear heads) to bdjax's safetensors format.

    python -m checkpoints_convert.lpips --vgg=vgg16-397923af.pth --output=DIR [--lin=vgg.pth] [--overwrite]

--vgg is torchvision's ImageNet VGG16 state dict; only its `features.N` convolutions are used,
its `classifier.*` keys are dropped on purpose (LPIPS taps end at relu5_3). --lin is the lpips
package's v0.1 `weights/v0.1/vgg.pth` (the default, found in the installed lpips package).
Writes DIR/lpips.safetensors and DIR/lpips.json. Both files are read with
`torch.load(weights_only=True)` and checked key by key and shape by shape against the Flax module
before anything is written.
"""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
from absl import app, flags

from bdjax import checkpoint
from bdjax.models import lpips
from checkpoints_convert.common import ConversionError, cli, conv_kernel, read_torch_state_dict

_FEATURES = re.compile(r"features\.(\d+)\.(weight|bias)")
_LIN = re.compile(r"lin(\d+)\.model\.1\.weight")  # model.0 is lpips' parameter-free Dropout


def default_lin_path() -> str:
    """`weights/v0.1/vgg.pth` inside the installed lpips package (located without importing it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError("the lpips package is not installed: pip install lpips, "
                              "or pass --lin=PATH to its weights/v0.1/vgg.pth")
    path = os.path.join(list(spec.submodule_search_locations)[0], "weights", "v0.1", "vgg.pth")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} not found in the installed lpips package; pass --lin=PATH")
    return path


def _kernel(array: np.ndarray) -> np.ndarray:
    # A wrong-rank tensor is passed through unchanged so validation reports it as mis-shaped.
    return conv_kernel(array) if array.ndim == 4 else array


def convert_vgg(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """torchvision VGG16 `features.N.{weight,bias}` -> `net/features_N/{kernel,bias}`.

    `classifier.*` is dropped; any other key keeps its torch name, so validation lists it as
    unexpected instead of it vanishing silently.
    """
    flat = {}
    for key, value in state_dict.items():
        if key.startswith("classifier."):
            continue
        match = _FEATURES.fullmatch(key)
        if match is None:
            flat[key] = value
        elif match[2] == "weight":
            flat[f"net/features_{match[1]}/kernel"] = _kernel(value)
        else:
            flat[f"net/features_{match[1]}/bias"] = value
    return flat


def convert_lin(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lpips `linK.model.1.weight` (1, C, 1, 1) -> `linK/kernel` (1, 1, C, 1)."""
    flat = {}
    for key, value in state_dict.items():
        match = _LIN.fullmatch(key)
        flat[f"lin{match[1]}/kernel" if match else key] = _kernel(value) if match else value
    return flat


def convert(vgg_path: str, output_dir: str, lin_path: str | None = None,
            overwrite: bool = False) -> tuple[str, str]:
    """Read both files, rename, validate against `jax.eval_shape` of the module, then write."""
    checkpoint.ensure_writable(output_dir, lpips.CHECKPOINT_NAME, overwrite)
    lin_path = lin_path or default_lin_path()
    vgg = convert_vgg(read_torch_state_dict(vgg_path))
    lin = convert_lin(read_torch_state_dict(lin_path))
    flat = {**vgg, **lin}
    checkpoint.check_params(flat, lpips.param_shapes(lpips.LPIPS()),
                            what=f"{vgg_path} + {lin_path}")
    source = f"{os.path.basename(vgg_path)} + {os.path.basename(lin_path)}"
    return checkpoint.save(output_dir, lpips.CHECKPOINT_NAME, flat, lpips.CONFIG, model="lpips",
                           source=source, overwrite=overwrite)


FLAGS = flags.FLAGS


def define_flags() -> None:
    # Defined only when run as a program: other converters define --output and --overwrite too,
    # and absl refuses a flag defined by two modules imported into one process (e.g. pytest).
    flags.DEFINE_string("vgg", None, "torchvision VGG16 state dict (vgg16-397923af.pth).")
    flags.DEFINE_string("lin", None, "lpips v0.1 linear heads (vgg.pth); default: the one "
                        "shipped inside the installed lpips package.")
    flags.DEFINE_string("output", None, "Directory for lpips.safetensors and lpips.json.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing converted checkpoint.")


@cli
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.vgg or not FLAGS.output:
        raise ConversionError("--vgg and --output are required")
    weights, meta = convert(FLAGS.vgg, FLAGS.output, FLAGS.lin, FLAGS.overwrite)
    print(f"wrote {weights} and {meta}")


if __name__ == "__main__":
    from checkpoints_convert.common import run_program

    run_program(define_flags, main)
