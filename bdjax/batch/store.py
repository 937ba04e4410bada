"""A batch's output directory: the lock that keeps one run at a time in it (`claim_output_dir`),
and the files of each job in it: sample_<k>.png and sample_<k>.json per finished sample, and in
window mode crops/sample_<k>.png (the model-size edit; written before the sample), the JSON
written last: it marks the sample as done; read back to resume (`read_finished`), and the job's
summary (ranked.json, best first, and grid.png).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Iterator

import jax
import numpy as np

from bdjax import files, outputs, parallel
from bdjax.batch.manifest import Job, ManifestError
from bdjax.files import LOCK, OutputInUse  # noqa: F401  re-exported by bdjax.batch

RANKED = "ranked.json"
_SAMPLE_JSON = re.compile(r"sample_(0|[1-9][0-9]*)\.json")


# ---------------------------------------------------------------------------------------------
# The output directory: one run at a time (files.output_lock), probed before any compute.

def job_dirs(output_dir: str, job: Job) -> list[str]:
    """The directories `job` writes into: its own and, in window mode, its crops/ folder."""
    directory = os.path.join(output_dir, job.name)
    return [directory, os.path.join(directory, outputs.CROPS_DIR)] if job.windowed else [directory]


def probe_job_dir(output_dir: str, job: Job) -> str | None:
    """Why `job`'s files could not be written (None if they can), found by writing a probe
    file in each of its directories (`job_dirs`); a directory made for the probe is removed again."""
    created = []
    try:
        for directory in job_dirs(output_dir, job):
            if os.path.lexists(directory) and not os.path.isdir(directory):
                return f"{directory} exists and is not a directory; rename the job or move that file"
            try:
                if not os.path.lexists(directory):
                    os.mkdir(directory)
                    created.append(directory)
                with tempfile.NamedTemporaryFile(dir=directory, prefix=f"{files.TMP_PREFIX}probe-"):
                    pass
            except OSError as e:
                return f"cannot write in {directory} ({e.strerror or e}); fix its permissions or rename the job"
    finally:
        for directory in reversed(created):
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
                lock.enter_context(files.output_lock(output_dir, label))
                files.check_writable(output_dir)
                for directory in [output_dir] + [d for job in jobs for d in job_dirs(output_dir, job)]:
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

# {sample id: (ranking value, index of the process that wrote it)}: a job's finished samples. The
# ranking value is the one the job's options rank by (bdjax/scores.py): by default the CLIP distance.
Samples = dict


def sample_png(output_dir: str, job: Job, k: int) -> str:
    return os.path.join(output_dir, job.name, f"sample_{k}.png")


def sample_json(output_dir: str, job: Job, k: int) -> str:
    return os.path.join(output_dir, job.name, f"sample_{k}.json")


def crop_png(output_dir: str, job: Job, k: int) -> str:
    """Window mode: the model-size edit of sample k (the one CLIP ranked)."""
    return os.path.join(output_dir, job.name, outputs.CROPS_DIR, f"sample_{k}.png")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _finished_entries(output_dir: str, job: Job) -> Iterator[tuple[int, dict]]:
    """(k, report entry) of each sample of `job` on disk (PNG and JSON both present, and in
    window mode its crop, a finite distance), in order of k; reads the directory (and crops/)
    once and only the entries that exist.

    Raises ValueError if the job's directory holds samples of a different job."""
    directory = os.path.join(output_dir, job.name)
    try:
        names = set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return
    present = sorted(int(m.group(1)) for m in map(_SAMPLE_JSON.fullmatch, names) if m)
    crops = None
    if job.windowed:
        try:
            crops = set(os.listdir(os.path.join(directory, outputs.CROPS_DIR)))
        except (FileNotFoundError, NotADirectoryError):
            crops = set()
    spec = job.spec()
    for k in present:
        if k >= job.num_samples or f"sample_{k}.png" not in names:
            continue
        entry = _read_json(sample_json(output_dir, job, k))
        if not isinstance(entry, dict):
            continue
        if entry.get("job") != spec:
            raise ValueError(f"{directory} holds sample {k} of a different job (image or mask content, prompt, seed, "
                             "options, framing (fit, context, feather), or the run's precision, config, model size "
                             "or weights differ); rename the job or remove that directory")
        if crops is not None and f"sample_{k}.png" not in crops:
            continue  # its crop is missing: the sample is computed again, with its crop
        distance = entry.get("distance")
        if isinstance(distance, (int, float)) and np.isfinite(distance):
            yield k, entry


def finished_samples(output_dir: str, job: Job) -> dict[int, dict]:
    """{k: report entry} for the samples of `job` on disk (PNG and JSON both present).

    Raises ValueError if the job's directory holds samples of a different job."""
    return dict(_finished_entries(output_dir, job))


def read_finished(output_dir: str, job: Job) -> Samples:
    """`job`'s finished samples on disk, as the small entries a run keeps in memory."""
    from bdjax import scores as scores_lib

    def value(entry: dict) -> float:  # ranked as this job's options say, from the stored scores
        scores = entry.get("scores")
        if not isinstance(scores, dict) or "clip_masked" not in scores:
            return float(entry["distance"])
        return scores_lib.rank_value(scores, job.options)

    return {k: (value(e), int(e.get("process_index", 0))) for k, e in _finished_entries(output_dir, job)}


def provenance(job: Job, label: str = "") -> dict:
    """What every PNG of `job` records (see outputs.read_provenance): its name, manifest line,
    identity (`Job.spec`: input digests, prompt, seed, options, the run's) and the smoke label."""
    record = {"job": job.name, "line": job.line, **job.spec()}
    if label:
        record["label"] = label
    return record


def write_sample(output_dir: str, job: Job, k: int, image: np.ndarray, distance: float, label: str = "", *,
                 crop: np.ndarray | None = None, framing: dict | None = None, scores: dict | None = None,
                 rank_value: float | None = None) -> dict:
    """The item's files, each PNG with its provenance: in window mode first `crop` (the
    model-size edit, crops/sample_<k>.png), then the sample `image` (the result the user gets:
    the photo at its own size in window mode, RGBA where the input has alpha), then its report
    entry (whose presence marks the item as done). `framing` (`Inputs.framing()`: the window,
    scale, context, feather; {} with fit="stretch") is recorded in all three, and `scores` (the
    sample's quality scores, bdjax/scores.py) with `rank_value` (what the job ranks it by; default
    the distance) in the PNGs and the entry."""
    framing = framing or {}
    scores = {"clip_masked": float(distance)} if scores is None else scores
    save = sample_png(output_dir, job, k)
    about = {**provenance(job, label), **framing}
    if crop is not None:
        outputs.save_png(crop_png(output_dir, job, k), crop,
                         outputs.sample_provenance(about, k, distance, kind="crop", scores=scores))
    outputs.save_png(save, image, outputs.sample_provenance(about, k, distance, scores=scores))
    entry = {"name": job.name, "line": job.line, "sample_id": k, "seed": job.seed, "distance": float(distance),
             "rank_value": float(distance if rank_value is None else rank_value), "scores": scores,
             "file": os.path.basename(save), "image": job.image, "mask": job.mask, "job": job.spec(),
             "process_index": jax.process_index()}
    if crop is not None:
        entry["crop"] = f"{outputs.CROPS_DIR}/{os.path.basename(save)}"
    if framing:
        entry["framing"] = framing
    if label:
        entry["label"] = label
    outputs.save_json(sample_json(output_dir, job, k), entry)
    return entry


def ranked(samples: Samples) -> list[dict]:
    """A job's samples best first: {rank, sample_id, rank_value, file, process_index}."""
    order = sorted(samples.items(), key=lambda item: (item[1][0], item[0]))
    return [{"rank": r, "sample_id": k, "rank_value": value, "file": f"sample_{k}.png", "process_index": writer}
            for r, (k, (value, writer)) in enumerate(order)]


def write_summary(output_dir: str, job: Job, samples: Samples, image_size: int, label: str = "",
                  grid_size: int = 8, diversity=None) -> bool:
    """ranked.json (samples best first, each with its distance and scores, the scores'
    aggregates, the ranking used and, given `diversity(images, region)` (BlendedDiffusion.
    diversity), the job's diversity; in window mode with the job's framing) and grid.png (the
    source and mask the results replace, then the best results, full-size ones downscaled to
    max(outputs.GRID_TILE, image_size) pixels wide, captioned with their scores) for a complete
    job; returns whether anything was written (nothing when the summary on disk already lists
    these samples)."""
    from bdjax import scores as scores_lib

    best = ranked(samples)
    entries = finished_samples(output_dir, job)
    for e in best:
        entry = entries.get(e["sample_id"], {})
        e["distance"] = entry.get("distance", e["rank_value"])
        e["scores"] = entry.get("scores") or {"clip_masked": e["distance"]}
    framing = job.framing_of(image_size)
    inputs = job.inputs(image_size)
    value = None
    if diversity is not None:
        where = crop_png if job.windowed else sample_png  # the model-size edits
        edits = [where(output_dir, job, e["sample_id"]) for e in best[:scores_lib.DIVERSITY_MAX]]
        value = diversity(np.stack([outputs.read_png(p) for p in edits]), inputs.region) if len(edits) > 1 else None
    summary = {"name": job.name, "line": job.line, "num_samples": job.num_samples, "job": job.spec(),
               "label": label or None, "rank_by": job.options.rank_by, "diversity": value,
               "aggregates": scores_lib.aggregate([e["scores"] for e in best]),
               "samples": [{k: e[k] for k in ("rank", "sample_id", "distance", "rank_value", "scores", "file")}
                           for e in best]}
    if framing:
        summary["framing"] = framing
    path = os.path.join(output_dir, job.name, RANKED)
    grid_path = os.path.join(output_dir, job.name, outputs.GRID)
    if _read_json(path) == summary and os.path.exists(grid_path):
        return False
    width = max(outputs.GRID_TILE, image_size)  # model-size results are shown as they are
    shown = best[:grid_size]
    images = [outputs.at_most(outputs.read_png(os.path.join(output_dir, job.name, e["file"])), width) for e in shown]
    heading = f"{job.prompt!r}: source, mask, best {len(images)} of {len(best)}"
    heading = f"{label}\n{heading}" if label else heading
    tiles = [{k: e[k] for k in ("rank", "sample_id", "distance", "scores")} for e in shown]
    outputs.save_png(grid_path, outputs.grid(outputs.at_most(inputs.full_source, width),
                                             outputs.at_most(inputs.full_mask, width), images,
                                             [e["distance"] for e in shown], heading,
                                             scores=[e["scores"] for e in shown]),
                     {"kind": "grid", **provenance(job, label), **framing, "tiles": tiles})
    outputs.save_json(path, summary)  # last: its presence means the grid is current
    return True
