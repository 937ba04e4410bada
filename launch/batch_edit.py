"""Run a manifest of edits: python -m launch.batch_edit --manifest=jobs.jsonl --output_dir=out

One JSON object per line: image, prompt, num_samples, seed (required), mask, invert_mask, name,
fit, context, feather (--fit, --context and --feather by default) and any EditOptions name
(skip_timesteps, local_clip_guided_diffusion, ...) (optional); relative paths are relative to the
manifest. Writes OUTPUT_DIR/<name>/sample_<k>.png (in window mode the photo at its own size, the
model-size edit in OUTPUT_DIR/<name>/crops/sample_<k>.png) and .json per sample,
OUTPUT_DIR/<name>/ranked.json and grid.png per finished job, OUTPUT_DIR/report.json.
Rerunning the same command finishes what is missing: finished samples are found on disk.
Runs unchanged on several processes (--distributed, or a TPU pod): see bdjax/batch/.

A run locks OUTPUT_DIR (a second run on it refuses at once). Exit status: 0 when every sample of
the valid jobs is on disk (bad manifest lines and jobs that cannot be written are reported and
skipped; --strict makes them errors); 2 for bad input (flags, an unreadable manifest, an unusable
or locked output directory), before any network is loaded, or when every job's directory holds
another job's samples (the previous report is kept); 1 when samples failed during the run (not
finite, or their files could not be written): they are listed in report.json and a rerun retries
them; 130 after Ctrl-C, which keeps every sample written and says how many: rerun to resume.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import warnings

from absl import app, flags

from launch import cli, runtime

FLAGS = flags.FLAGS
# How far this run got, for `interrupted`: its output directory once claimed, then its jobs once
# their samples on disk are known.
_progress: dict = {}


def define_flags():
    runtime.define_flags()
    # Every edit option is a flag too: the run's value for every job, which a job's field overrides.
    runtime.define_option_flags()
    cli.define_framing_flags()  # --fit, --context, --feather: every job's, which its fields override
    flags.adopt_module_key_flags(runtime)  # --help lists them too
    flags.adopt_module_key_flags(cli)
    flags.DEFINE_string("manifest", None, "JSON-lines file, one job per line.")
    flags.DEFINE_string("output_dir", None, "Where each job's directory is written.")
    flags.DEFINE_bool("strict", False, "Stop at the first bad manifest line instead of skipping it.")


def base_options():
    """The run's options for every job: the flags' (the smoke preset's where unset with
    --config=smoke); a job's own fields override them."""
    from bdjax.options import EditOptions

    return EditOptions.from_fields(runtime.options_from_flags())


def framing():
    """The run's framing for every job (--fit, --context, --feather); a job's own fields override
    it. FlagError naming the flag when it cannot be used."""
    from bdjax import request
    from bdjax.errors import OptionError

    framing = cli.framing_from_flags()
    try:
        request.check_framing(**framing)
    except OptionError as e:  # "context=-1.0 must be ..." said of the flag
        raise cli.FlagError(f"--{e}") from None
    return framing


def interrupted() -> str:
    """What Ctrl-C leaves (cli.program prints it): the samples on disk, counted there, since the
    batch being written when it came may be partly on disk and not yet recorded."""
    from bdjax import batch

    out, jobs = _progress.get("output_dir"), _progress.get("jobs")
    if out is None:
        return "nothing was written"
    if jobs is None:
        return f"no sample was computed yet and {out} keeps what it held; rerun the same command to resume"
    kept = [len(batch.read_finished(out, job)) for job in jobs]
    complete = sum(n == job.num_samples for n, job in zip(kept, jobs))
    return (f"{sum(kept)} of {sum(job.num_samples for job in jobs)} samples ({complete} of {len(jobs)} jobs complete) "
            f"are kept in {out}; rerun the same command to resume")


def every_job_conflicts(conflicts) -> ValueError:
    """The error of a rerun that can run nothing: every job's directory holds another job's
    samples. It stops the run before the previous run's report is replaced."""
    return ValueError(f"every job conflicts with the results in --output_dir={os.path.abspath(FLAGS.output_dir)}, so "
                      f"nothing can run: {first_and_more(conflicts)}; or choose another --output_dir")


def first_and_more(errors: list, noun: str = "") -> str:
    """The first of `errors`, and how many more there are ("(and 2 more bad line(s))")."""
    return f"{errors[0]}" + (f" (and {len(errors) - 1} more{noun})" if len(errors) > 1 else "")


def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.manifest or not FLAGS.output_dir:
        raise cli.FlagError("--manifest and --output_dir are required")
    run_framing = framing()
    runtime.setup()
    import jax

    from bdjax import batch, smoke

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    if not lead:  # every process reads the manifest; one reports on it
        warnings.simplefilter("ignore")
    image_size = smoke.IMAGE_SIZE if FLAGS.config == "smoke" else int(FLAGS.model_output_size)
    start = time.perf_counter()
    with cli.user_errors():
        jobs, errors = batch.read_manifest(FLAGS.manifest, image_size, base_options(),
                                           label=f"--manifest={FLAGS.manifest}", output_dir_label="--output_dir",
                                           framing=run_framing)
        if errors and FLAGS.strict:
            raise errors[0]
        if not jobs:  # nothing to run: say why now, before any network is built
            raise ValueError(f"{FLAGS.manifest} has no valid job"
                             + (f": {first_and_more(errors, ' bad line(s)')}" if errors else ""))
        for e in errors:
            say(f"skipped: {e}", file=sys.stderr)
        # The lock is held until the run ends; only then is the directory free for another run.
        with batch.claim_output_dir(FLAGS.output_dir, jobs, label=f"--output_dir={os.path.abspath(FLAGS.output_dir)}"
                                    ) as (jobs, unwritable, removed):
            _progress["output_dir"] = FLAGS.output_dir
            if unwritable and (FLAGS.strict or not jobs):  # nothing to run: the previous report stays
                raise unwritable[0] if FLAGS.strict else ValueError(
                    f"no job can be written in --output_dir={FLAGS.output_dir}: {first_and_more(unwritable)}")
            for e in unwritable:
                say(f"skipped: {e}", file=sys.stderr)
            if removed:
                say(f"removed {len(removed)} temporary file(s) left by an interrupted run", file=sys.stderr)
            failed = run_jobs(jobs, errors + unwritable, image_size, start)
    if failed:  # the summary line and report.json say which; a rerun retries them
        sys.exit(1)


def run_jobs(jobs, skipped_lines, image_size: int, start: float) -> int:
    """Build the networks, run the jobs' missing samples, write the report; returns how many of
    the jobs' samples are still missing (failed) at the end."""
    import collections

    import jax
    from tqdm.auto import tqdm

    from bdjax import batch, guidance, outputs, smoke
    from bdjax.options import AUTO

    lead = jax.process_index() == 0
    say = print if lead else (lambda *a, **k: None)
    label = smoke.LABEL if FLAGS.config == "smoke" else ""
    need_lpips = any(guidance.needs_lpips(job.options) for job in jobs)
    editor = runtime.build_editor(runtime.with_lpips(need_lpips))
    for job in jobs:  # what the manifest cannot know: e.g. LPIPS weights present
        editor.options(**dataclasses.asdict(job.options))
    loaded = time.perf_counter()
    jobs = batch.with_run(jobs, batch.run_identity(FLAGS.precision, FLAGS.config, image_size, editor.weights_digest))
    jobs, items, conflicts, finished = batch.pending_items(FLAGS.output_dir, jobs)
    if conflicts and FLAGS.strict:
        raise conflicts[0]
    if conflicts and not jobs:
        raise every_job_conflicts(conflicts)
    _progress["jobs"] = jobs
    for e in conflicts:
        say(f"skipped: {e}", file=sys.stderr)
    uneven = sorted({j.options.batch_size for j in jobs  # "auto" picks a multiple of the device count
                     if j.options.batch_size != AUTO and j.options.batch_size % jax.device_count()})
    if uneven:
        say(f"warning: batch_size {uneven} is not a multiple of the {jax.device_count()} devices; batches are "
            "padded and the padded rows are computed for nothing", file=sys.stderr)
    total = sum(j.num_samples for j in jobs)
    say(f"{len(jobs)} jobs, {total} samples: {total - len(items)} already in {FLAGS.output_dir}, "
        f"{len(items)} to compute on {jax.device_count()} devices ({jax.process_count()} processes)")
    # As batch.run groups them: jobs that differ only in how they rank share batches.
    runs = collections.Counter((jobs[j].options.sampling, jobs[j].prompt != "") for j, _ in items)
    if items:
        runtime.announce_run(editor, [(options, guided, n) for (options, guided), n in runs.items()])
    with tqdm(total=len(items), desc="batch", unit="sample", disable=not lead or not items) as bar:  # closed on Ctrl-C
        runtime.announce_compiles(editor, bar)
        stats = batch.run(editor, jobs, FLAGS.output_dir, items, finished=finished, label=label, on_batch=bar.update)
    missing = stats.total - sum(len(samples) for samples in stats.finished)
    if lead:  # also a job finished by an earlier, killed run whose summary was never written
        stats.summaries += batch.write_summaries(FLAGS.output_dir, jobs, image_size, label, stats.finished,
                                                 stats.job_errors, diversity=editor.diversity)
        done = time.perf_counter()
        report = run_report(jobs, skipped_lines + conflicts, stats, label,
                            {"load": loaded - start, "sample": stats.sample_s, "total": done - start,
                             "per_sample": stats.sample_s / max(1, stats.computed)}, image_size)
        # Each configuration's batch: its rows, and with batch_size="auto" how they were chosen.
        report["batches"] = [{"batch_size": options.batch_size, "guided": guided, "samples": n,
                              **editor.batch_choice(options, guided, n).report()}
                             for (options, guided), n in runs.items()]
        try:
            outputs.save_json(os.path.join(FLAGS.output_dir, outputs.REPORT), report)
        except OSError as e:  # e.g. the disk filled up: the samples on disk stay valid
            print(f"failed: cannot write {os.path.join(FLAGS.output_dir, outputs.REPORT)} ({e.strerror or e})",
                  file=sys.stderr)
            missing += 1
        items_report = report["items"]
        say(f"{items_report['computed']} computed, {items_report['skipped']} skipped, "
            f"{items_report['failed']} failed, {len(skipped_lines) + len(conflicts)} lines skipped; "
            f"report in {os.path.join(FLAGS.output_dir, outputs.REPORT)}" + (f"\n{label}" if label else ""))
    return missing + len(stats.job_errors)


def run_report(jobs, errors, stats, label: str, timings: dict, image_size: int | None = None) -> dict:
    """The run's report, with every job's samples (written by any process) and what failed. The
    edit options appear as they ran: the run's for every job under "options" (the smoke preset's
    where its flags were unset) and each job's own in its result; so does the framing (--fit,
    --context, --feather under "flags"; a window-mode job's window, scale, context and feather
    under "framing" in its result)."""
    from bdjax import batch
    results = batch.job_results(jobs, stats, image_size)
    done = sum(len(samples) for samples in stats.finished)
    return {
        "manifest": os.path.abspath(FLAGS.manifest),
        "flags": cli.reported_flags(sys.modules[__name__]),
        "options": dataclasses.asdict(base_options()),
        "label": label or None,
        "jobs": {"valid": len(jobs), "skipped_lines": [{"line": e.line, "error": e.reason} for e in errors]},
        "items": {"total": stats.total, "skipped": stats.skipped, "computed": stats.computed,
                  "failed": stats.total - done, "summaries_written": stats.summaries},
        "results": results,
        "timings_s": timings,
        **cli.environment(),
    }


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main, interrupted=interrupted), flags_parser=cli.parse_flags)
