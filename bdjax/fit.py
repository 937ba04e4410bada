"""batch_size="auto": the largest batch whose compiled sampler fits a device's memory.

On a GPU or TPU the editor's sampler (editor.CompiledSampler: the begin, advance and end
programs) is compiled for a few candidate per-device batches, for XLA's memory analysis only
(nothing runs), and the largest batch whose peak program fits the device's memory less `MARGIN`
is chosen: per-device batches 1 and 2 are compiled, the largest that fits is predicted from them
linearly, and that prediction and the next size are compiled to check it (`search`); where the
prediction was wrong, a second prediction, then bisection or doubling. No candidate exceeds what the edit needs (its
samples, over the devices). The decision is kept per configuration (`config_key`: the networks,
the sampling options, the devices, the memory limit, the margin, JAX's version) in memory and, given
a directory (the launch programs': their compilation cache), in a small JSON file there, so that
later runs decide at once. On a CPU, or where the memory limit is unknown, auto is the default
batch (EditOptions' 4), and nothing is compiled.

The shapes each program is compiled for (`program_arguments`) and the memory figures of a compiled
program (`memory`) are those bench/compile_report.py reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bdjax import parallel
from bdjax.errors import OptionError
from bdjax.files import atomic_write
from bdjax.options import DEFAULT_BATCH

GIB = 2 ** 30
# The share of a device's memory limit that auto leaves unplanned: XLA's memory analysis counts the
# compiled program's buffers only, not the runtime's own allocations, the libraries' workspaces
# (cuDNN, cuBLAS) or the allocator's fragmentation, so a batch planned to the last byte can still
# run out of memory.
MARGIN = 0.10
# Per chip, the memory (HBM) of a device whose runtime does not report its limit (memory_stats()),
# by device_kind: the vendors' published figures. GPUs report theirs (JAX's preallocated share).
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,  # v5e
    "TPU v5": 95 * GIB,  # v5p
    "TPU v6 lite": 32 * GIB,  # v6e
    "NVIDIA H100": 80 * GIB,  # also "NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe" (memory_limit)
    "NVIDIA H200": 150754820096,  # 141 GB
}
PROGRAMS = ("begin", "advance", "end")  # the sampler's programs (editor.CompiledSampler)
CACHE_FILE = "bdjax_batch_size.json"  # the decisions, in the directory given (the compilation cache)
_FORMAT = 1  # the JSON file's layout; a file of another is ignored and rewritten

_DECISIONS: dict[str, dict] = {}  # this process's decisions, by config_key


# ----------------------------------------------------------------------------------- the device

def accelerator(device) -> bool:
    """Whether `device` is a GPU or TPU (auto searches there; on a CPU it keeps the default)."""
    return device.platform != "cpu"


def memory_limit(device) -> int | None:
    """The bytes one program may use on `device`: the runtime's limit (memory_stats()'s
    bytes_limit; on GPUs JAX's preallocated share), else the chip's HBM by its kind (HBM_BYTES),
    else None (unknown)."""
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  backends without memory statistics raise rather than return None
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return hbm_bytes(device.device_kind)


def hbm_bytes(kind: str) -> int | None:
    """A chip's HBM by its device_kind (HBM_BYTES; an NVIDIA kind by its model's prefix, e.g.
    "NVIDIA H100 80GB HBM3"), None if it is not in the table."""
    if kind in HBM_BYTES:
        return HBM_BYTES[kind]
    return next((size for name, size in HBM_BYTES.items() if name.startswith("NVIDIA") and kind.startswith(name)),
                None)


def local_device(mesh):
    """The first of `mesh`'s devices that this process drives (whose memory it can ask about)."""
    return next(d for d in mesh.devices.flat if d.process_index == jax.process_index())


# ----------------------------------------------------------------------------------- compiling

def input_specs(size: int, embed_dim: int, batch: int, mesh) -> tuple:
    """The sampler's per-sample inputs (init, mask, text_embed, sample_ids, seeds) for a global
    batch of `batch` rows, as shapes split over `mesh` as the editor splits them."""
    sharded = parallel.batch_sharded(mesh)
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharded)  # noqa: E731
    return (spec((batch, size, size, 3), jnp.float32), spec((batch, size, size, 1), jnp.float32),
            spec((batch, embed_dim), jnp.float32), spec((batch,), jnp.int32), spec((batch,), jnp.int32))


def program_arguments(sampler, params, size: int, embed_dim: int, batch: int, mesh, steps: int | None = None) -> dict:
    """{program name: its arguments} of a CompiledSampler `sampler` for a global batch: `params`
    (arrays, or shapes with their replicated sharding), the inputs (`input_specs`), the state the
    begin program makes (its shapes, split over the mesh) and a chunk of step indices (`steps`
    of them; by default the sampler's steps per call)."""
    inputs = input_specs(size, embed_dim, batch, mesh)
    sharded = parallel.batch_sharded(mesh)
    state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharded),
                         jax.eval_shape(sampler.begin, params, *inputs))
    chunk = jax.ShapeDtypeStruct((steps,) if steps else sampler.chunks[0].shape, jnp.int32,
                                 sharding=parallel.replicated_sharding(mesh))
    return {"begin": (params, *inputs), "advance": (params, state, chunk), "end": (params, state)}


def compile_programs(sampler, params, size: int, embed_dim: int, batch: int, mesh, which=PROGRAMS,
                     steps: int | None = None) -> dict:
    """Lower and compile the sampler's programs `which` for a global batch, without running them:
    {name: (compiled, seconds)}; `steps`: the advance program's steps per call."""
    arguments = program_arguments(sampler, params, size, embed_dim, batch, mesh, steps)
    out = {}
    for name in which:
        start = time.perf_counter()
        compiled = getattr(sampler, name).lower(*arguments[name]).compile()
        out[name] = (compiled, time.perf_counter() - start)
    return out


def memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program, per device: argument, output, temp, alias and
    generated_code bytes, and total_bytes, what the program occupies while it runs (arguments +
    outputs + temporaries + code, less the outputs that reuse an argument's buffer)."""
    stats = compiled.memory_analysis()
    fields = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
              "temp": "temp_size_in_bytes", "alias": "alias_size_in_bytes",
              "generated_code": "generated_code_size_in_bytes"}
    figures = {f"{k}_bytes": int(getattr(stats, v, 0) or 0) for k, v in fields.items()}
    figures["total_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] + figures["temp_bytes"]
                              + figures["generated_code_bytes"] - figures["alias_bytes"])
    return figures


def footprint(sampler, params, size: int, embed_dim: int, batch: int, mesh) -> int:
    """The bytes per device the sampler needs for a global batch of `batch` rows: the largest
    total_bytes of its three programs (compiled for memory analysis only)."""
    compiled = compile_programs(sampler, params, size, embed_dim, batch, mesh)
    return max(memory(program)["total_bytes"] for program, _ in compiled.values())


# ----------------------------------------------------------------------------------- searching

def largest(ok: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with ok(n), for an ok that holds up to some n and not beyond
    (0 if ok(1) fails): doubling from 1, then bisection."""
    best, nxt = 0, 1
    while nxt <= limit and ok(nxt):
        best, nxt = nxt, nxt * 2
    return _bisect(ok, best, min(nxt, limit + 1))


def _between(fits: Callable[[int], bool], seen: dict[int, int], budget: int, good: int, bad: int) -> int:
    """The largest n in [good, bad) that fits, given that good fits and bad does not (both
    measured, in `seen`): predicted from the line through the two, that prediction and the size
    after it checked, then bisection of what is left."""
    slope = (seen[bad] - seen[good]) / (bad - good)
    guess = min(bad - 1, good + int((budget - seen[good]) // slope)) if slope > 0 else good
    if guess > good:
        if not fits(guess):
            return _bisect(fits, good, guess)
        good = guess
    if good + 1 < bad and not fits(good + 1):
        return good
    return _bisect(fits, good, bad)


def _bisect(ok: Callable[[int], bool], good: int, bad: int) -> int:
    """The largest n in [good, bad) with ok(n), given ok(good) (or good = 0) and not ok(bad)."""
    while bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if ok(middle) else (good, middle)
    return good


def search(measure: Callable[[int], int], budget: int, limit: int, probes: tuple[int, int] = (1, 2)) -> int:
    """The largest per-device batch n in [1, limit] whose `measure(n)` (bytes, growing with n)
    is at most `budget`; 0 if not even 1. Measures the two `probes` (1 and 2; larger ones give a
    better slope where the answer is far), predicts the answer linearly from them, and measures
    the prediction and the size after it: a right prediction costs four measurements. One too
    large is predicted again from the line through it and the largest batch that fits (a footprint
    that is straight but a little steeper than the probes' slope is then right at once), then
    bisected; one too small is corrected by doubling above it."""
    seen: dict[int, int] = {}

    def fits(n: int) -> bool:
        if n not in seen:
            seen[n] = measure(n)
        return seen[n] <= budget

    low, high = sorted(min(max(1, p), limit) for p in probes)
    if not fits(low):
        return largest(fits, low - 1)
    if high == low:
        high = low + 1
        if high > limit:
            return low
    if not fits(high):
        return _between(fits, seen, budget, low, high)
    slope = (seen[high] - seen[low]) / (high - low)
    guess = limit if slope <= 0 else min(limit, max(high, low + int((budget - seen[low]) // slope)))
    if not fits(guess):
        return _between(fits, seen, budget, high, guess)
    if guess == limit or not fits(guess + 1):
        return guess
    return guess + largest(lambda k: fits(guess + k), limit - guess)


# ----------------------------------------------------------------------------------- deciding

@dataclasses.dataclass(frozen=True)
class Choice:
    """The rows of one compiled sampler run, and how they were chosen. With batch_size="auto"
    on an accelerator: `per_device`, the largest per-device batch that fits, `bytes` its peak
    footprint per device, `limit_bytes` the device's limit, `margin` the share of it left free,
    `cached` whether an earlier run decided it (read from the cache file), else `compiles`, the
    candidate batches this process compiled to decide it. `note` says why auto kept the default
    (a CPU, an unknown limit)."""
    rows: int
    auto: bool = False
    per_device: int | None = None
    bytes: int | None = None
    limit_bytes: int | None = None
    margin: float | None = None
    cached: bool = False
    compiles: int = 0
    note: str = ""

    def report(self) -> dict:
        """What a run's report.json says of it: batch_rows, and batch_size_auto (null unless auto)."""
        auto = None
        if self.auto:
            auto = {"rows": self.rows, "per_device": self.per_device, "bytes": self.bytes,
                    "limit_bytes": self.limit_bytes, "margin": self.margin, "cached": self.cached,
                    "compiles": self.compiles, **({"note": self.note} if self.note else {})}
        return {"batch_rows": self.rows, "batch_size_auto": auto}

    def describe(self) -> str:
        """"batch 24 per run (auto: 21.3 of 126.7 GiB per device at 24; cached)", said before a run."""
        line = f"batch {self.rows} per run"
        if not self.auto:
            return line
        if self.per_device is None:
            return f"{line} (auto: {self.note})"
        how = "cached" if self.cached else f"{self.compiles} candidate compile{'s' * (self.compiles != 1)}"
        return (f"{line} (auto: {self.bytes / GIB:.1f} of {self.limit_bytes / GIB:.1f} GiB per device at "
                f"{self.per_device}; {how})")


def fixed(batch_size: int, num_samples: int) -> Choice:
    """The rows of a given batch_size: never more than the edit's samples."""
    return Choice(rows=max(1, min(int(batch_size), num_samples)))


def config_key(fields: dict, device, devices: int, limit: int) -> tuple[str, dict]:
    """(the decision's key, what it is made of): `fields` (what changes the compiled programs: the
    networks, the sampling options but batch_size, guided or not, the image size), the device's
    kind, the device count, the memory limit, MARGIN and JAX's version."""
    about = {**fields, "device_kind": device.device_kind, "devices": devices, "limit_bytes": limit,
             "margin": MARGIN, "jax": jax.__version__}
    text = json.dumps(about, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24], about


def module_fields(module) -> dict:
    """A network's configuration, for `config_key`: a Flax module's dataclass fields as text
    (dtype, remat, widths, ...; anything else: its repr), with the addresses of any functions
    dropped so that the text is the same in every process."""
    plain = lambda value: re.sub(r" at 0x[0-9a-f]+", "", repr(value))  # noqa: E731
    if not dataclasses.is_dataclass(module):
        return {"repr": plain(module)}
    return {f.name: plain(getattr(module, f.name)) for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")}


def choose(fields: dict, measure: Callable[[int], int], mesh, num_samples: int, *,
           cache_dir: str | None = None, say: Callable[[str], None] | None = None) -> Choice:
    """The rows of batch_size="auto" for an edit of `num_samples` samples over `mesh`.
    `measure(per_device)` is the sampler's footprint per device (bytes) at that per-device batch
    (`footprint`, which compiles); `fields` what, besides the devices, changes the compiled
    programs (see config_key). Decisions are kept in memory and, with `cache_dir`, in CACHE_FILE
    there. `say` hears a line as a search starts and after each candidate. On a CPU, or where the
    device's memory is unknown, the rows are the default batch's (`note` says why). OptionError
    when not even one sample per device fits."""
    device = local_device(mesh)
    count = mesh.devices.size
    if not accelerator(device):
        return Choice(rows=min(DEFAULT_BATCH, num_samples), auto=True, note=f"the default {DEFAULT_BATCH} on a CPU")
    limit = memory_limit(device)
    if limit is None:  # said in the line before the run (Choice.describe) and in the report
        note = f"the memory of a {device.device_kind} is not known: the default {DEFAULT_BATCH}"
        return Choice(rows=min(DEFAULT_BATCH, num_samples), auto=True, note=note)
    key, about = config_key(fields, device, count, limit)
    needed = -(-num_samples // count)  # per device: no candidate larger than the edit needs
    budget = int(limit * (1 - MARGIN))
    entry = _DECISIONS.get(key)
    decided = entry is None  # here, not earlier in this process: by a search or from the file
    if entry is None:
        saved = _read(cache_dir).get(key)
        if saved is not None:  # decided by an earlier run: nothing compiled here
            entry = {**saved, "compiles": 0}
    # A decision holds when it found the largest batch, or searched as far as this edit needs.
    if entry is None or entry["per_device"] == entry["searched_to"] < needed:
        if say is not None:
            say(f"batch_size=auto: finding the largest batch that fits {budget / GIB:.1f} GiB per {device.device_kind} "
                f"({limit / GIB:.1f} GiB less a {MARGIN:.0%} margin), compiling candidates for memory analysis only "
                "(no sampling; once per configuration)")
        tried: dict[int, int] = {}

        def measured(per_device: int) -> int:
            start = time.perf_counter()
            tried[per_device] = measure(per_device)
            if say is not None:
                fits = "fits" if tried[per_device] <= budget else "too big"
                say(f"  {per_device} per device: {tried[per_device] / GIB:.2f} GiB ({fits}; "
                    f"{time.perf_counter() - start:.0f} s)")
            return tried[per_device]

        decided = True
        per_device = search(measured, budget, needed)
        entry = {"per_device": per_device, "bytes": tried.get(per_device, tried[1]), "searched_to": needed,
                 "configuration": about, "compiles": len(tried)}
    if decided:  # the same on every process
        entry = _agree(entry)
        if cache_dir is not None and jax.process_index() == 0 and entry["compiles"]:
            _write(cache_dir, key, {k: v for k, v in entry.items() if k != "compiles"})
    _DECISIONS[key] = entry
    if entry["per_device"] == 0:
        raise OptionError("batch_size", f"batch_size=auto: not even one sample per device fits: "
                          f"{entry['bytes'] / GIB:.1f} GiB needed, {budget / GIB:.1f} GiB usable on a "
                          f"{device.device_kind} ({MARGIN:.0%} of {limit / GIB:.1f} GiB kept free); use remat='blocks' "
                          "(--remat=blocks), bfloat16 (--precision=bf16) or a lower aug_num (--aug_num)")
    return Choice(rows=min(entry["per_device"] * count, num_samples), auto=True, per_device=entry["per_device"],
                  bytes=entry["bytes"], limit_bytes=limit, margin=MARGIN, cached=entry["compiles"] == 0,
                  compiles=entry["compiles"])


def _agree(entry: dict) -> dict:
    """With several processes, the decision every one of them runs: the smallest per-device batch
    any of them chose (with its footprint and how far it searched). Their searches compile the same
    programs, but each reads its own cache file, and all must run the same batches. Every process
    reaches this at the same calls (a decision not yet in its memory): the launch programs make the
    same calls on every process, and the decisions in memory stay equal."""
    if jax.process_count() == 1:
        return entry
    mib, rest = divmod(int(entry["bytes"]), 2 ** 20)  # int32 pieces (JAX gathers 32-bit integers)
    mine = np.array([entry["per_device"], entry["searched_to"], mib, rest], np.int32)
    rows = parallel.allgather(mine)
    chosen = rows[np.lexsort((rows[:, 1], rows[:, 0]))[0]]  # the smallest batch, the shortest search
    return {**entry, "per_device": int(chosen[0]), "searched_to": int(chosen[1]),
            "bytes": int(chosen[2]) * 2 ** 20 + int(chosen[3])}


def forget() -> None:
    """Drop this process's decisions (the file keeps its own): the next `choose` reads or searches."""
    _DECISIONS.clear()


def _read(cache_dir: str | None) -> dict:
    """The decisions in CACHE_FILE of `cache_dir` ({} where there is none, or it is unreadable or
    not this format: it is rewritten whole at the next decision)."""
    if cache_dir is None:
        return {}
    try:
        with open(os.path.join(cache_dir, CACHE_FILE), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):  # missing, unreadable, not JSON (ValueError covers decoding too)
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("decisions"), dict):
        return {}
    return {key: entry for key, entry in data["decisions"].items() if _valid(entry)}


def _valid(entry) -> bool:
    """Whether a decision read from the file has the fields `choose` uses, as whole numbers."""
    return isinstance(entry, dict) and all(
        isinstance(entry.get(name), int) and not isinstance(entry.get(name), bool) and entry[name] >= 0
        for name in ("per_device", "bytes", "searched_to"))


def _write(cache_dir: str, key: str, entry: dict) -> None:
    """Add `entry` to CACHE_FILE in `cache_dir`, written whole under a temporary name and renamed
    into place. A directory that cannot be written keeps the decision in memory only."""
    decisions = {**_read(cache_dir), key: entry}
    path = os.path.join(cache_dir, CACHE_FILE)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": _FORMAT, "decisions": decisions}, f, indent=1, sort_keys=True, default=str)

    try:
        atomic_write(path, write)
    except OSError:
        pass
