"""Batch jobs: a JSON-lines manifest of edits, run as (job, sample) work items that resume.

One job per manifest line, e.g.

    {"image": "cat.png", "mask": "cat_mask.png", "prompt": "a tiger", "num_samples": 8, "seed": 1}
    {"name": "sky", "image": "beach.png", "mask": "sea.png", "invert_mask": true, "prompt": "aurora",
     "num_samples": 4, "seed": 2, "skip_timesteps": 30}

Each sample k of a job is a work item with one output, OUTPUT_DIR/<name>/sample_<k>.png, and
its report entry sample_<k>.json, both written atomically (the JSON last: it marks the item as
done). Sample k depends only on the job's inputs, seed and k, so items of different jobs that
share options are packed into the same batches, and a rerun computes exactly the items whose
files are missing. A job's summary (ranked.json, best first, and grid.png) is rebuilt whenever
its finished samples change.

Several processes (jax.distributed) build the same work list from the same disk state; every
batch is sharded over all devices of all processes and each process writes the rows its own
devices computed, so each item is written by exactly one process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from typing import Callable

import jax
import numpy as np
from PIL import Image

from bdjax import image_io, outputs, tokenizer
from bdjax.blended import EditOptions, check_request

OPTION_NAMES = EditOptions.names()
JOB_FIELDS = ("image", "mask", "prompt", "num_samples", "seed", "name", "invert_mask")
REQUIRED = ("image", "prompt", "num_samples", "seed")
RANKED = "ranked.json"
RESERVED_NAMES = (outputs.REPORT,)  # the run's own report lives beside the job directories


class ManifestError(ValueError):
    """A manifest line that cannot be run; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(f"manifest line {line}: {message}")
        self.line = line
        self.reason = message


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

    def spec(self) -> dict:
        """Everything a sample's pixels depend on; stored with each item so a rerun with a
        changed job is caught instead of mixing two jobs' samples in one directory."""
        return {"image": self.image, "mask": self.mask, "prompt": self.prompt, "seed": self.seed,
                "invert_mask": self.invert_mask, "options": dataclasses.asdict(self.options)}


def check_name(name) -> str:
    """A job name is one directory inside the output directory, never a path out of it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name {name!r} must be a non-empty string")
    if os.path.isabs(name) or "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"name {name!r} is a path; it must be a single directory name (no separators), "
                         "since outputs must stay inside --output_dir")
    if name in (".", "..") or ".." in name:
        raise ValueError(f"name {name!r} contains '..', which could point outside --output_dir")
    if name.startswith("."):
        raise ValueError(f"name {name!r} starts with '.': hidden names are reserved for temporary files")
    if any(ord(c) < 32 for c in name) or len(name.encode()) > 200:
        raise ValueError(f"name {name!r} has control characters or is longer than 200 bytes")
    if name in RESERVED_NAMES:
        raise ValueError(f"name {name!r} is reserved for the run's report")
    return name


def _typed(key: str, value, default):
    """JSON value for `key`, of the type of its default (bools are not ints here)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{key}={value!r} should be of type {type(default).__name__}")
    return value


def parse_job(line: int, text: str, base_dir: str, image_size: int, base_options: EditOptions,
              context_length: int = 77) -> Job:
    """One manifest line as a Job, checked as far as possible without running anything:
    fields and types, options, prompt length, readable image, non-empty mask."""
    try:
        return _parse_job(line, text, base_dir, image_size, base_options, context_length)
    except ManifestError:
        raise
    except ValueError as e:  # includes image_io.InputError and json.JSONDecodeError
        raise ManifestError(line, str(e)) from None


def _parse_job(line, text, base_dir, image_size, base_options, context_length) -> Job:
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(entry, dict):
        raise ManifestError(line, f"expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ManifestError(line, f"missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(entry) - set(JOB_FIELDS) - set(OPTION_NAMES))
    if unknown:
        raise ManifestError(line, f"unknown field(s) {', '.join(unknown)}; known: "
                            f"{', '.join(JOB_FIELDS + OPTION_NAMES)}")
    name = check_name(entry.get("name", f"line_{line:04d}"))
    prompt = _typed("prompt", entry["prompt"], "")
    num_samples = _typed("num_samples", entry["num_samples"], 0)
    seed = _typed("seed", entry["seed"], 0)
    invert_mask = _typed("invert_mask", entry.get("invert_mask", False), False)
    check_request(num_samples, seed)
    defaults = dataclasses.asdict(base_options)
    options = dataclasses.replace(base_options, **{k: _typed(k, v, defaults[k]) for k, v in entry.items()
                                                   if k in OPTION_NAMES})
    options.validate()
    tokenizer.tokenize(prompt, context_length=context_length)  # a prompt over 77 tokens fails here
    resolve = lambda p: os.path.abspath(os.path.join(base_dir, os.path.expanduser(p)))  # noqa: E731
    image = resolve(_typed("image", entry["image"], ""))
    mask = entry.get("mask")
    mask = None if mask is None else resolve(_typed("mask", mask, ""))
    with warnings.catch_warnings(record=True) as caught:  # said once, here, with the line number
        warnings.simplefilter("always")
        load_inputs(image, mask, invert_mask, image_size)
    for w in caught:
        warnings.warn(f"manifest line {line}: {w.message}", stacklevel=2)
    return Job(line=line, name=name, image=image, mask=mask, prompt=prompt, num_samples=num_samples, seed=seed,
               invert_mask=invert_mask, options=options)


def load_inputs(image: str, mask: str | None, invert_mask: bool, image_size: int, quiet: bool = False):
    """(init [S,S,3] in [-1,1], mask [S,S,1]) through the single image loader; `quiet` drops the
    loader's warnings (already reported when the manifest was read)."""
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        pil = image_io.to_pil(image, "image")
        init = image_io.load_image(pil, image_size)
        return init, image_io.load_mask(mask, image_size, image_size=pil.size, invert_mask=invert_mask)


def read_manifest(path: str, image_size: int, base_options: EditOptions,
                  context_length: int = 77) -> tuple[list[Job], list[ManifestError]]:
    """The manifest's valid jobs and its bad lines. Blank lines and lines starting with '#' are
    skipped. Two jobs with the same name are an error for the whole manifest: their outputs would
    collide."""
    base_dir = os.path.dirname(os.path.abspath(path))
    jobs, errors = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            jobs.append(parse_job(number, text, base_dir, image_size, base_options, context_length))
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
# Work items on disk.

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


def finished_samples(output_dir: str, job: Job) -> dict[int, dict]:
    """{k: report entry} for the samples of `job` on disk (PNG and JSON both present).

    Raises ValueError if the job's directory holds samples of a different job."""
    directory = os.path.join(output_dir, job.name)
    if not os.path.isdir(directory):
        return {}
    found = {}
    for k in range(job.num_samples):
        entry = _read_json(sample_json(output_dir, job, k))
        if entry is None or not os.path.exists(sample_png(output_dir, job, k)):
            continue
        if entry.get("job") != job.spec():
            raise ValueError(f"{directory} holds sample {k} of a different job (image, mask, prompt, seed or "
                             "options differ); rename the job or remove that directory")
        found[k] = entry
    return found


def write_sample(output_dir: str, job: Job, k: int, image: np.ndarray, distance: float, label: str = "") -> dict:
    """The item's PNG, then its report entry (whose presence marks the item as done)."""
    save = sample_png(output_dir, job, k)
    outputs.save_png(save, image)
    entry = {"name": job.name, "line": job.line, "sample_id": k, "seed": job.seed, "distance": float(distance),
             "file": os.path.basename(save), "job": job.spec(), "process_index": jax.process_index()}
    if label:
        entry["label"] = label
    outputs.save_json(sample_json(output_dir, job, k), entry)
    return entry


def write_summary(output_dir: str, job: Job, samples: dict[int, dict], image_size: int, label: str = "",
                  grid_size: int = 8) -> bool:
    """ranked.json (samples best first) and grid.png for a complete job; returns whether anything
    was written (nothing when the summary on disk already lists these samples)."""
    ranked = sorted(samples.values(), key=lambda e: (e["distance"], e["sample_id"]))
    summary = {"name": job.name, "line": job.line, "num_samples": job.num_samples, "job": job.spec(),
               "label": label or None,
               "samples": [{"rank": r, "sample_id": e["sample_id"], "distance": e["distance"], "file": e["file"]}
                           for r, e in enumerate(ranked)]}
    path = os.path.join(output_dir, job.name, RANKED)
    grid_path = os.path.join(output_dir, job.name, outputs.GRID)
    if _read_json(path) == summary and os.path.exists(grid_path):
        return False
    init, mask = load_inputs(job.image, job.mask, job.invert_mask, image_size, quiet=True)
    images = [_read_png(os.path.join(output_dir, job.name, e["file"])) for e in ranked[:grid_size]]
    caption = f"{job.prompt!r}: source, mask, best {len(images)} of {len(ranked)}"
    caption = f"{label}\n{caption}" if label else caption
    outputs.save_png(grid_path, outputs.grid(np.round((init + 1) * 127.5).astype(np.uint8),
                                             (mask[..., 0] * 255).astype(np.uint8), images, caption))
    outputs.save_json(path, summary)  # last: its presence means the grid is current
    return True


def _read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# Running.

@dataclasses.dataclass
class RunStats:
    total: int = 0        # items of the valid jobs
    skipped: int = 0      # already on disk when the run started
    computed: int = 0     # produced by this run, all processes together
    sample_s: float = 0.0
    summaries: int = 0    # ranked.json/grid.png (re)written


def pending_items(output_dir: str, jobs: list[Job]) -> tuple[list[Job], list[tuple[int, int]], list[ManifestError]]:
    """(the jobs to run, (job index, sample id) of their missing items, the jobs left out because
    their directory holds another job's samples), the same on every process.

    Each process looks at the disk, then they agree on the union of what anyone found (an
    all-gather, which is also a barrier: nobody writes before everybody has looked)."""
    done, clash, reasons = [], np.zeros(len(jobs), bool), {}
    for j, job in enumerate(jobs):
        try:
            found = finished_samples(output_dir, job)
        except ValueError as e:
            clash[j], reasons[j], found = True, str(e), {}
        done.append(np.array([k in found for k in range(job.num_samples)], bool))
    done = np.concatenate(done) if done else np.zeros(0, bool)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = np.asarray(multihost_utils.process_allgather(done)).any(axis=0)
        clash = np.asarray(multihost_utils.process_allgather(clash)).any(axis=0)
    kept, items, conflicts, offset = [], [], [], 0
    for j, job in enumerate(jobs):
        if clash[j]:
            conflicts.append(ManifestError(job.line, reasons.get(j, f"another process found samples of a "
                                                                    f"different job in {job.name}/")))
        else:
            items += [(len(kept), k) for k in range(job.num_samples) if not done[offset + k]]
            kept.append(job)
        offset += job.num_samples
    return kept, items, conflicts


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def run(editor, jobs: list[Job], output_dir: str, items: list[tuple[int, int]], *, label: str = "",
        on_batch: Callable[[int], None] | None = None) -> RunStats:
    """Compute `items` (from `pending_items`) and write each on the process that computed it.

    Items that share (options, guided) are packed into batches of options.batch_size regardless
    of their job. After every batch, process 0 rebuilds the summaries of that batch's jobs once
    they are complete.
    `on_batch(n)` is called on every process with the number of items the batch finished.
    """
    stats = RunStats(total=sum(j.num_samples for j in jobs), skipped=sum(j.num_samples for j in jobs) - len(items))
    groups: dict[tuple, list] = {}
    for j, k in items:  # manifest order within a group, so a job's samples stay together
        groups.setdefault((jobs[j].options, jobs[j].prompt != ""), []).append((j, k))
    inputs: dict[int, tuple] = {}
    embeds: dict[str, np.ndarray] = {}
    for g, ((options, guided), group) in enumerate(groups.items()):
        for start in range(0, len(group), options.batch_size):
            chunk = group[start:start + options.batch_size]
            needed = {j for j, _ in chunk}
            # Only the jobs of this batch stay loaded: a manifest may hold many thousands of images.
            inputs = {j: inputs[j] if j in inputs else load_inputs(jobs[j].image, jobs[j].mask, jobs[j].invert_mask,
                                                                    editor.image_size, quiet=True) for j in needed}
            for j in needed:
                if jobs[j].prompt not in embeds:
                    embeds[jobs[j].prompt] = np.asarray(editor.encode_prompt(jobs[j].prompt))
            began = time.perf_counter()
            out = editor.sample(options, guided,
                                np.stack([inputs[j][0] for j, _ in chunk]), np.stack([inputs[j][1] for j, _ in chunk]),
                                np.stack([embeds[jobs[j].prompt] for j, _ in chunk]),
                                np.array([k for _, k in chunk]), np.array([jobs[j].seed for j, _ in chunk]))
            stats.sample_s += time.perf_counter() - began
            for row, image, distance in zip(out["rows"], out["images"], out["distances"]):
                j, k = chunk[row]
                write_sample(output_dir, jobs[j], k, np.round(image * 255).astype(np.uint8), distance, label)
            stats.computed += len(chunk)
            _barrier(f"bdjax.batch {g}:{start}")  # every item of the batch is on disk now
            if jax.process_index() == 0:
                stats.summaries += write_summaries(output_dir, [jobs[j] for j in sorted(needed)],
                                                   editor.image_size, label)
            if on_batch is not None:
                on_batch(len(chunk))
    _barrier("run finished")
    return stats


def write_summaries(output_dir: str, jobs: list[Job], image_size: int, label: str = "") -> int:
    """Summaries of the complete jobs among `jobs`; returns how many were (re)written."""
    written = 0
    for job in jobs:
        samples = finished_samples(output_dir, job)
        if len(samples) == job.num_samples:
            written += write_summary(output_dir, job, samples, image_size, label)
    return written
