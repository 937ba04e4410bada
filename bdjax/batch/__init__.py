"""Batch jobs: a JSON-lines manifest of edits, run as (job, sample) work items that resume.

One job per manifest line, e.g.

    {"image": "cat.png", "mask": "cat_mask.png", "prompt": "a tiger", "num_samples": 8, "seed": 1}
    {"name": "sky", "image": "beach.png", "mask": "sea.png", "invert_mask": true, "prompt": "aurora",
     "num_samples": 4, "seed": 2, "skip_timesteps": 30}

Each sample k of a job is a work item with one output, OUTPUT_DIR/<name>/sample_<k>.png, and
its report entry sample_<k>.json, both written atomically (the JSON last: it marks the item as
done). A job's framing (fields `fit`, `context`, `feather`, defaults from the run; see
request.prepare_inputs) says what the output is: in window mode (the default) the photo at its own
size with the model-size edit pasted in around the mask, that edit kept as
OUTPUT_DIR/<name>/crops/sample_<k>.png (written before the sample; a missing crop makes the item
missing); with fit="stretch" the model-size edit of the stretched image, as before. Sample k
depends only on the job's inputs, framing, seed and k, so items of different jobs that share
options are packed into the same batches (whatever their framing), and a rerun computes exactly
the items whose files are missing. A job is identified by the content of its image and mask (not
their paths), its prompt, seed and options, in window mode its framing, and the run's precision,
config, model size and weights: a job directory holding samples of another identity is refused,
never mixed. A job's summary (ranked.json, best first, and grid.png) is written when its last
sample is.

The parts:

- `manifest` (bdjax/batch/manifest.py): reading the manifest (`read_manifest`) prepares each job
  as an edit is prepared (bdjax/request.py): its prompt tokenized, its options and counts
  checked, and each distinct image and mask decoded once and kept for the run and the summaries
  (`InputCache`, bounded in bytes). A `Job`'s identity gets the run's part with `with_run`. A
  manifest is read within bounds (`MAX_MANIFEST_BYTES`, `MAX_MANIFEST_LINES`, `MAX_LINE_BYTES`).

- `store` (bdjax/batch/store.py): the output directory. A run holds a lock on it
  (`claim_output_dir`), so a second run refuses instead of computing everything twice; under it,
  temporaries left by killed runs are removed and every job's directory is probed before any
  compute. The sample files, read back to resume (`read_finished`), and the job summaries.

- `run` (bdjax/batch/run.py, reachable as `run_module`, since `batch.run` is its function): the
  work list (`pending_items`) and the run (`run`). A sample whose image or distance is not finite
  is reported as failed and not written; a job whose files cannot be written during the run is
  reported and its remaining samples are skipped; a rerun retries both.

Several processes (jax.distributed) build the same work list from the same disk state; every
batch is sharded over all devices of all processes and each process writes the rows its own
devices computed, so each item is written by exactly one process. After every batch the
processes exchange what became of each row (written, not finite, not writable), so they all
keep the same record and the same work list.
"""

from bdjax.batch import manifest, store
from bdjax.batch import run as run_module  # the submodule: `run` below is rebound to its function
from bdjax.batch.manifest import (
    DEFAULT_FRAMING,
    INPUT_CACHE_BYTES,
    JOB_FIELDS,
    MAX_LINE_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_LINES,
    OPTION_NAMES,
    REQUIRED,
    RESERVED_NAMES,
    InputCache,
    Job,
    ManifestError,
    check_name,
    file_sha256,
    manifest_lines,
    parse_job,
    read_manifest,
    run_identity,
    with_run,
)
from bdjax.batch.run import NOT_FINITE, RunStats, job_results, pending_items, run, write_summaries
from bdjax.batch.store import (
    LOCK,
    RANKED,
    OutputInUse,
    Samples,
    claim_output_dir,
    crop_png,
    finished_samples,
    job_dirs,
    probe_job_dir,
    provenance,
    ranked,
    read_finished,
    sample_json,
    sample_png,
    write_sample,
    write_summary,
)

__all__ = [
    "DEFAULT_FRAMING", "INPUT_CACHE_BYTES", "JOB_FIELDS", "LOCK", "MAX_LINE_BYTES", "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_LINES", "NOT_FINITE", "OPTION_NAMES", "RANKED", "REQUIRED",
    "RESERVED_NAMES", "InputCache", "Job", "ManifestError", "OutputInUse", "RunStats", "Samples", "check_name",
    "claim_output_dir", "crop_png", "file_sha256", "finished_samples", "job_dirs", "job_results", "manifest",
    "manifest_lines", "parse_job", "pending_items", "probe_job_dir", "provenance", "ranked", "read_finished",
    "read_manifest", "run", "run_identity", "run_module", "sample_json", "sample_png", "store", "with_run",
    "write_sample", "write_summaries", "write_summary",
]
