"""bdjax.weights: where converted weights live and which models a run needs, without the converters."""

import os
import subprocess
import sys

import pytest

from bdjax import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("image_size,with_lpips,want", [
    (256, False, ("adm256", "clip")),
    (256, True, ("adm256", "clip", "lpips")),
    (512, False, ("adm512", "clip")),
    (512, True, ("adm512", "clip", "lpips")),
    ("512", True, ("adm512", "clip", "lpips")),  # a flag's string value
])
def test_needed_names_the_unet_for_the_size_first_then_clip_and_lpips_when_used(image_size, with_lpips, want):
    assert weights.needed(image_size, with_lpips) == want
    assert set(want) <= set(weights.MODELS)


def test_needed_refuses_a_size_without_a_unet():
    with pytest.raises(ValueError, match="no UNet for image size 128; choose from \\[256, 512\\]"):
        weights.needed(128, False)


def test_converted_paths_and_directories(tmp_path):
    cache = str(tmp_path)
    assert weights.converted_paths(cache, "adm256") == (f"{cache}/unet.safetensors", f"{cache}/unet.json")
    assert weights.converted_paths(cache, "adm512") == (f"{cache}/adm512/unet.safetensors", f"{cache}/adm512/unet.json")
    assert weights.converted_paths(cache, "lpips") == (f"{cache}/lpips.safetensors", f"{cache}/lpips.json")
    assert weights.model_dir(cache, "clip") == os.path.join(cache, "")
    assert weights.model_dir(cache, "adm512") == f"{cache}/adm512"


def test_is_converted_needs_both_files(tmp_path):
    safetensors, config = weights.converted_paths(str(tmp_path), "clip")
    assert not weights.is_converted(str(tmp_path), "clip")
    open(safetensors, "wb").close()
    assert not weights.is_converted(str(tmp_path), "clip")
    open(config, "w").close()
    assert weights.is_converted(str(tmp_path), "clip")
    assert not weights.is_converted(str(tmp_path), "adm512")  # its own directory


def test_cache_dir_flag_then_env_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.CACHE_ENV, raising=False)
    assert weights.cache_dir_from() == str(tmp_path / "home" / ".cache" / "bdjax")
    assert weights.compilation_cache_dir() == str(tmp_path / "home" / ".cache" / "bdjax" / "xla_cache")
    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path / "env"))
    assert weights.cache_dir_from() == str(tmp_path / "env")
    assert weights.compilation_cache_dir() == str(tmp_path / "env" / "xla_cache")
    assert weights.cache_dir_from(str(tmp_path / "flag")) == str(tmp_path / "flag")
    monkeypatch.chdir(tmp_path)
    assert weights.cache_dir_from("relative") == str(tmp_path / "relative")  # always absolute


def test_launch_compilation_cache_follows_the_registry(tmp_path, monkeypatch):
    from launch import runtime

    monkeypatch.setenv("BDJAX_CACHE", str(tmp_path / "env"))
    assert runtime.compilation_cache_dir(None) == weights.compilation_cache_dir()
    assert runtime.compilation_cache_dir(str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_fetch_uses_the_registry_and_knows_how_to_make_every_model():
    from checkpoints_convert import fetch

    assert fetch.MODELS is weights.MODELS and fetch.DEFAULT_MODELS == weights.DEFAULT_MODELS
    assert fetch.cache_dir_from is weights.cache_dir_from and fetch.is_converted is weights.is_converted
    assert set(fetch.RECIPES) == set(weights.MODELS)
    assert all(key in fetch.SOURCES for recipe in fetch.RECIPES.values() for key in recipe.files)
    assert [n for n, r in fetch.RECIPES.items() if r.unet_config] == [n for n, m in weights.MODELS.items()
                                                                       if m.checkpoint == "unet"]


def test_the_registry_and_the_launch_runtime_load_neither_converters_nor_results_writer():
    code = ("import sys, bdjax.weights, bdjax.checkpoint, launch.runtime; "
            "print(sorted(m for m in sys.modules if m in ('checkpoints_convert.fetch', 'bdjax.outputs', 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
