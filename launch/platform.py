"""Where the launch programs run when JAX's CUDA plugin is installed but no GPU is usable.

`pip install -e ".[cuda]"` on a machine without an NVIDIA GPU (or without its driver) installs a
plugin that fails as JAX starts: a Python traceback from the plugin's version check and lines
from its C++ libraries, then a fall back to the CPU. The programs ask the driver first, as the
plugin would (`cuda_problem`), and where it offers no GPU they choose the CPU before JAX is
imported (`settle`, called by launch/cli.py's `program`), hold the plugin's start-up lines back,
and say what happened in one line of their own (launch/runtime.py `check_device`).

An explicit JAX_PLATFORMS is left alone.
"""

from __future__ import annotations

import contextlib
import os
import sys

# Why the CUDA plugin would find no GPU, once `settle` has chosen the CPU for that reason.
NO_GPU: str | None = None

# What the CUDA plugin's libraries print on stderr (from C++) as JAX loads them without a GPU.
CUDA_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


def settle() -> None:
    """Choose the CPU (JAX_PLATFORMS=cpu) where a CUDA plugin is installed but no GPU is usable,
    before JAX is imported, and import it with the plugin's start-up lines held back; `NO_GPU`
    says why. Does nothing where JAX_PLATFORMS is set or JAX is already imported."""
    global NO_GPU
    if os.environ.get("JAX_PLATFORMS") or "jax" in sys.modules:
        return
    NO_GPU = unusable_cuda()
    if NO_GPU:
        os.environ["JAX_PLATFORMS"] = "cpu"
        with held_noise():
            import jax  # noqa: F401  the plugin's libraries load here


def initialize_quietly() -> None:
    """Initialise JAX's backends (the plugin is discovered then) with its start-up lines held back."""
    import jax

    with held_noise():
        jax.devices()


@contextlib.contextmanager
def held_noise():
    """Hold what is written to stderr (file descriptor 2, where C++ libraries write) meanwhile,
    then pass on every line but CUDA_NOISE."""
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        terminal = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(terminal, 2)
            os.close(terminal)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines():
                if not any(noise in line for noise in CUDA_NOISE):
                    print(line, file=sys.stderr)


def cuda_plugin() -> str | None:
    """The installed CUDA plugin of JAX as its extra is spelled (jax[cuda12]), or None."""
    from importlib import metadata

    for major in ("12", "13"):
        try:
            metadata.version(f"jax-cuda{major}-plugin")
        except metadata.PackageNotFoundError:
            continue
        return f"jax[cuda{major}]"
    return None


def unusable_cuda() -> str | None:
    """Why JAX's installed CUDA plugin would find no GPU, or None when no plugin is installed or
    a GPU is there."""
    plugin = cuda_plugin()
    if plugin is None:
        return None
    problem = cuda_problem()
    return None if problem is None else f"{plugin} is installed but no GPU is usable here ({problem})"


def cuda_problem(library: str = "libcuda.so.1") -> str | None:
    """What keeps the CUDA driver `library` from offering a GPU (asked as the plugin asks it:
    cuInit, then the device count), or None."""
    import ctypes

    try:
        driver = ctypes.CDLL(library)
    except OSError:
        return f"no NVIDIA driver: {library} not found"
    status = driver.cuInit(0)
    if status != 0:
        name = ctypes.c_char_p()
        driver.cuGetErrorName(status, ctypes.byref(name))
        return f"cuInit error {status}" + (f": {name.value.decode()}" if name.value else "")
    count = ctypes.c_int(0)
    if driver.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "the driver lists no GPU"
    return None
