"""The one place where shardings are decided and processes meet: data parallel over every device.

A 1-D Mesh with axis "data" spans all devices of all processes. Network parameters are
replicated on every device; every per-sample input (image, mask, text embedding, sample id,
seed) and everything the sampler derives from them is split along "data" (`over_samples`), so
each device computes only its share of the samples. On several hosts each process supplies its
own slice of the batch (`jax.make_array_from_process_local_data`) and reads back only the
results its devices hold; `barrier` and `allgather` are the host-side meeting points, no-ops
(or trivial) on one process.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def over_samples(fn, mesh: Mesh, replicated: tuple[int, ...] = (0,)):
    """Run `fn` on every device, each on its share of the samples: the positional arguments listed
    in `replicated` (by default the first, the params) are whole on every device, every other
    argument and every output is split along its first axis. Each device runs the same program
    as a single device would for that many samples."""
    def sharded(*args):
        specs = tuple(P() if i in replicated else P(AXIS) for i in range(len(args)))
        return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(AXIS))(*args)
    sharded.__name__ = getattr(fn, "__name__", sharded.__name__)  # names the compiled program (and cache entry)
    return sharded


def jit_over_samples(fn, mesh: Mesh, num_args: int, replicated: tuple[int, ...] = (0,)):
    """`over_samples(fn)` jit-compiled with its shardings stated, so that outputs fed back as
    inputs (the sampler's state) hit the same compiled program."""
    shardings = tuple(replicated_sharding(mesh) if i in replicated else batch_sharded(mesh) for i in range(num_args))
    return jax.jit(over_samples(fn, mesh, replicated), in_shardings=shardings, out_shardings=batch_sharded(mesh))


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(AXIS))


def padded_batch(batch_size: int, num_devices: int) -> int:
    """The smallest multiple of the device count that holds `batch_size` samples."""
    return -(-batch_size // num_devices) * num_devices


def spread(rows: np.ndarray, global_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Lay `rows` out over a padded batch at evenly spaced positions, so that the padding does not
    pile up on the last devices (or on the last processes, which would then compute nothing).
    Returns (layout, valid): the row at each batch position (padding repeats rows[0]) and which
    positions are real."""
    positions = np.arange(len(rows)) * global_batch // len(rows)
    layout = np.full(global_batch, rows[0])
    layout[positions] = rows
    valid = np.zeros(global_batch, bool)
    valid[positions] = True
    return layout, valid


def process_slice(global_batch: int, mesh: Mesh) -> slice:
    """The rows of a batch-sharded array that this process's devices hold."""
    local = global_batch // jax.process_count()
    start = jax.process_index() * local
    return slice(start, start + local)


def put_replicated(tree, mesh: Mesh):
    """Place a pytree on every device (on each host from its own identical copy)."""
    sharding = replicated_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def put_batch(local_rows, mesh: Mesh, global_batch: int):
    """A batch-sharded global array from this process's rows (all rows on one host)."""
    sharding = batch_sharded(mesh)
    local_rows = np.asarray(local_rows)
    if jax.process_count() == 1:
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, local_rows, (global_batch, *local_rows.shape[1:]))


def local_rows(array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called `name`; nothing on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def allgather(x) -> np.ndarray:
    """`x` (an array or scalar of the same shape on every process) stacked over processes, in
    process order: shape (process_count, *x.shape). Also a barrier."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))
