"""Data parallel sampling: the same (seed, sample) gives the same result on 1 and on 8 devices.

Eight CPU devices come from XLA_FLAGS=--xla_force_host_platform_device_count=8 in a subprocess
(the flag must be set before JAX starts). The batch is uneven: 5 samples in batches of 3 over 8
devices, so every batch is padded and the padding dropped.

4 devices and 8 devices (one sample per device in both) give identical floats: the same
partitioned per-device program. One device against eight: with a single device XLA skips its SPMD
partitioner pipeline (it runs only for more than one partition), whose early clean-up passes
(call inlining, CSE) change later fusion decisions and so FMA contraction and accumulation order.
Floats then differ in the last bits (~1e-6), so pixels may differ by one uint8 level and distances
by 1e-5 relative; ranking order and sample ids must be equal.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from bdjax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
import numpy as np, jax
from bdjax import smoke
from bdjax.editor import BlendedDiffusion
nets = smoke.networks(with_lpips=False)
editor = BlendedDiffusion(nets["unet"], nets["clip"])
assert editor.mesh.devices.size == len(jax.devices()) == int(sys.argv[2])
rng = np.random.RandomState(0)
photo = rng.randint(0, 256, (80, 80, 3), dtype=np.uint8)
mask = np.zeros((80, 80), np.uint8); mask[20:60, 20:60] = 255
options = dict(smoke.OPTIONS, skip_timesteps=21, batch_size=3)
result = editor.edit(photo, mask, "a red ball", num_samples=5, seed=1, progress=False, **options)
np.savez(sys.argv[1], images=result.images, ids=result.sample_ids, distances=result.distances)
"""


def run(devices, path):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(devices)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(path)


def test_eight_devices_match_four_exactly_and_one_within_a_level(tmp_path):
    one, four, eight = run(1, tmp_path / "one.npz"), run(4, tmp_path / "four.npz"), run(8, tmp_path / "eight.npz")
    for key in ("ids", "images", "distances"):
        np.testing.assert_array_equal(four[key], eight[key], err_msg=key)
    assert sorted(one["ids"]) == list(range(5))
    np.testing.assert_array_equal(one["ids"], eight["ids"])  # same ranking
    assert np.abs(one["images"].astype(int) - eight["images"]).max() <= 1
    np.testing.assert_allclose(one["distances"], eight["distances"], rtol=1e-5)
    assert len({im.tobytes() for im in one["images"]}) == 5  # the samples differ from each other


@pytest.mark.parametrize("batch,devices,want", [(4, 1, 4), (3, 8, 8), (9, 8, 16), (8, 8, 8)])
def test_padded_batch(batch, devices, want):
    assert parallel.padded_batch(batch, devices) == want


def test_spread_places_rows_evenly_over_the_padded_batch():
    layout, valid = parallel.spread(np.arange(10, 14), global_batch=8)
    # With 8 devices (or 2 processes x 4) every process gets two real rows, not one process all four.
    np.testing.assert_array_equal(layout, [10, 10, 11, 10, 12, 10, 13, 10])
    np.testing.assert_array_equal(valid, [1, 0, 1, 0, 1, 0, 1, 0])
    layout, valid = parallel.spread(np.arange(3), global_batch=8)
    np.testing.assert_array_equal(np.flatnonzero(valid), [0, 2, 5])
    layout, valid = parallel.spread(np.arange(8), global_batch=8)
    np.testing.assert_array_equal(layout, np.arange(8))
    assert valid.all()


def test_barrier_and_allgather_on_one_process():
    parallel.barrier("nothing to wait for")
    gathered = parallel.allgather(np.arange(3, dtype=np.int32))
    assert gathered.shape == (1, 3) and gathered.dtype == np.int32
    np.testing.assert_array_equal(gathered[0], [0, 1, 2])
    scalar = parallel.allgather(np.float32(0.5))
    assert scalar.shape == (1,) and scalar[0] == np.float32(0.5)
