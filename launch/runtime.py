"""Process set-up shared by the launch programs: multi-host start, compilation cache, errors."""

from __future__ import annotations

import contextlib
import os
import sys


def setup(distributed: bool, compilation_cache_dir: str | None) -> None:
    """Start jax.distributed when asked (or on a TPU pod, where JAX finds its peers itself) and
    point XLA's persistent compilation cache at `compilation_cache_dir`."""
    import jax
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:  # JAX's INFO lines (e.g. TPU probing) are noise here
        logging.set_verbosity(logging.WARNING)
    if distributed or _on_tpu_pod():
        jax.distributed.initialize()
    if compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(compilation_cache_dir))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def _on_tpu_pod() -> bool:
    # TPU VMs of a multi-host slice list their workers here; a single host lists one.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


@contextlib.contextmanager
def user_errors():
    """Turn problems with the user's inputs into one line on stderr and exit status 1."""
    from checkpoints_convert.common import ConversionError

    try:
        yield
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
