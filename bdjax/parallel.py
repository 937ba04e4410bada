"""The one place where shardings are decided: data parallel over every device.

A 1-D Mesh with axis "data" spans all devices of all processes. Network parameters and the
per-edit inputs (image, mask, text embedding) are replicated; the sample batch (sample ids, and
everything the sampler derives from them) is split along "data". On several hosts each process
supplies its own slice of the batch (`jax.make_array_from_process_local_data`) and reads back
only the results its devices hold.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def over_samples(sampler, mesh: Mesh):
    """Run `sampler(params, init, mask, text_embed, sample_ids, seeds)` on every device, each on
    its share of the per-sample inputs; the params are replicated. Each device runs the same
    program as a single device would for that many samples."""
    batch = P(AXIS)
    return jax.shard_map(sampler, mesh=mesh, in_specs=(P(), batch, batch, batch, batch, batch), out_specs=batch)


def make_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
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
    sharding = replicated(mesh)
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
