"""Where converted weights live, and which of them a run needs.

Converted networks are kept in one cache directory DIR: the one a program is given, else
$BDJAX_CACHE, else ~/.cache/bdjax. Each model is NAME.safetensors plus NAME.json (see
bdjax/checkpoint.py) in its directory:

    DIR/unet.{safetensors,json}          ADM 256x256 unconditional   (model "adm256")
    DIR/clip.{safetensors,json}          CLIP ViT-B/16               (model "clip")
    DIR/lpips.{safetensors,json}         LPIPS VGG16 v0.1            (model "lpips")
    DIR/adm512/unet.{safetensors,json}   ADM 512x512 class-cond.     (model "adm512")

Compiled programs are kept in DIR/xla_cache/ by default. Obtaining the files (downloading and
converting) is checkpoints_convert.fetch's job; this module only names them, so reading the
cache needs neither torch nor the converters.
"""

from __future__ import annotations

import dataclasses
import os

CACHE_ENV = "BDJAX_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "bdjax")
COMPILATION_CACHE_SUBDIR = "xla_cache"


@dataclasses.dataclass(frozen=True)
class Model:
    """A converted network: the NAME of its NAME.safetensors + NAME.json, and their directory."""

    checkpoint: str
    subdir: str = ""  # relative to the cache directory


MODELS: dict[str, Model] = {
    "adm256": Model("unet"),
    # A directory holds one unet, so the optional 512 model gets its own.
    "adm512": Model("unet", subdir="adm512"),
    "clip": Model("clip"),
    "lpips": Model("lpips"),
}
DEFAULT_MODELS = ("adm256", "clip", "lpips")
UNET_MODELS = {256: "adm256", 512: "adm512"}  # image size -> the UNet made for it


def cache_dir_from(flag: str | None = None) -> str:
    """The cache directory, absolute: `flag` wins over $BDJAX_CACHE, which wins over ~/.cache/bdjax."""
    chosen = flag or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR
    return os.path.abspath(os.path.expanduser(chosen))


def compilation_cache_dir() -> str:
    """Where compiled programs are kept unless a program is told otherwise: inside the cache."""
    return os.path.join(cache_dir_from(None), COMPILATION_CACHE_SUBDIR)


def model_dir(cache_dir: str, name: str) -> str:
    return os.path.join(cache_dir, MODELS[name].subdir)


def converted_paths(cache_dir: str, name: str) -> tuple[str, str]:
    """(NAME.safetensors, NAME.json) of model `name` in `cache_dir`."""
    from bdjax import checkpoint  # imports jax: not needed to import the registry

    return checkpoint.paths(model_dir(cache_dir, name), MODELS[name].checkpoint)


def is_converted(cache_dir: str, name: str) -> bool:
    return all(os.path.isfile(p) for p in converted_paths(cache_dir, name))


def unet_model(image_size: int) -> str:
    """The UNet model that edits images of `image_size` pixels."""
    try:
        return UNET_MODELS[int(image_size)]
    except KeyError:
        raise ValueError(f"no UNet for image size {image_size}; choose from {sorted(UNET_MODELS)}") from None


def needed(image_size: int, with_lpips: bool) -> tuple[str, ...]:
    """The models a run at `image_size` needs, UNet first: the UNet, CLIP, and LPIPS when a
    guidance term uses it."""
    return (unet_model(image_size), "clip") + (("lpips",) if with_lpips else ())
