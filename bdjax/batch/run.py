"""Running a batch: the work list (`pending_items`), the batches computed and written (`run`),
on one process or several (jax.distributed) that exchange what became of every row, and the
run's per-job results (`job_results`) and summaries (`write_summaries`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

import jax
import numpy as np

from bdjax import parallel
from bdjax import scores as scores_lib
from bdjax.batch.manifest import Job, ManifestError
from bdjax.options import AUTO
from bdjax.batch.store import Samples, ranked, read_finished, sample_png, write_sample, write_summary

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

    Items that share (options, guided) are packed into batches of options.batch_size (with
    "auto", the editor's `batch_choice`) regardless of their job. `finished` (from
    `pending_items`; read from disk if None) is kept up to date in the returned stats, so no
    batch reads the disk; process 0 writes a job's summary when its
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
        # Jobs that differ only in how they rank share batches.
        groups.setdefault((jobs[j].options.sampling, jobs[j].prompt != ""), []).append((j, k))
    embeds: dict[str, np.ndarray] = {}
    count = 0
    for (options, guided), group in groups.items():
        # No batch larger than needed; with batch_size="auto", the largest that fits (bdjax/fit.py).
        rows = (editor.batch_choice(options, guided, len(group)).rows if options.batch_size == AUTO
                else min(options.batch_size, len(group)))
        position = 0
        while True:
            chunk = []
            while position < len(group) and len(chunk) < rows:
                if group[position][0] not in stats.job_errors:  # the same on every process
                    chunk.append(group[position])
                position += 1
            if not chunk:
                break
            # The jobs' prepared inputs (InputCache bounds the memory), kept for this batch's writes.
            prepared = {j: jobs[j].inputs(editor.image_size) for j, _ in chunk}
            arrays = {j: (inputs.init, inputs.region) for j, inputs in prepared.items()}  # as the sampler takes them
            for j in prepared:
                if jobs[j].prompt not in embeds:
                    embeds[jobs[j].prompt] = np.asarray(editor.encode_tokens(jobs[j].tokens))
            began = time.perf_counter()
            out = editor.sample(options, guided,
                                np.stack([arrays[j][0] for j, _ in chunk]),
                                np.stack([arrays[j][1] for j, _ in chunk]),
                                np.stack([embeds[jobs[j].prompt] for j, _ in chunk]),
                                np.array([k for _, k in chunk]), np.array([jobs[j].seed for j, _ in chunk]),
                                batch_rows=rows)
            stats.sample_s += time.perf_counter() - began
            outcome, distances, errors = _write_rows(output_dir, jobs, chunk, out, label, prepared)
            del prepared, arrays
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
                                                  stats.job_errors, editor.diversity)
            if on_batch is not None:
                on_batch(len(chunk))
    parallel.barrier("run finished")
    return stats


def _write_rows(output_dir, jobs, chunk, out, label, prepared) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Write this process's rows of a batch: (outcome and ranking value (by default the distance)
    per row of `chunk`, why a job's
    files could not be written). `prepared` holds the rows' jobs' Inputs: in window mode each
    model-size edit is pasted into its photo (`Inputs.compose`) one row at a time, so a batch
    holds one full-size result at most."""
    outcome = np.full(len(chunk), _NOT_MINE, np.int32)
    distances = np.zeros(len(chunk), np.float32)
    errors: dict[int, str] = {}
    finite = out.get("finite")
    if finite is None:
        finite = np.ones(len(out["rows"]), bool)
    all_scores = out.get("scores") or {"clip_masked": np.asarray(out["distances"])}
    for i, (row, image, distance, ok) in enumerate(zip(out["rows"], out["images"], out["distances"], finite)):
        j, k = chunk[row]
        job = jobs[j]
        if not ok:
            outcome[row] = _NOT_FINITE
            _say(f"failed: job {job.name!r} (manifest line {job.line}) sample {k}: {NOT_FINITE}")
        elif j in errors:
            outcome[row] = _UNWRITABLE
        else:
            try:
                edit = np.round(np.asarray(image) * 255).astype(np.uint8)
                inputs = prepared[j]
                scores = scores_lib.row(all_scores, i)
                value = scores_lib.rank_value(scores, job.options)
                if inputs.photo is None:  # fit="stretch": the model-size edit is the result
                    write_sample(output_dir, job, k, edit, distance, label, scores=scores, rank_value=value)
                else:
                    write_sample(output_dir, job, k, inputs.compose(edit[None])[0], distance, label, crop=edit,
                                 framing=inputs.framing(), scores=scores, rank_value=value)
                outcome[row], distances[row] = _WRITTEN, value
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
               job_errors: dict, diversity=None) -> int:
    """Write a complete job's summary; a failure to write it is recorded in `job_errors`."""
    try:
        return int(write_summary(output_dir, job, samples, image_size, label, diversity=diversity))
    except OSError as e:
        job_errors[j] = f"cannot write its summary {e.filename or ''} ({e.strerror or e}); a rerun retries it"
        _say(f"failed: job {job.name!r} (manifest line {job.line}): {job_errors[j]}")
        return 0


def job_results(jobs: list[Job], stats: RunStats, image_size: int | None = None) -> list[dict]:
    """Per job, for the run's report: the options it ran with, in window mode its framing
    (`Job.framing_of` at `image_size`, by default the run identity's), its samples best first,
    the samples that failed in this run and why, and why its files could not be written (if so)."""
    results = []
    for j, job in enumerate(jobs):
        samples = stats.finished[j]
        result = {"name": job.name, "line": job.line, "prompt": job.prompt, "num_samples": job.num_samples,
                  "options": dataclasses.asdict(job.options), "complete": len(samples) == job.num_samples,
                  "rank_by": job.options.rank_by,
                  "samples": [{"seed": job.seed, "sample_id": e["sample_id"], "rank_value": e["rank_value"],
                               "file": e["file"], "process_index": e["process_index"]} for e in ranked(samples)]}
        if job.options.rank_by == "clip_masked":  # the value ranked by is the distance
            for e in result["samples"]:
                e["distance"] = e["rank_value"]
        if job.windowed:
            size = dict(job.run).get("image_size") if image_size is None else image_size
            result["framing"] = job.framing_of(size) if size else job.framing()
        if j in stats.failures:
            result["failed"] = [{"sample_id": k, "reason": reason} for k, reason in sorted(stats.failures[j].items())]
        if j in stats.job_errors:
            result["error"] = stats.job_errors[j]
        results.append(result)
    return results


def write_summaries(output_dir: str, jobs: list[Job], image_size: int, label: str = "",
                    finished: list[Samples] | None = None, job_errors: dict | None = None, diversity=None) -> int:
    """Summaries of the complete jobs among `jobs` (`finished`: their Samples, else read from
    disk) but those in `job_errors`, where a failure to write one is recorded; returns how many
    were (re)written."""
    job_errors = {} if job_errors is None else job_errors
    written = 0
    for j, job in enumerate(jobs):
        samples = read_finished(output_dir, job) if finished is None else finished[j]
        if len(samples) == job.num_samples and j not in job_errors:
            written += _summarize(output_dir, job, j, samples, image_size, label, job_errors, diversity)
    return written
