"""Batch jobs: a JSON-lines manifest of edits, run as (job, sample) work items that resume.

One job per manifest line, e.g.

    {"image": "cat.png", "mask": "cat_mask.png", "prompt": "a tiger", "num_samples": 8, "seed": 1}
    {"name": "sky", "image": "beach.png", "mask": "sea.png", "invert_mask": true, "prompt": "aurora",
     "num_samples": 4, "seed": 2, "skip_timesteps": 30}

Each sample k of a job is a work item with one output, OUTPUT_DIR/<name>/sample_<k>.png, and
its report entry sample_<k>.json, both written atomically (the JSON last: it marks the item as
done). Sample k depends only on the job's inputs, seed and k, so items of different jobs that
share options are packed into the same batches, and a rerun computes exactly the items whose
files are missing. A job is identified by the content of its image and mask (not their paths),
its prompt, seed and options, and the run's precision, config, model size and weights: a job
directory holding samples of another identity is refused, never mixed. A job's summary
(ranked.json, best first, and grid.png) is written when its last sample is.

Reading the manifest prepares each job as an edit is prepared (bdjax/request.py): its prompt
tokenized, its options and counts checked, and each distinct image and mask decoded once and
kept for the run and the summaries (`InputCache`, bounded in bytes).

A run holds a lock on the output directory (`claim_output_dir`), so a second run refuses instead
of computing everything twice; under it, temporaries left by killed runs are removed and every
job's directory is probed before any compute. A sample whose image or distance is not finite is
reported as failed and not written; a job whose files cannot be written during the run is
reported and its remaining samples are skipped; a rerun retries both.

Several processes (jax.distributed) build the same work list from the same disk state; every
batch is sharded over all devices of all processes and each process writes the rows its own
devices computed, so each item is written by exactly one process. After every batch the
processes exchange what became of each row (written, not finite, not writable), so they all
keep the same record and the same work list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import re
import socket
import sys
import tempfile
import time
import warnings
from collections import OrderedDict
from typing import Callable, Iterator

import jax
import numpy as np

from bdjax import files, outputs, parallel
from bdjax import request as request_lib
from bdjax.options import EditOptions, check_type

OPTION_NAMES = EditOptions.names()
JOB_FIELDS = ("image", "mask", "prompt", "num_samples", "seed", "name", "invert_mask")
REQUIRED = ("image", "prompt", "num_samples", "seed")
RANKED = "ranked.json"
LOCK = ".bdjax-run.lock"  # held (flock) by the run writing into an output directory
RESERVED_NAMES = (outputs.REPORT,)  # the run's own report lives beside the job directories
_SAMPLE_JSON = re.compile(r"sample_(0|[1-9][0-9]*)\.json")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # JSON strings may hold U+2028 etc.: only these end a line


class ManifestError(ValueError):
    """A manifest line that cannot be run; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(f"manifest line {line}: {message}")
        self.line = line
        self.reason = message


class OutputInUse(ValueError):
    """The output directory is locked by another run."""


@dataclasses.dataclass(frozen=True)
class Job:
    line: int
    name: str
    image: str               # absolute path
    mask: str | None         # absolute path; None edits the whole image
    prompt: str
    num_samples: int
    seed: int
    invert_mask: bool
    options: EditOptions
    image_sha256: str = ""
    mask_sha256: str | None = None
    run: tuple = ()          # the run's identity as sorted (key, value) pairs: see `with_run`
    # The prompt's CLIP tokens [1, context_length], and where the prepared image and mask are kept.
    tokens: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    cache: "InputCache | None" = dataclasses.field(default=None, compare=False, repr=False)

    def inputs(self, image_size: int) -> request_lib.Inputs:
        """The job's image and mask prepared at `image_size` (bdjax/request.py), from the
        manifest's cache: decoded once while the cache holds them."""
        cache = InputCache() if self.cache is None else self.cache
        return cache.get(self.image, self.mask, self.invert_mask, image_size)

    def spec(self) -> dict:
        """Everything a sample's pixels depend on, stored with each item so a rerun with a changed
        job is caught instead of mixing two jobs' samples in one directory. The image and mask
        count by content, so moving the files (or the whole project) keeps finished samples."""
        return {"image_sha256": self.image_sha256, "mask_sha256": self.mask_sha256, "prompt": self.prompt,
                "seed": self.seed, "invert_mask": self.invert_mask, "options": dataclasses.asdict(self.options),
                "run": dict(self.run)}


def run_identity(precision: str, config: str, image_size: int, weights_digest: str) -> dict:
    """What a run contributes to every job's identity: samples made at another precision, with
    other networks or at another size are other samples."""
    return {"precision": precision, "config": config, "image_size": int(image_size), "weights": weights_digest}


def with_run(jobs: list[Job], identity: dict) -> list[Job]:
    """`jobs` as run with `identity` (from `run_identity`; known once the networks are loaded)."""
    run = tuple(sorted(identity.items()))
    return [dataclasses.replace(job, run=run) for job in jobs]


# Prepared inputs kept per manifest: 1 GiB holds 4096 distinct images and masks at 256 pixels,
# 1024 at 512.
INPUT_CACHE_BYTES = 1 << 30


class InputCache:
    """Each distinct (image, mask, invert_mask, size) of a manifest, prepared once for the model
    and kept as uint8 (S x S x 4 bytes) up to `max_bytes` in all. Beyond that the least recently
    used are dropped and prepared again when next needed, so a manifest of many thousands of
    images holds at most `max_bytes` of them (and the batch being computed)."""

    def __init__(self, max_bytes: int = INPUT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple, request_lib.Inputs] = OrderedDict()
        self._bytes = 0

    def get(self, image: str, mask: str | None, invert_mask: bool, image_size: int) -> request_lib.Inputs:
        key = (image, mask, invert_mask, image_size)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        inputs = request_lib.prepare_inputs(image, mask, invert_mask=invert_mask, image_size=image_size)
        self._kept[key] = inputs
        self._bytes += inputs.source.nbytes + inputs.mask.nbytes
        while self._bytes > self.max_bytes and len(self._kept) > 1:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= dropped.source.nbytes + dropped.mask.nbytes
        return inputs


def check_name(name, output_dir_label: str = "the output directory") -> str:
    """A job name is one directory inside the output directory, never a path out of it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name {name!r} must be a non-empty string")
    if os.path.isabs(name) or "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"name {name!r} is a path; it must be a single directory name (no separators), "
                         f"since outputs must stay inside {output_dir_label}")
    if set(name) == {"."}:
        raise ValueError(f"name {name!r} is made only of dots: '.' and '..' are the output directory itself and "
                         "its parent, not a directory of the job's own; choose a name with other characters")
    if name.startswith("."):
        raise ValueError(f"name {name!r} starts with '.': hidden names are reserved for bdjax's temporary and "
                         "lock files; choose a name without the leading '.'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"name {name!r} contains control characters; use printable characters only")
    if len(name.encode()) > 200:
        raise ValueError(f"name {name[:40]!r}... is {len(name.encode())} bytes long; the limit is 200 bytes")
    if name in RESERVED_NAMES:
        raise ValueError(f"name {name!r} is reserved for the run's report; choose another name")
    return name


def file_sha256(path: str, cache: dict | None = None) -> str:
    """Hex SHA-256 of a file's bytes; `cache` ({path: digest}) hashes each file once per run."""
    if cache is not None and path in cache:
        return cache[path]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if cache is not None:
        cache[path] = digest.hexdigest()
    return digest.hexdigest()


def parse_job(line: int, text: str, base_dir: str, image_size: int, base_options: EditOptions,
              context_length: int = 77, cache: dict | None = None,
              output_dir_label: str = "the output directory") -> Job:
    """One manifest line as a Job, checked and prepared as far as possible without running
    anything (bdjax/request.py): fields and types, options, prompt length (tokenized here),
    readable image, non-empty mask. `cache` (one dict per manifest) keeps what was learnt of each
    input file, so a file shared by many jobs is read, decoded and hashed once; the prepared image
    and mask stay there (see InputCache) for the run. `output_dir_label` names the output
    directory in messages."""
    try:
        return _parse_job(line, text, base_dir, image_size, base_options, context_length,
                          {} if cache is None else cache, output_dir_label)
    except ManifestError:
        raise
    except ValueError as e:  # includes image_io.InputError and json.JSONDecodeError
        raise ManifestError(line, str(e)) from None
    except OSError as e:  # an input that vanished or turned unreadable between the checks
        raise ManifestError(line, f"cannot read {e.filename} ({e.strerror})") from None


class _DuplicateField(Exception):
    pass


def _unique_fields(pairs) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateField(repr(key))
        seen.add(key)
    return dict(pairs)


def _parse_job(line, text, base_dir, image_size, base_options, context_length, cache, output_dir_label) -> Job:
    try:
        entry = json.loads(text, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as e:
        raise ManifestError(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except _DuplicateField as e:
        raise ManifestError(line, f"field {e} is given twice; keep one") from None
    if not isinstance(entry, dict):
        raise ManifestError(line, f"expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ManifestError(line, f"missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(entry) - set(JOB_FIELDS) - set(OPTION_NAMES))
    if unknown:
        raise ManifestError(line, f"unknown field(s) {', '.join(unknown)}; known: "
                            f"{', '.join(JOB_FIELDS + OPTION_NAMES)}")
    name = check_name(entry.get("name", f"line_{line:04d}"), output_dir_label)
    prompt = check_type("prompt", entry["prompt"], "str")
    num_samples = check_type("num_samples", entry["num_samples"], "int")
    seed = check_type("seed", entry["seed"], "int")
    invert_mask = check_type("invert_mask", entry.get("invert_mask", False), "bool")
    options = EditOptions.from_fields({k: v for k, v in entry.items() if k in OPTION_NAMES}, base_options)
    tokens = request_lib.check(prompt, num_samples=num_samples, seed=seed, options=options,
                               context_length=context_length)
    resolve = lambda p: os.path.abspath(os.path.join(base_dir, os.path.expanduser(p)))  # noqa: E731
    image = resolve(check_type("image", entry["image"], "str"))
    mask = entry.get("mask")
    mask = None if mask is None else resolve(check_type("mask", mask, "str"))
    inputs = cache.setdefault("inputs", InputCache())
    checked = cache.setdefault("checked", {})
    key = (image, mask, invert_mask, image_size)
    if key not in checked:  # decoded here once; kept in `inputs` for the run
        checked[key] = [str(w.message) for w in inputs.get(image, mask, invert_mask, image_size).warnings]
    for message in checked[key]:  # said for every line that uses the file, with its line number
        warnings.warn(f"manifest line {line}: {message}", stacklevel=3)
    digests = cache.setdefault("sha256", {})
    return Job(line=line, name=name, image=image, mask=mask, prompt=prompt, num_samples=num_samples, seed=seed,
               invert_mask=invert_mask, options=options, image_sha256=file_sha256(image, digests),
               mask_sha256=None if mask is None else file_sha256(mask, digests), tokens=tokens, cache=inputs)


def manifest_lines(path: str, label: str | None = None) -> list[str]:
    """The manifest's lines (a UTF-8 byte-order mark is dropped); ValueError naming the file (as
    `label`, by default "manifest PATH") when it is missing, unreadable, a directory, not UTF-8
    text, or holds no job."""
    label = f"manifest {path}" if label is None else label
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{label} is a directory; pass a JSON-lines file, one job per line") from None
    except OSError as e:
        raise ValueError(f"{label} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label} is not UTF-8 text (undecodable byte at offset {e.start}): a manifest is a "
                         "JSON-lines text file, one job per line") from None
    if "\x00" in text:
        raise ValueError(f"{label} is a binary file (it holds NUL bytes): a manifest is a JSON-lines text file, one "
                         "job per line")
    lines = _LINE_BREAK.split(text)
    if not any(t.strip() and not t.lstrip().startswith("#") for t in lines):
        raise ValueError(f"{label} holds no job (it is empty or only blank and '#' lines); "
                         "write one JSON object per line")
    return lines


def read_manifest(path: str, image_size: int, base_options: EditOptions, context_length: int = 77, *,
                  label: str | None = None,
                  output_dir_label: str = "the output directory") -> tuple[list[Job], list[ManifestError]]:
    """The manifest's valid jobs and its bad lines. Blank lines and lines starting with '#' are
    skipped. Two jobs with the same name are an error for the whole manifest: their outputs would
    collide. The jobs' identity lacks the run's part until `with_run`. `label` names the manifest
    in messages (see manifest_lines), `output_dir_label` the output directory."""
    base_dir = os.path.dirname(os.path.abspath(path))
    jobs, errors, cache = [], [], {}
    for number, text in enumerate(manifest_lines(path, label), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            jobs.append(parse_job(number, text, base_dir, image_size, base_options, context_length, cache,
                                  output_dir_label))
        except ManifestError as e:
            errors.append(e)
    seen = {}
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"manifest lines {seen[job.name]} and {job.line} both name the job {job.name!r}; "
                             "job names (default line_NNNN) must be unique")
        seen[job.name] = job.line
    return jobs, errors


# ---------------------------------------------------------------------------------------------
# The output directory: one run at a time, probed before any compute.

def _holder(fd: int) -> str:
    """Who holds the lock, as recorded in the lock file by `_lock`."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a run that has not recorded itself yet"


@contextlib.contextmanager
def _lock(output_dir: str, label: str | None = None) -> Iterator[None]:
    """Hold an exclusive flock on OUTPUT_DIR/.bdjax-run.lock; OutputInUse at once if another
    process holds it (its message names the directory as `label`). The OS drops the lock when its
    holder dies, so a crashed run never leaves the directory locked; the file records pid, host
    and start time for the message, and is removed (while still locked) when the run ends."""
    output_dir = os.path.abspath(output_dir)
    label = f"output directory {output_dir}" if label is None else label
    path = os.path.join(output_dir, LOCK)
    created, parent = [], output_dir
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    fd = None
    try:
        try:
            os.makedirs(output_dir, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _holder(fd)
                    os.close(fd)
                    fd = None  # not ours: the file stays
                    raise OutputInUse(f"{label} is in use by another run ({holder}): wait for "
                                      "it to finish or choose another output directory") from None
                try:  # the previous holder may have removed the file between our open and flock
                    if os.path.samestat(os.fstat(fd), os.stat(path)):
                        break
                except FileNotFoundError:
                    pass
                os.close(fd)
                fd = None
        except OSError as e:
            files.check_writable(output_dir)  # its message says what is wrong, if it finds it
            raise PermissionError(f"cannot lock {path} ({e.strerror or e}); choose another output directory") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)
        for directory in created:  # made only to hold the lock: leave the disk as it was
            with contextlib.suppress(OSError):
                os.rmdir(directory)


def probe_job_dir(output_dir: str, job: Job) -> str | None:
    """Why `job`'s files could not be written (None if they can), found by writing a probe
    file; a directory made for the probe is removed again."""
    directory = os.path.join(output_dir, job.name)
    if os.path.lexists(directory) and not os.path.isdir(directory):
        return f"{directory} exists and is not a directory; rename the job or move that file"
    created = not os.path.lexists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f"{files.TMP_PREFIX}probe-"):
            pass
    except OSError as e:
        return f"cannot write in {directory} ({e.strerror or e}); fix its permissions or rename the job"
    finally:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
    return None


def _union(flags: np.ndarray) -> np.ndarray:
    """The element-wise OR of `flags` over all processes (also a barrier)."""
    return parallel.allgather(flags).any(axis=0)


@contextlib.contextmanager
def claim_output_dir(output_dir: str, jobs: list[Job], label: str | None = None
                     ) -> Iterator[tuple[list[Job], list[ManifestError], list[str]]]:
    """Lock `output_dir` for this run, then, before any compute: remove the `.tmp-*` files killed
    runs left in it and in the jobs' directories, and leave out the jobs whose directory cannot be
    written. Yields (the jobs to run, the jobs left out as ManifestErrors, the removed paths).

    An output directory that cannot be written raises (PermissionError, NotADirectoryError), one
    locked by another run raises OutputInUse. Only process 0 of a multi-process run locks and
    probes (the directory is shared); the others learn the outcome from it, so the processes of
    one run never refuse each other. `label` names the directory in messages (by default
    "output directory PATH")."""
    label = f"output directory {os.path.abspath(output_dir)}" if label is None else label
    lead = jax.process_index() == 0
    lock = contextlib.ExitStack()
    error, removed, unwritable = None, [], {}
    with lock:
        if lead:
            try:
                lock.enter_context(_lock(output_dir, label))
                files.check_writable(output_dir)
                for directory in [output_dir] + [os.path.join(output_dir, job.name) for job in jobs]:
                    removed += files.remove_stale_temporaries(directory)
                for j, job in enumerate(jobs):
                    reason = probe_job_dir(output_dir, job)
                    if reason is not None:
                        unwritable[j] = reason
            except (OSError, ValueError) as e:
                error = e
        flags = np.zeros(len(jobs) + 1, bool)
        flags[0] = error is not None
        flags[[j + 1 for j in unwritable]] = True
        flags = _union(flags)
        if error is not None:
            raise error
        if flags[0]:
            raise OutputInUse(f"process 0 of this run could not claim {label}; see its message")
        skipped = [ManifestError(job.line, unwritable.get(j, f"process 0 cannot write {job.name}/"))
                   for j, job in enumerate(jobs) if flags[j + 1]]
        yield [job for j, job in enumerate(jobs) if not flags[j + 1]], skipped, removed


# ---------------------------------------------------------------------------------------------
# Work items on disk.

Samples = dict  # {sample id: (distance, index of the process that wrote it)}: a job's finished samples


def sample_png(output_dir: str, job: Job, k: int) -> str:
    return os.path.join(output_dir, job.name, f"sample_{k}.png")


def sample_json(output_dir: str, job: Job, k: int) -> str:
    return os.path.join(output_dir, job.name, f"sample_{k}.json")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finished_entries(output_dir: str, job: Job) -> Iterator[tuple[int, dict]]:
    """(k, report entry) of each sample of `job` on disk (PNG and JSON both present, a finite
    distance), in order of k; reads the directory once and only the entries that exist.

    Raises ValueError if the job's directory holds samples of a different job."""
    directory = os.path.join(output_dir, job.name)
    try:
        names = set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    present = sorted(int(m.group(1)) for m in map(_SAMPLE_JSON.fullmatch, names) if m)
    spec = job.spec()
    for k in present:
        if k >= job.num_samples or f"sample_{k}.png" not in names:
            continue
        entry = _read_json(sample_json(output_dir, job, k))
        if not isinstance(entry, dict):
            continue
        if entry.get("job") != spec:
            raise ValueError(f"{directory} holds sample {k} of a different job (image or mask content, prompt, seed, "
                             "options, or the run's precision, config, model size or weights differ); rename the "
                             "job or remove that directory")
        distance = entry.get("distance")
        if isinstance(distance, (int, float)) and np.isfinite(distance):
            yield k, entry


def finished_samples(output_dir: str, job: Job) -> dict[int, dict]:
    """{k: report entry} for the samples of `job` on disk (PNG and JSON both present).

    Raises ValueError if the job's directory holds samples of a different job."""
    return dict(_finished_entries(output_dir, job))


def read_finished(output_dir: str, job: Job) -> Samples:
    """`job`'s finished samples on disk, as the small entries a run keeps in memory."""
    return {k: (float(e["distance"]), int(e.get("process_index", 0))) for k, e in _finished_entries(output_dir, job)}


def provenance(job: Job, label: str = "") -> dict:
    """What every PNG of `job` records (see outputs.read_provenance): its name, manifest line,
    identity (`Job.spec`: input digests, prompt, seed, options, the run's) and the smoke label."""
    record = {"job": job.name, "line": job.line, **job.spec()}
    if label:
        record["label"] = label
    return record


def write_sample(output_dir: str, job: Job, k: int, image: np.ndarray, distance: float, label: str = "") -> dict:
    """The item's PNG (with its provenance), then its report entry (whose presence marks the item
    as done)."""
    save = sample_png(output_dir, job, k)
    outputs.save_png(save, image, {"kind": "sample", **provenance(job, label), "sample_id": k,
                                   "distance": float(distance)})
    entry = {"name": job.name, "line": job.line, "sample_id": k, "seed": job.seed, "distance": float(distance),
             "file": os.path.basename(save), "image": job.image, "mask": job.mask, "job": job.spec(),
             "process_index": jax.process_index()}
    if label:
        entry["label"] = label
    outputs.save_json(sample_json(output_dir, job, k), entry)
    return entry


def ranked(samples: Samples) -> list[dict]:
    """A job's samples best first: {rank, sample_id, distance, file, process_index}."""
    order = sorted(samples.items(), key=lambda item: (item[1][0], item[0]))
    return [{"rank": r, "sample_id": k, "distance": distance, "file": f"sample_{k}.png", "process_index": writer}
            for r, (k, (distance, writer)) in enumerate(order)]


def write_summary(output_dir: str, job: Job, samples: Samples, image_size: int, label: str = "",
                  grid_size: int = 8) -> bool:
    """ranked.json (samples best first) and grid.png for a complete job; returns whether anything
    was written (nothing when the summary on disk already lists these samples)."""
    best = ranked(samples)
    summary = {"name": job.name, "line": job.line, "num_samples": job.num_samples, "job": job.spec(),
               "label": label or None,
               "samples": [{k: e[k] for k in ("rank", "sample_id", "distance", "file")} for e in best]}
    path = os.path.join(output_dir, job.name, RANKED)
    grid_path = os.path.join(output_dir, job.name, outputs.GRID)
    if _read_json(path) == summary and os.path.exists(grid_path):
        return False
    inputs = job.inputs(image_size)
    shown = best[:grid_size]
    images = [outputs.read_png(os.path.join(output_dir, job.name, e["file"])) for e in shown]
    heading = f"{job.prompt!r}: source, mask, best {len(images)} of {len(best)}"
    heading = f"{label}\n{heading}" if label else heading
    tiles = [{k: e[k] for k in ("rank", "sample_id", "distance")} for e in shown]
    outputs.save_png(grid_path, outputs.grid(inputs.source, inputs.mask, images, [e["distance"] for e in shown],
                                             heading),
                     {"kind": "grid", **provenance(job, label), "tiles": tiles})
    outputs.save_json(path, summary)  # last: its presence means the grid is current
    return True


# ---------------------------------------------------------------------------------------------
# Running.

NOT_FINITE = "the image or distance is not finite (NaN or Inf): not written, a rerun retries it"


@dataclasses.dataclass
class RunStats:
    total: int = 0        # items of the valid jobs
    skipped: int = 0      # already on disk when the run started
    computed: int = 0     # written by this run, all processes together
    failed: int = 0       # computed by this run but not written (not finite, or not writable)
    sample_s: float = 0.0
    summaries: int = 0    # ranked.json/grid.png (re)written
    finished: list = dataclasses.field(default_factory=list)    # per job: its finished Samples
    failures: dict = dataclasses.field(default_factory=dict)    # {job index: {sample id: reason}}
    job_errors: dict = dataclasses.field(default_factory=dict)  # {job index: why its files could not be written}


def pending_items(output_dir: str, jobs: list[Job]
                  ) -> tuple[list[Job], list[tuple[int, int]], list[ManifestError], list[Samples]]:
    """(the jobs to run, (job index, sample id) of their missing items, the jobs left out because
    their directory holds another job's samples, each kept job's finished Samples), the same on
    every process. The disk is read once here; `run` keeps the Samples up to date.

    Each process looks at the disk, then they agree on the union of what anyone found (an
    all-gather, which is also a barrier: nobody writes before everybody has looked)."""
    found, clash, reasons = [], np.zeros(len(jobs), bool), {}
    for j, job in enumerate(jobs):
        try:
            found.append(read_finished(output_dir, job))
        except ValueError as e:
            clash[j], reasons[j] = True, str(e)
            found.append({})
    if jax.process_count() > 1:
        found, clash = _agree_on_disk(jobs, found, clash)
    kept, items, conflicts, finished = [], [], [], []
    for j, job in enumerate(jobs):
        if clash[j]:
            conflicts.append(ManifestError(job.line, reasons.get(j, f"another process found samples of a "
                                                                    f"different job in {job.name}/")))
        else:
            items += [(len(kept), k) for k in range(job.num_samples) if k not in found[j]]
            kept.append(job)
            finished.append(found[j])
    return kept, items, conflicts, finished


def _agree_on_disk(jobs, found, clash):
    """The union over processes of the samples each found (and of the clashes)."""
    offsets = np.cumsum([0] + [job.num_samples for job in jobs])
    distance = np.full(offsets[-1], np.nan, np.float32)
    writer = np.full(offsets[-1], -1, np.int32)
    for j, samples in enumerate(found):
        for k, (d, w) in samples.items():
            distance[offsets[j] + k], writer[offsets[j] + k] = d, w
    distance, writer, clash = (parallel.allgather(a) for a in (distance, writer, clash))
    first = np.argmax(writer >= 0, axis=0)  # a process that found the item, if any did
    distance, writer = np.take_along_axis(distance, first[None], 0)[0], np.take_along_axis(writer, first[None], 0)[0]
    union = [{k: (float(distance[offsets[j] + k]), int(writer[offsets[j] + k]))
              for k in np.flatnonzero(writer[offsets[j]:offsets[j + 1]] >= 0).tolist()} for j in range(len(jobs))]
    return union, clash.any(axis=0)


# What became of a row of a batch, exchanged between processes after every batch.
_NOT_MINE, _WRITTEN, _NOT_FINITE, _UNWRITABLE = 0, 1, 2, 3


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(editor, jobs: list[Job], output_dir: str, items: list[tuple[int, int]], *,
        finished: list[Samples] | None = None, label: str = "",
        on_batch: Callable[[int], None] | None = None) -> RunStats:
    """Compute `items` (from `pending_items`) and write each on the process that computed it.

    Items that share (options, guided) are packed into batches of options.batch_size regardless
    of their job. `finished` (from `pending_items`; read from disk if None) is kept up to date in
    the returned stats, so no batch reads the disk; process 0 writes a job's summary when its
    last sample is written. A sample that is not finite is reported on stderr and in
    stats.failures and not written; a job whose files cannot be written is reported in
    stats.job_errors and its remaining items are left out.
    `on_batch(n)` is called on every process with the number of items the batch finished.
    """
    total = sum(j.num_samples for j in jobs)
    finished = [read_finished(output_dir, job) for job in jobs] if finished is None else finished
    stats = RunStats(total=total, skipped=total - len(items), finished=finished)
    groups: dict[tuple, list] = {}
    for j, k in items:  # manifest order within a group, so a job's samples stay together
        groups.setdefault((jobs[j].options, jobs[j].prompt != ""), []).append((j, k))
    embeds: dict[str, np.ndarray] = {}
    count = 0
    for (options, guided), group in groups.items():
        position = 0
        while True:
            chunk = []
            while position < len(group) and len(chunk) < options.batch_size:
                if group[position][0] not in stats.job_errors:  # the same on every process
                    chunk.append(group[position])
                position += 1
            if not chunk:
                break
            # The jobs' prepared inputs, as the sampler takes them (InputCache bounds the memory).
            inputs = {j: jobs[j].inputs(editor.image_size) for j, _ in chunk}
            inputs = {j: (prepared.init, prepared.region) for j, prepared in inputs.items()}
            for j in inputs:
                if jobs[j].prompt not in embeds:
                    embeds[jobs[j].prompt] = np.asarray(editor.encode_tokens(jobs[j].tokens))
            began = time.perf_counter()
            out = editor.sample(options, guided,
                                np.stack([inputs[j][0] for j, _ in chunk]),
                                np.stack([inputs[j][1] for j, _ in chunk]),
                                np.stack([embeds[jobs[j].prompt] for j, _ in chunk]),
                                np.array([k for _, k in chunk]), np.array([jobs[j].seed for j, _ in chunk]),
                                batch_rows=min(options.batch_size, len(group)))  # no batch larger than needed
            stats.sample_s += time.perf_counter() - began
            outcome, distances, errors = _write_rows(output_dir, jobs, chunk, out, label)
            outcome, distances, writers = _exchange(outcome, distances, f"bdjax.batch {count}")
            count += 1
            completed = []
            for row, (j, k) in enumerate(chunk):
                if outcome[row] == _WRITTEN:
                    finished[j][k] = (float(distances[row]), int(writers[row]))
                    stats.computed += 1
                    if len(finished[j]) == jobs[j].num_samples:
                        completed.append(j)
                    continue
                stats.failed += 1
                if outcome[row] == _NOT_FINITE:
                    stats.failures.setdefault(j, {})[k] = NOT_FINITE
                elif outcome[row] == _UNWRITABLE and j not in stats.job_errors:
                    stats.job_errors[j] = errors.get(j, f"its files could not be written by process {writers[row]} "
                                                        "(see that process's messages)")
            if jax.process_index() == 0:
                for j in completed:
                    stats.summaries += _summarize(output_dir, jobs[j], j, finished[j], editor.image_size, label,
                                                  stats.job_errors)
            if on_batch is not None:
                on_batch(len(chunk))
    parallel.barrier("run finished")
    return stats


def _write_rows(output_dir, jobs, chunk, out, label) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Write this process's rows of a batch: (outcome and distance per row of `chunk`, why a job's
    files could not be written)."""
    outcome = np.full(len(chunk), _NOT_MINE, np.int32)
    distances = np.zeros(len(chunk), np.float32)
    errors: dict[int, str] = {}
    finite = out.get("finite")
    if finite is None:
        finite = np.ones(len(out["rows"]), bool)
    for row, image, distance, ok in zip(out["rows"], out["images"], out["distances"], finite):
        j, k = chunk[row]
        job = jobs[j]
        if not ok:
            outcome[row] = _NOT_FINITE
            _say(f"failed: job {job.name!r} (manifest line {job.line}) sample {k}: {NOT_FINITE}")
        elif j in errors:
            outcome[row] = _UNWRITABLE
        else:
            try:
                write_sample(output_dir, job, k, np.round(np.asarray(image) * 255).astype(np.uint8), distance, label)
                outcome[row], distances[row] = _WRITTEN, distance
            except OSError as e:
                outcome[row] = _UNWRITABLE
                errors[j] = (f"cannot write {e.filename or sample_png(output_dir, job, k)} ({e.strerror or e}); its "
                             "remaining samples are skipped, a rerun retries them")
                _say(f"failed: job {job.name!r} (manifest line {job.line}): {errors[j]}")
    return outcome, distances, errors


def _exchange(outcome: np.ndarray, distances: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every process's view of a batch's rows: (outcome, distance, writing process) per row, from
    the process that computed it (an all-gather, also a barrier: the batch is on disk after it)."""
    from bdjax import parallel

    if jax.process_count() == 1:
        return outcome, distances, np.zeros(len(outcome), np.int32)
    outcome, distances = parallel.allgather(outcome), parallel.allgather(distances)
    writer = np.argmax(outcome != _NOT_MINE, axis=0)
    columns = np.arange(outcome.shape[1])
    return outcome[writer, columns], distances[writer, columns], writer


def _summarize(output_dir: str, job: Job, j: int, samples: Samples, image_size: int, label: str,
               job_errors: dict) -> int:
    """Write a complete job's summary; a failure to write it is recorded in `job_errors`."""
    try:
        return int(write_summary(output_dir, job, samples, image_size, label))
    except OSError as e:
        job_errors[j] = f"cannot write its summary {e.filename or ''} ({e.strerror or e}); a rerun retries it"
        _say(f"failed: job {job.name!r} (manifest line {job.line}): {job_errors[j]}")
        return 0


def job_results(jobs: list[Job], stats: RunStats) -> list[dict]:
    """Per job, for the run's report: the options it ran with, its samples best first, the
    samples that failed in this run and why, and why its files could not be written (if so)."""
    results = []
    for j, job in enumerate(jobs):
        samples = stats.finished[j]
        result = {"name": job.name, "line": job.line, "prompt": job.prompt, "num_samples": job.num_samples,
                  "options": dataclasses.asdict(job.options), "complete": len(samples) == job.num_samples,
                  "samples": [{"seed": job.seed, "sample_id": e["sample_id"], "distance": e["distance"],
                               "file": e["file"], "process_index": e["process_index"]} for e in ranked(samples)]}
        if j in stats.failures:
            result["failed"] = [{"sample_id": k, "reason": reason} for k, reason in sorted(stats.failures[j].items())]
        if j in stats.job_errors:
            result["error"] = stats.job_errors[j]
        results.append(result)
    return results


def write_summaries(output_dir: str, jobs: list[Job], image_size: int, label: str = "",
                    finished: list[Samples] | None = None, job_errors: dict | None = None) -> int:
    """Summaries of the complete jobs among `jobs` (`finished`: their Samples, else read from
    disk) but those in `job_errors`, where a failure to write one is recorded; returns how many
    were (re)written."""
    job_errors = {} if job_errors is None else job_errors
    written = 0
    for j, job in enumerate(jobs):
        samples = read_finished(output_dir, job) if finished is None else finished[j]
        if len(samples) == job.num_samples and j not in job_errors:
            written += _summarize(output_dir, job, j, samples, image_size, label, job_errors)
    return written
