"""Test-wide settings: CPU only and a persistent XLA compilation cache; fixtures several files share."""

import os

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_cache = os.environ.get("BDJAX_TEST_JAX_CACHE", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_cache))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# The launch programs' in-process tests (tests/launch_helpers.py): their flags and an input image.

@pytest.fixture(scope="module")
def program_flags():
    """The flags of launch/extrapolate.py (which include launch/edit.py's) and launch/edit.py's
    reference spellings, defined once."""
    from absl import flags

    from launch import edit, extrapolate

    if "strip" not in flags.FLAGS:
        extrapolate.define_flags()
    if "output_path" not in flags.FLAGS:  # (some tests define extrapolate's flags alone)
        edit.define_reference_flags()
    yield flags.FLAGS
    flags.FLAGS.unparse_flags()


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    from launch_helpers import photo

    path = tmp_path / "img.png"
    Image.fromarray(photo()).save(path)
    return path
