"""The GPU proof: bdjax's speed, the authors' speed and determinism on one GPU, in one command, within a budget.

On a bare machine with one GPU (written for one H200), on random networks of the real shapes (ADM 256
unconditional + CLIP ViT-B/16), it measures and writes to --output as JSON, most important first:

  step_bf16   bdjax's guided step (bench/benchmark.py's BdjaxStep) in bf16 at batch 16: compile time,
              median step time, samples/s, XLA's FLOP count, MFU against the MEASURED peak (and the
              analytic MFU, a backward counted as two forwards), peak memory, whether two runs are
              byte-identical, and the largest batch XLA's memory analysis predicts to fit;
  peak        the measured peak: an 8192^3 matmul in bf16, and in fp32 at jax's default precision (where
              XLA may use TF32) and at Precision.HIGHEST, timed with jax on the device;
  sampler     the whole sampler end to end, BlendedDiffusion(...).edit(...) for 64 samples at the
              reference's defaults (respacing "100", skip 25 -> 75 steps, aug_num 8) in bf16, run cold
              (compilation included) and warm on the same inputs: "64 ranked edits in N s", and whether
              the two runs are byte-identical;
  reference   the authors' step rebuilt in PyTorch (bench/benchmark.py's prepare_reference: fp16
              convolutions as their use_fp16, fp16 CLIP) at the same batch: samples/s, and the ratio to
              step_bf16's;
  determinism when the step or the sampler was not byte-identical (GPU scatter-adds use atomics): again in
              a process with XLA_FLAGS=--xla_gpu_deterministic_ops=true, the step (identical? its time
              against the default step's) and, if time allows, the sampler run twice;
  fit         the sampler's loop program (bf16, no remat, 32 per GPU, with LPIPS: bench/compile_report.py's
              networks from shapes) compiled on the GPU, Triton GEMMs autotuned: XLA's memory figures,
              to compare with the same row of docs/performance.md ("What fits on a GPU", compiled
              there without a GPU), and the memory limit the runtime reports against the GPU's
              HBM, the share --batch_size=auto and the compile report's --max_batch_budget=auto
              take to be JAX's default 75 %;
  step_fp32   bdjax's step in fp32 at batch 4, MFU against the measured fp32 peaks;
  max_batch   the largest bf16 batch of the step that runs, doubling from the largest batch already
              seen running, up to 256.

    bash bench/gpu_proof.sh OUT_DIR                             # on the GPU machine, with .whl/ carried
    python -m bench.gpu_proof --output=proof.json               # where the references are installed
    python -m bench.gpu_proof --config=smoke --output=dry.json  # the CPU dry run: every phase, tiny

The phases run in four processes, one after the other, so that no process holds GPU memory while
another runs (JAX keeps what it has grown into) and a crash in one loses only its own phases: "main"
(step_bf16, peak, sampler), "reference" (PyTorch alone), "deterministic" (with the XLA flag) and
"extras" (fit, step_fp32, max_batch). Every process rewrites --output after each phase, so a kill keeps
what finished; a phase in progress is marked "running" and ends up "killed". Before each phase its
time is estimated from what was measured so far (the step's compile time, step time and process
setup); a phase that would not end within --budget_s is skipped with a note, and a process still
running 10 s past the budget is stopped.

No persistent compilation cache by default: the programs of one run all differ (batch, dtype, XLA
flags), so the processes could share nothing through it, and the sampler's "cold" time is then
truly cold. --compilation_cache_dir helps a second run on the same machine (with --phases for what
the first had to skip); the JSON records how many entries the cache held at the start.

Weights are random: speed does not depend on their values, and nothing is downloaded.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

from absl import app, flags

from bdjax.outputs import finite_or_none

FLAGS = flags.FLAGS

PHASES = ("step_bf16", "peak", "sampler", "reference", "determinism", "fit", "step_fp32", "max_batch")
# The processes, in order, and their phases.
GROUPS = {"main": ("step_bf16", "peak", "sampler"), "reference": ("reference",), "deterministic": ("determinism",),
          "extras": ("fit", "step_fp32", "max_batch")}
DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"
# Older/newer XLA builds may know only the narrower flag; tried when XLA rejects the first.
DETERMINISTIC_FALLBACK_FLAG = "--xla_gpu_exclude_nondeterministic_ops=true"
PROMPT = "a red ball on the grass"
EDIT_SEED = 404  # the reference's default seed

# The project's targets on one H200 in bf16: printed next to the measured values, never asserted.
TARGETS = {
    "mfu_bf16_min": 0.55,              # guided step, XLA FLOPs against the measured bf16 peak
    "edits_64_warm_s_max": 75.0,       # 64 ranked 256x256 edits, compiled sampler
    "speedup_vs_reference_min": 20.0,  # samples/s against the authors' step on the same GPU
}

CONFIGS = {
    # The real shapes on one GPU.
    "real": dict(bf16_batch=16, fp32_batch=4, aug_num=8, timestep_respacing="100",
                 skip_timesteps=25, num_samples=64, sampler_batch=None, sampler_batch_cap=64, iters=5, warmup=1,
                 step_index=50, matmul_n=8192, matmul_iters=10, max_batch_limit=256, det_samples=16, fit_batch=32,
                 # Used before anything is measured: a full-size compile, a batch-16 step, a process's setup;
                 # the first phase starts when at least first_phase_min_s are left.
                 guess_compile_s=120.0, guess_step_s=0.5, guess_setup_s=30.0, first_phase_min_s=20.0),
    # The CPU dry run: every phase on the smoke networks with few steps and small batches.
    "smoke": dict(bf16_batch=2, fp32_batch=2, aug_num=2, timestep_respacing="10", skip_timesteps=5,
                  num_samples=4, sampler_batch=2, sampler_batch_cap=4, iters=2, warmup=1, step_index=50,
                  matmul_n=256, matmul_iters=3, max_batch_limit=4, det_samples=2, fit_batch=2,
                  guess_compile_s=20.0, guess_step_s=0.5, guess_setup_s=5.0, first_phase_min_s=1.0),
}


def define_flags() -> None:
    """The command line (defined when this module runs as the program, as bench/benchmark.py does)."""
    flags.DEFINE_enum("config", "real", sorted(CONFIGS),
                      "real: ADM 256 uncond + CLIP ViT-B/16 at their real sizes (a GPU); smoke: the CPU dry run "
                      "on the smoke networks.")
    flags.DEFINE_string("output", "gpu_proof.json", "The JSON written after every phase.")
    flags.DEFINE_float("budget_s", 450.0, "Wall-clock seconds for the whole proof; later phases are skipped when "
                       "they would not fit.")
    flags.DEFINE_list("phases", list(PHASES), f"Phases to run, of {','.join(PHASES)} (always in that order).")
    flags.DEFINE_enum("deterministic", "auto", ["auto", "always", "never"],
                      "The deterministic-ops subprocess: auto runs it when a step or sampler rerun was not "
                      "byte-identical.")
    flags.DEFINE_integer("num_samples", None, "Samples of the sampler phase (default: 64, smoke: 4).")
    flags.DEFINE_integer("sampler_batch", None, "Batch of the sampler phase (default: the largest power of two up to "
                         "64 that XLA's memory analysis of the step predicts to fit; smoke: 2).")
    flags.DEFINE_integer("iters", None, "Timed steps per measurement; the median is reported (default 5, smoke 2).")
    flags.DEFINE_integer("seed", 0, "Seed of the random networks and inputs.")
    flags.DEFINE_string("compilation_cache_dir", "",
                        "Persistent XLA compilation cache shared by the processes (default: none; see above).")
    flags.DEFINE_integer("max_batch_start", None, "Batch known to run, where the max_batch search starts doubling "
                         "(default: the largest batch seen running in this run: the step's or the sampler's).")
    flags.DEFINE_enum("internal_role", "orchestrate", ["orchestrate", *GROUPS],
                      "Internal: which process this is (the orchestrator starts the others).")
    flags.DEFINE_float("internal_deadline", None, "Internal: the budget's end, in seconds since the epoch.")


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------- settings


def settings_from_flags() -> dict:
    """The configuration's values with the flags' overrides, checked."""
    if FLAGS.config not in CONFIGS:
        raise UsageError(f"--config must be one of {sorted(CONFIGS)}")
    s = dict(CONFIGS[FLAGS.config], config=FLAGS.config, seed=FLAGS.seed, max_batch_start=None,
             deterministic=FLAGS.deterministic)
    for name in ("num_samples", "sampler_batch", "iters", "max_batch_start"):
        value = getattr(FLAGS, name)
        if value is not None:
            if value < 1:
                raise UsageError(f"--{name} must be at least 1")
            s[name] = value
    if not FLAGS.budget_s > 0 or not math.isfinite(FLAGS.budget_s):
        raise UsageError("--budget_s must be a positive number of seconds")
    unknown = [p for p in FLAGS.phases if p not in PHASES]
    if unknown or not FLAGS.phases:
        raise UsageError(f"--phases: unknown {unknown}; choose from {','.join(PHASES)}" if unknown
                         else "--phases is empty")
    if {"reference", "sampler"} & set(FLAGS.phases) and "step_bf16" not in FLAGS.phases:
        raise UsageError("--phases: sampler and reference need step_bf16 (its networks and timings)")
    if not FLAGS.output:
        raise UsageError("--output is empty")
    from bdjax.diffusion import respaced_length

    s["phases"] = [p for p in PHASES if p in FLAGS.phases]
    s["steps"] = respaced_length(s["timestep_respacing"]) - s["skip_timesteps"]
    return s


# --------------------------------------------------------------------------------------- record


class Record:
    """The JSON at --output: every process reads it, adds its sections, and rewrites it atomically."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self.data: dict = {}

    def load(self) -> "Record":
        with open(self.path) as f:
            self.data = json.load(f)
        return self

    def save(self) -> None:
        derive(self.data)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            # Strict JSON: a non-finite figure is written as null.
            json.dump(finite_or_none(self.data), f, indent=2, default=_json_default, allow_nan=False)
            f.write("\n")
        os.replace(tmp, self.path)

    def phase(self, name: str, status: str, **info) -> None:
        phases = self.data.setdefault("phases", {})
        entry = {"status": status, **info}
        if status == "killed":  # keep what the running phase recorded (its process, its estimate)
            entry = {**{k: v for k, v in phases.get(name, {}).items() if k in ("pid", "estimated_s")}, **entry}
        phases[name] = entry

    def section(self, name: str) -> dict:
        return self.data.setdefault(name, {})


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ratio(a, b):
    return a / b if _finite(a) and _finite(b) and b > 0 else None


def is_real(data: dict) -> bool:
    """Whether a proof's JSON is of the real config (older JSON names it "full")."""
    return data.get("config") in ("real", "full")


def derive(data: dict) -> None:
    """Figures computed from the measured ones (MFUs against the measured peaks, ratios, the targets);
    recomputed at every save, so a partial JSON holds all that its measurements allow."""
    peak = data.get("peak", {})
    for name, key in (("step_bf16", "bf16_tflops"), ("step_fp32", "fp32_tflops")):
        step = data.get(name)
        if not step or not _finite(step.get("achieved_tflops")):
            continue
        step["peak_tflops_measured"] = peak.get(key)
        step["mfu"] = _ratio(step["achieved_tflops"], peak.get(key))
        analytic = step.get("analytic_flops_per_step")
        step["mfu_analytic"] = (_ratio(analytic / step["step_s"] / 1e12, peak.get(key))
                                if _finite(analytic) and _finite(step.get("step_s")) else None)
        if name == "step_fp32":
            step["mfu_vs_fp32_highest"] = _ratio(step["achieved_tflops"], peak.get("fp32_highest_tflops"))
    sampler, step = data.get("sampler"), data.get("step_bf16", {})
    if sampler and _finite(sampler.get("warm_s")):
        flops = step.get("flops_per_sample_step")
        sample_steps = sampler["num_samples"] * sampler["steps"]
        sampler["achieved_tflops_est"] = (flops * sample_steps / sampler["warm_s"] / 1e12) if _finite(flops) else None
        sampler["mfu_est"] = _ratio(sampler["achieved_tflops_est"], peak.get("bf16_tflops"))
    det = data.get("determinism")
    if det and _finite(det.get("det_step_s")):
        det["det_step_cost"] = _ratio(det["det_step_s"], step.get("step_s"))
    reference = data.get("reference", {})
    checks = {
        "mfu_bf16": (step.get("mfu"), TARGETS["mfu_bf16_min"], ">="),
        "edits_64_warm_s": ((sampler or {}).get("warm_s") if (sampler or {}).get("num_samples") == 64 else None,
                            TARGETS["edits_64_warm_s_max"], "<="),
        "speedup_vs_reference": (reference.get("speedup"), TARGETS["speedup_vs_reference_min"], ">="),
    }
    data["targets"] = {
        name: {"target": f"{op} {target:g}", "measured": value,
               "met": None if not _finite(value) else (value >= target if op == ">=" else value <= target)}
        for name, (value, target, op) in checks.items()}
    if not is_real(data):
        data["targets_note"] = "the targets are for the real config on one H200; this run is not that"


# --------------------------------------------------------------------------------------- budget


class Budget:
    def __init__(self, deadline: float):
        self.deadline = deadline

    def remaining(self) -> float:
        return self.deadline - time.time()

    def why_not(self, need_s: float, what: str) -> str | None:
        """None when `need_s` seconds fit in what is left, else the reason to skip."""
        left = self.remaining()
        if left >= need_s and left > 0:
            return None
        return f"budget: {max(left, 0):.0f} s left, {what} needs about {need_s:.0f} s"


def estimates(data: dict, s: dict) -> dict:
    """What the phases' costs are estimated from: the measured batch-`bf16_batch` step (compile,
    step, process setup), or the configuration's guesses before it ran."""
    step = data.get("step_bf16", {})
    compile_s = step.get("compile_s") if _finite(step.get("compile_s")) else s["guess_compile_s"]
    step_s = step.get("step_s") if _finite(step.get("step_s")) else s["guess_step_s"]
    setup_s = step.get("setup_s") if _finite(step.get("setup_s")) else s["guess_setup_s"]
    return {"compile_s": compile_s, "step_s": step_s, "setup_s": setup_s}


def step_time_at(est: dict, s: dict, batch: int) -> float:
    """A guided step at `batch`, scaled linearly from the measured batch."""
    return est["step_s"] * max(batch, 1) / s["bf16_batch"]


def sampler_run_s(est: dict, s: dict, batch: int, num_samples: int) -> float:
    chunks = -(-num_samples // batch)
    return 1.15 * s["steps"] * chunks * step_time_at(est, s, batch) + 2.0


# ------------------------------------------------------------------------------------- children


def log(data: dict, message: str) -> None:
    elapsed = time.time() - data.get("started_unix", time.time())
    print(f"[{elapsed:6.1f} s] {message}", flush=True)


def run_phase(rec: Record, budget: Budget, s: dict, name: str, need_s: float, fn) -> object:
    """Run `fn()` as phase `name` unless it is not selected or does not fit; record its outcome."""
    if name not in s["phases"]:
        rec.phase(name, "skipped", note="not in --phases")
        rec.save()
        return None
    why = budget.why_not(need_s, name)
    if why:
        rec.phase(name, "skipped", note=why)
        rec.save()
        log(rec.data, f"{name}: skipped ({why})")
        return None
    rec.phase(name, "running", estimated_s=need_s, pid=os.getpid())
    rec.save()
    log(rec.data, f"{name}: started (estimated {need_s:.0f} s, {budget.remaining():.0f} s left)")
    if os.environ.get("BDJAX_GPU_PROOF_STALL_PHASE") == name:  # tests: a phase that overruns the budget
        time.sleep(10 ** 6)
    began = time.perf_counter()
    try:
        out = fn()
    except Exception as error:  # noqa: BLE001 - one phase's failure must not lose the others
        traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())[:600]
        rec.phase(name, "failed", error=message, seconds=time.perf_counter() - began)
        rec.save()
        log(rec.data, f"{name}: FAILED: {message[:200]}")
        return None
    rec.phase(name, "done", seconds=time.perf_counter() - began)
    rec.save()
    log(rec.data, f"{name}: done in {time.perf_counter() - began:.1f} s")
    return out


def setup_jax(rec: Record) -> None:
    import jax

    if FLAGS.compilation_cache_dir:
        cache = os.path.abspath(FLAGS.compilation_cache_dir)
        os.makedirs(cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def outputs_identical(a, b) -> bool:
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).shape == np.asarray(y).shape and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb))


def matmul_tflops(dtype, n: int, iters: int, precision=None, rounds: int = 3) -> float:
    """Best of `rounds` of `iters` back-to-back jitted n x n x n matmuls on random normal data."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, precision=precision))
    for _ in range(3):
        jax.block_until_ready(f(a, b))
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        outs = [f(a, b) for _ in range(iters)]
        jax.block_until_ready(outs)
        best = min(best, (time.perf_counter() - start) / iters)
        del outs
    return 2 * n ** 3 / best / 1e12


def predicted_max_batch(memory: dict, batch: int, bytes_limit: int | None, limit: int) -> int | None:
    """The largest batch * 2^k <= limit whose memory, extrapolated linearly from XLA's memory
    analysis at `batch` (arguments fixed, temporaries and outputs per sample), fits in 95 % of the
    device's allocator limit; None without the figures (e.g. on CPU)."""
    if not memory or not bytes_limit or "temp_size_in_bytes" not in memory:
        return None
    fixed = memory.get("argument_size_in_bytes", 0)
    per_sample = (memory["temp_size_in_bytes"] + memory.get("output_size_in_bytes", 0)) / batch
    best = batch
    while best * 2 <= limit and fixed + best * 2 * per_sample <= 0.95 * bytes_limit:
        best *= 2
    return best


def device_bytes_limit() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def timed_step_figures(run, batch: int, iters: int) -> dict:
    from bench import benchmark

    times = benchmark.time_steps({"bdjax": run}, iters, interleave=False)["bdjax"]
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_s_min": min(times), "step_s_all": times, "samples_per_s": batch / step_s}


def step_section(s: dict, precision: str, batch: int, bench_figures: dict, timing: dict, prepare_s: float) -> dict:
    from bench import benchmark

    analytic = benchmark.analytic_flops_per_sample_step(s["config"], s["aug_num"])
    out = {"precision": precision, "batch_size": batch, "aug_num": s["aug_num"], "step_index": s["step_index"],
           "iters": s["iters"], "warmup": s["warmup"], **bench_figures, **timing,
           "achieved_tflops": bench_figures["flops_per_step"] / timing["step_s"] / 1e12,
           "analytic_flops_per_sample_step": analytic,
           "analytic_flops_per_step": None if analytic is None else analytic * batch,
           "prepare_s": prepare_s}
    return out


def proof_inputs(size: int, seed: int):
    """A random RGB image and a centred square mask (uint8), as a user would pass them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:3 * size // 4, size // 4:3 * size // 4] = 255
    return image, mask


def compare_edits(first, second) -> dict:
    """Byte comparison of two EditResults of the same request, sample by sample."""
    import numpy as np

    o1, o2 = np.argsort(first.sample_ids), np.argsort(second.sample_ids)
    same_ids = np.array_equal(first.sample_ids[o1], second.sample_ids[o2])
    im1, im2 = first.images[o1], second.images[o2]
    d1, d2 = np.asarray(first.distances)[o1], np.asarray(second.distances)[o2]
    image_diff = np.abs(im1.astype(np.int16) - im2.astype(np.int16))
    images_identical = bool(same_ids and im1.tobytes() == im2.tobytes())
    distances_identical = bool(same_ids and d1.tobytes() == d2.tobytes())
    return {"identical": images_identical and distances_identical, "images_identical": images_identical,
            "distances_identical": distances_identical, "max_abs_image_diff": int(image_diff.max()),
            "samples_differing": int((image_diff.reshape(len(im1), -1).max(axis=1) > 0).sum()),
            "max_abs_distance_diff": float(np.abs(d1.astype(np.float64) - d2.astype(np.float64)).max())}


def timed_edits(editor, s: dict, batch: int, num_samples: int):
    """One edit() call of the sampler phase: (EditResult, wall seconds)."""
    image, mask = proof_inputs(editor.image_size, s["seed"])
    start = time.perf_counter()
    result = editor.edit(image, mask, PROMPT, num_samples=num_samples, seed=EDIT_SEED, progress=False,
                         timestep_respacing=s["timestep_respacing"], skip_timesteps=s["skip_timesteps"],
                         aug_num=s["aug_num"], batch_size=batch)
    return result, time.perf_counter() - start


def editor_from(bench):
    from bdjax.editor import BlendedDiffusion

    return BlendedDiffusion((bench.models.unet, bench.params["unet"]), (bench.models.clip, bench.params["clip"]))


def cold_and_warm(rec: Record, budget: Budget, section: dict, editor, s: dict, batch: int, num_samples: int,
                  est: dict, prefix: str = "") -> None:
    """Run the same edit request twice (cold: compiling; warm), filling `section` and saving after each."""
    result, cold_s = timed_edits(editor, s, batch, num_samples)
    section[f"{prefix}cold_s"] = cold_s
    section[f"{prefix}best_distance"] = float(result.distances[0])
    rec.save()
    log(rec.data, f"{prefix or 'sampler '}cold: {num_samples} samples at batch {batch} in {cold_s:.1f} s")
    why = budget.why_not(sampler_run_s(est, s, batch, num_samples), "the warm sampler run")
    if why:
        section[f"{prefix}warm_s"] = None
        section[f"{prefix}note"] = f"warm run skipped ({why}); identity not checked"
        return
    again, warm_s = timed_edits(editor, s, batch, num_samples)
    section[f"{prefix}warm_s"] = warm_s
    section[f"{prefix}compile_and_first_call_s"] = cold_s - warm_s
    section.update({f"{prefix}{k}": v for k, v in compare_edits(result, again).items()})
    rec.save()
    log(rec.data, f"{prefix or 'sampler '}warm: {warm_s:.1f} s; identical: {section[prefix + 'identical']}")


def child_main(rec: Record, budget: Budget, s: dict) -> None:
    state: dict = {"t_start": time.perf_counter()}
    import jax

    from bench import benchmark

    setup_jax(rec)
    configs = benchmark.model_configs(s["config"])
    rec.data["model_configs"] = configs
    rec.data["machine"] = {**benchmark.machine_description(), **extra_machine_facts()}
    rec.save()

    def step_bf16():
        began = time.perf_counter()
        bench, run, figures = benchmark.prepare_bdjax(
            configs, precision="bf16", batch_size=s["bf16_batch"], aug_num=s["aug_num"],
            step_index=s["step_index"], seed=s["seed"], warmup=s["warmup"])
        prepare_s = time.perf_counter() - began
        # This process's start up to the networks on the device, less the compile and warm-up: what
        # another process needs before its first compile (imports, backend, random params).
        setup_s = time.perf_counter() - state["t_start"] - figures["compile_s"]
        identical = outputs_identical(run(), run())
        timing = timed_step_figures(run, s["bf16_batch"], s["iters"])
        section = step_section(s, "bf16", s["bf16_batch"], figures, timing, prepare_s)
        limit = device_bytes_limit()
        section.update({
            "setup_s": max(setup_s - s["warmup"] * section["step_s"], 0.0),
            "identical_two_runs": identical,
            "device_bytes_limit": limit,
            "predicted_max_batch": predicted_max_batch(figures["xla_memory_analysis"], s["bf16_batch"], limit,
                                                       s["max_batch_limit"]),
        })
        rec.data["step_bf16"] = section
        state["bench"] = bench  # its params serve the sampler; the compiled step and its inputs go
        log(rec.data, f"step_bf16: compile {section['compile_s']:.1f} s, step {section['step_s'] * 1e3:.1f} ms, "
                      f"{section['samples_per_s']:.2f} samples/s, identical: {identical}")

    def peak():
        import jax.numpy as jnp

        n, iters = s["matmul_n"], s["matmul_iters"]
        rec.data["peak"] = {
            "matmul_n": n, "matmul_iters": iters,
            "bf16_tflops": matmul_tflops(jnp.bfloat16, n, iters),
            "fp32_tflops": matmul_tflops(jnp.float32, n, iters),
            "fp32_highest_tflops": matmul_tflops(jnp.float32, n, iters, precision=jax.lax.Precision.HIGHEST),
            "note": f"best of 3 rounds of {iters} back-to-back jitted {n}^3 matmuls (2 n^3 FLOP each) on random "
                    "normal data; fp32 at jax's default precision (XLA may use TF32) and at Precision.HIGHEST",
        }
        log(rec.data, f"peak: bf16 {rec.data['peak']['bf16_tflops']:.1f}, fp32 {rec.data['peak']['fp32_tflops']:.1f}, "
                      f"fp32 highest {rec.data['peak']['fp32_highest_tflops']:.1f} TFLOP/s")

    def sampler():
        est = estimates(rec.data, s)
        predicted = rec.data["step_bf16"].get("predicted_max_batch")
        batch = s["sampler_batch"] or min(s["num_samples"], s["sampler_batch_cap"], predicted or s["bf16_batch"])
        section = {"num_samples": s["num_samples"], "batch_size": batch, "steps": s["steps"],
                   "timestep_respacing": s["timestep_respacing"], "skip_timesteps": s["skip_timesteps"],
                   "aug_num": s["aug_num"], "precision": "bf16", "prompt": PROMPT, "seed": EDIT_SEED,
                   "batch_from": "--sampler_batch" if s["sampler_batch"] else
                   ("XLA memory analysis prediction" if predicted else "the step's batch (no prediction)"),
                   "out_of_memory_at": [],
                   "compilation_cache_entries_at_start": rec.data.get("compilation_cache_entries_at_start")}
        rec.data["sampler"] = section
        editor = editor_from(state["bench"])
        while True:
            try:
                cold_and_warm(rec, budget, section, editor, s, batch, s["num_samples"], est)
                return
            except Exception as error:  # noqa: BLE001 - only out-of-memory is retried
                if not benchmark.is_out_of_memory(error) or batch <= 1:
                    raise
                section["out_of_memory_at"].append(batch)
                batch //= 2
                section["batch_size"] = batch
                log(rec.data, f"sampler: out of memory, retrying at batch {batch}")
                why = budget.why_not(est["compile_s"] + sampler_run_s(est, s, batch, s["num_samples"]),
                                     "the sampler at the smaller batch")
                if why:
                    raise RuntimeError(f"out of memory at batch {batch * 2}; {why}") from error

    run_phase(rec, budget, s, "step_bf16", s["first_phase_min_s"], step_bf16)
    run_phase(rec, budget, s, "peak", 15.0 if s["config"] == "real" else 2.0, peak)
    if "bench" not in state:
        if "sampler" in s["phases"]:
            rec.phase("sampler", "skipped", note="step_bf16 did not run")
        rec.save()
        return
    est = estimates(rec.data, s)
    batch_guess = s["sampler_batch"] or min(s["num_samples"], s["sampler_batch_cap"],
                                            rec.data["step_bf16"].get("predicted_max_batch") or s["bf16_batch"])
    run_phase(rec, budget, s, "sampler",
              est["compile_s"] + sampler_run_s(est, s, batch_guess, s["num_samples"]) + 5.0, sampler)


def reference_need_s(data: dict, s: dict) -> float:
    """The reference phase: PyTorch's import and random networks, then (warmup + iters) steps, each
    guessed at 4 of bdjax's steps."""
    return 20.0 + (s["warmup"] + s["iters"]) * 4 * estimates(data, s)["step_s"]


def child_reference(rec: Record, budget: Budget, s: dict) -> None:
    """The authors' step in PyTorch, alone in its process (no JAX on the GPU beside it); bdjax's side
    of the ratio is step_bf16's figures, taken in the main process on the same GPU."""
    from bench import benchmark

    configs = benchmark.model_configs(s["config"])

    def reference():
        ref = benchmark.prepare_reference(configs, batch_size=s["bf16_batch"], aug_num=s["aug_num"],
                                          step_index=s["step_index"], seed=s["seed"], warmup=s["warmup"])
        section = {"batch_size": s["bf16_batch"], "note": ref.get("reference_note"),
                   "device": ref.get("reference_device"), "precision": ref.get("reference_precision")}
        rec.data["reference"] = section
        if "run" not in ref:  # out of GPU memory: recorded in the note
            return
        times = benchmark.time_steps({"reference": ref.pop("run")}, s["iters"], interleave=False)["reference"]
        ref_s = statistics.median(times)
        section.update({"iters": s["iters"], "step_s": ref_s, "step_s_min": min(times), "step_s_all": times,
                        "samples_per_s": s["bf16_batch"] / ref_s,
                        "timing": "the reference alone in its process; bdjax's figures are step_bf16's"})
        step = rec.data.get("step_bf16", {})
        if _finite(step.get("step_s")):
            section.update({"bdjax_step_s": step["step_s"], "bdjax_step_s_min": step["step_s_min"],
                            "bdjax_samples_per_s": step["samples_per_s"], "speedup": ref_s / step["step_s"],
                            "speedup_min": min(times) / step["step_s_min"]})
        log(rec.data, f"reference: step {ref_s * 1e3:.1f} ms"
            + (f"; bdjax/reference samples/s {section['speedup']:.2f}x" if "speedup" in section else ""))

    run_phase(rec, budget, s, "reference", reference_need_s(rec.data, s), reference)


def child_deterministic(rec: Record, budget: Budget, s: dict) -> None:
    from bench import benchmark

    setup_jax(rec)
    configs = benchmark.model_configs(s["config"])
    section = rec.section("determinism")
    section["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    def determinism():
        est = estimates(rec.data, s)
        began = time.perf_counter()
        bench, run, figures = benchmark.prepare_bdjax(
            configs, precision="bf16", batch_size=s["bf16_batch"], aug_num=s["aug_num"],
            step_index=s["step_index"], seed=s["seed"], warmup=s["warmup"])
        section["det_prepare_s"] = time.perf_counter() - began
        section["det_compile_s"] = figures["compile_s"]
        section["det_step_identical"] = outputs_identical(run(), run())
        timing = timed_step_figures(run, s["bf16_batch"], s["iters"])
        section.update({"det_step_batch_size": s["bf16_batch"], "det_step_s": timing["step_s"],
                        "det_step_s_min": timing["step_s_min"], "det_step_s_all": timing["step_s_all"]})
        rec.save()
        log(rec.data, f"determinism: step {timing['step_s'] * 1e3:.1f} ms, identical: {section['det_step_identical']}")
        n = s["det_samples"]
        section.update({"det_sampler_num_samples": n, "det_sampler_batch_size": n, "det_sampler_steps": s["steps"]})
        why = budget.why_not(est["compile_s"] + 2 * sampler_run_s(est, s, n, n) + 5.0,
                             "the deterministic sampler run twice")
        if why:
            section["det_sampler_note"] = f"sampler not run ({why})"
            section["det_sampler_identical"] = None
            return
        cold_and_warm(rec, budget, section, editor_from(bench), s, n, n, est, prefix="det_sampler_")

    est = estimates(rec.data, s)
    run_phase(rec, budget, s, "determinism", est["setup_s"] + est["compile_s"] + 10 * est["step_s"], determinism)


def child_extras(rec: Record, budget: Budget, s: dict) -> None:
    import gc

    from bench import benchmark

    setup_jax(rec)
    configs = benchmark.model_configs(s["config"])
    est = estimates(rec.data, s)
    host = {"params": None}

    def host_params():
        if host["params"] is None:
            host["params"] = benchmark.random_host_params(configs, s["seed"])
        return host["params"]

    def step_fp32():
        began = time.perf_counter()
        bench, run, figures = benchmark.prepare_bdjax(
            configs, precision="fp32", batch_size=s["fp32_batch"], aug_num=s["aug_num"],
            step_index=s["step_index"], seed=s["seed"], warmup=s["warmup"], host_params=host_params())
        prepare_s = time.perf_counter() - began
        section = step_section(s, "fp32", s["fp32_batch"], figures,
                               timed_step_figures(run, s["fp32_batch"], s["iters"]), prepare_s)
        section["identical_two_runs"] = outputs_identical(run(), run())
        rec.data["step_fp32"] = section
        log(rec.data, f"step_fp32: compile {section['compile_s']:.1f} s, step {section['step_s'] * 1e3:.1f} ms")

    def max_batch():
        sampler = rec.data.get("sampler", {})
        proven = [s["bf16_batch"]] + ([sampler["batch_size"]] if _finite(sampler.get("cold_s")) else [])
        start = s["max_batch_start"] or max(proven)
        bench = benchmark.BdjaxStep(configs, "bf16", s["aug_num"], s["step_index"], s["seed"],
                                    host_params=host_params())
        host["params"] = None
        est_now = estimates(rec.data, s)

        def may_try(batch):
            return budget.why_not(est_now["compile_s"] + 3 * step_time_at(est_now, s, batch) + 5.0, f"batch {batch}")

        cpu = _platform() == "cpu"
        found = benchmark.max_batch_search(bench, start, s["max_batch_limit"], allow_cpu=s["config"] == "smoke",
                                           may_try=may_try)
        rec.data["max_batch"] = {
            **found, "start": start, "limit": s["max_batch_limit"], "precision": "bf16",
            "predicted_max_batch": rec.data.get("step_bf16", {}).get("predicted_max_batch"),
            "note": ("the guided step at each batch, compiled and run once; the start is the largest batch "
                     "already seen running (the step's, or the sampler's)"
                     + ("; on CPU (dry run) host memory is not the device's limit" if cpu else "")),
        }
        log(rec.data, f"max_batch: {found['max_batch']} ({found['max_batch_note']})")

    def fit_phase():
        import jax

        from bdjax import fit, parallel
        from bench import compile_report

        device = jax.devices()[0]
        mesh = parallel.make_mesh([device])
        sampler, _, params, size, embed_dim = compile_report.build_sampler(s["config"], "bf16", "none", s["aug_num"],
                                                                           mesh)
        compiled, seconds = fit.compile_programs(sampler, params, size, embed_dim, s["fit_batch"], mesh,
                                                 which=("advance",))["advance"]
        limit = fit.memory_limit(device)
        hbm = fit.hbm_bytes(device.device_kind)
        figures = fit.memory(compiled)
        rec.data["fit"] = {
            "precision": "bf16", "remat": "none", "per_device_batch": s["fit_batch"], "aug_num": s["aug_num"],
            "compile_s": seconds, "memory": figures, "device_kind": device.device_kind,
            "device_bytes_limit": limit, "hbm_bytes": hbm,
            "limit_share_of_hbm": None if not limit or not hbm else limit / hbm,
            "auto_budget_bytes": None if not limit else int(limit * (1 - fit.MARGIN)),
            "note": ("the loop program of bench/compile_report.py --config=real --precision=bf16 --remat=none "
                     "--per_device_batch=32, compiled with the GPU present; docs/performance.md lists what the "
                     "compiler planned for it without a GPU (Triton GEMMs off)"),
        }
        log(rec.data, f"fit: loop program at {s['fit_batch']} per device {figures['total_bytes'] / 2 ** 30:.2f} GiB; "
                      f"runtime limit {'unknown' if not limit else f'{limit / 2 ** 30:.2f} GiB'}")

    setup_s = est["setup_s"]
    run_phase(rec, budget, s, "fit", setup_s + 2 * est["compile_s"], fit_phase)
    gc.collect()
    run_phase(rec, budget, s, "step_fp32", setup_s + est["compile_s"] + (s["warmup"] + s["iters"] + 2) * 4
              * step_time_at(est, s, s["fp32_batch"]), step_fp32)
    gc.collect()
    run_phase(rec, budget, s, "max_batch",
              (0 if host["params"] is not None else setup_s) + est["compile_s"]
              + 3 * step_time_at(est, s, 2 * s["bf16_batch"]), max_batch)


def _platform() -> str:
    import jax

    return jax.devices()[0].platform


def extra_machine_facts() -> dict:
    """nvidia-smi's view and the reference packages' versions, where present."""
    import importlib.metadata

    facts = {"env": {k: os.environ.get(k) for k in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                                    "XLA_PYTHON_CLIENT_MEM_FRACTION", "PYTHONPATH")}}
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        facts["nvidia_smi"] = proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        facts["nvidia_smi"] = None
    versions = {}
    for name in ("guided-diffusion-sdk", "clip-anytorch", "kornia", "kornia_rs", "lpips", "ftfy", "torchvision"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    facts["reference_versions"] = versions
    return facts


# ---------------------------------------------------------------------------------- orchestrator


class Terminated(Exception):
    pass


def _on_term(signum, frame):
    raise Terminated(f"signal {signum}")


def run_child(rec: Record, budget: Budget, role: str, env_extra: dict | None = None,
              grace_s: float = 10.0) -> tuple[int | None, str]:
    """Run this program as `role` until it ends or the budget (+ grace) is spent; (returncode, stderr tail).
    A child past its time is stopped (SIGTERM to its process group, then SIGKILL)."""
    command = [sys.executable, "-m", "bench.gpu_proof", *sys.argv[1:], f"--internal_role={role}",
               f"--internal_deadline={budget.deadline!r}"]
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # PyTorch shares the GPU in the main process
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    env["PYTHONUNBUFFERED"] = "1"
    tail: collections.deque = collections.deque(maxlen=60)
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace",
                            process_group=0)

    def pump():
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()
            tail.append(line)

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    entry = {"role": role, "pid": proc.pid, "xla_flags": env.get("XLA_FLAGS", ""), "started_s": _elapsed(rec)}
    try:
        rc = proc.wait(timeout=max(budget.remaining(), 0) + grace_s)
    except subprocess.TimeoutExpired:
        rc = _stop(proc)
        entry["stopped"] = "at the end of the budget"
    except (Terminated, KeyboardInterrupt):  # the child has its own process group: stop it too
        _stop(proc)
        raise
    pumper.join(timeout=5)
    rec.load()
    rec.data.setdefault("processes", []).append({**entry, "returncode": rc, "ended_s": _elapsed(rec)})
    for name in GROUPS[role]:
        phase = rec.data.get("phases", {}).get(name, {})
        if phase.get("status") in ("running", "pending"):
            how = entry.get("stopped") or f"its process ended with status {rc}"
            rec.phase(name, "killed" if phase.get("status") == "running" else "skipped",
                      note=f"{how} (see the log)")
    rec.save()
    return rc, "".join(tail)


def _stop(proc) -> int | None:
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def _elapsed(rec: Record) -> float:
    return time.time() - rec.data.get("started_unix", time.time())


def cache_entries(path: str) -> int | None:
    if not path or not os.path.isdir(path):
        return 0 if path else None
    return sum(len(files) for _, _, files in os.walk(path))


def orchestrate(s: dict) -> int:
    start = time.time()
    budget = Budget(start + FLAGS.budget_s)
    rec = Record(FLAGS.output)
    rec.data = {
        "command": " ".join(["python -m bench.gpu_proof", *sys.argv[1:]]),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
        "started_unix": start,
        "config": s["config"],
        "budget_s": FLAGS.budget_s,
        "settings": {k: v for k, v in s.items() if not k.startswith(("guess_", "first_phase"))},
        "compilation_cache_dir": FLAGS.compilation_cache_dir or None,
        "compilation_cache_entries_at_start": cache_entries(FLAGS.compilation_cache_dir),
        "phases": {name: {"status": "pending" if name in s["phases"] else "skipped",
                          **({} if name in s["phases"] else {"note": "not in --phases"})} for name in PHASES},
    }
    rec.save()
    print(f"bdjax GPU proof: config={s['config']}, budget {FLAGS.budget_s:.0f} s, phases {','.join(s['phases'])}; "
          f"writing {rec.path}", flush=True)
    signal.signal(signal.SIGTERM, _on_term)
    status = 0
    try:
        if set(GROUPS["main"]) & set(s["phases"]):
            run_child(rec, budget, "main")
        if "reference" in s["phases"]:
            why = budget.why_not(reference_need_s(rec.data, s), "the reference")
            if why:
                rec.phase("reference", "skipped", note=why)
            else:
                run_child(rec, budget, "reference")
        if "determinism" in s["phases"]:
            determinism_child(rec, budget, s)
        if set(GROUPS["extras"]) & set(s["phases"]):
            est = estimates(rec.data, s)
            why = budget.why_not(est["setup_s"] + est["compile_s"], "the extras process")
            if why:
                for name in GROUPS["extras"]:
                    if name in s["phases"]:
                        rec.phase(name, "skipped", note=why)
            else:
                run_child(rec, budget, "extras")
    except (Terminated, KeyboardInterrupt) as stop:
        status = 143 if isinstance(stop, Terminated) else 130
        rec.load()
        for name, phase in rec.data.get("phases", {}).items():
            if phase.get("status") in ("running", "pending"):
                rec.phase(name, "killed" if phase["status"] == "running" else "skipped",
                          note=f"the proof was stopped ({stop or 'interrupt'})")
    rec.data["total_s"] = time.time() - start
    rec.data["summary"] = summary_lines(rec.data)
    rec.save()
    for leftover in glob.glob(glob.escape(rec.path) + ".tmp*"):  # from a process stopped while writing
        os.remove(leftover)
    print("\n".join(rec.data["summary"]), flush=True)
    print(f"wrote {rec.path}", flush=True)
    return status


def determinism_child(rec: Record, budget: Budget, s: dict) -> None:
    section = rec.section("determinism")
    step_same = rec.data.get("step_bf16", {}).get("identical_two_runs")
    sampler_same = rec.data.get("sampler", {}).get("identical")
    section.update({"step_identical": step_same, "sampler_identical": sampler_same,
                    "identical": sampler_same if sampler_same is not None else step_same})
    if s["deterministic"] == "never":
        reason = "not run (--deterministic=never)"
    elif s["deterministic"] == "auto" and step_same is not False and sampler_same is not False:
        reason = ("not needed: the runs were byte-identical" if step_same or sampler_same
                  else "not run: neither the step nor the sampler was compared")
    else:
        reason = None
    if reason:
        section["deterministic_run"] = reason
        rec.phase("determinism", "done" if s["deterministic"] != "never" else "skipped", note=reason)
        rec.save()
        return
    est = estimates(rec.data, s)
    why = budget.why_not(est["setup_s"] + est["compile_s"] + 10 * est["step_s"], "the deterministic-ops process")
    if why:
        section["deterministic_run"] = f"not run ({why})"
        rec.phase("determinism", "skipped", note=why)
        rec.save()
        return
    section["deterministic_run"] = "run"
    rec.save()
    base = os.environ.get("XLA_FLAGS", "")
    for flag in (DETERMINISTIC_FLAG, DETERMINISTIC_FALLBACK_FLAG):
        rc, tail = run_child(rec, budget, "deterministic", {"XLA_FLAGS": f"{base} {flag}".strip()})
        if rc == 0 or "Unknown flag in XLA_FLAGS" not in tail or flag == DETERMINISTIC_FALLBACK_FLAG:
            return
        rec.section("determinism")["rejected_flag"] = flag
        rec.phase("determinism", "pending")
        rec.save()


# --------------------------------------------------------------------------------------- summary


def _fmt(value, spec: str, unit: str = "", none: str = "n/a") -> str:
    return f"{value:{spec}}{unit}" if _finite(value) else none


def _pct(value) -> str:
    return f"{100 * value:.1f} %" if _finite(value) else "n/a"


def _yes(value) -> str:
    return {True: "yes", False: "NO", None: "n/a"}[value]


def summary_lines(d: dict) -> list[str]:
    m, peak, targets = d.get("machine", {}), d.get("peak", {}), d.get("targets", {})
    lines = [f"bdjax GPU proof, config {d['config']}, on {m.get('device_kind', '?')} ({m.get('platform', '?')}), "
             f"jax {m.get('jax_version', '?')}, torch {m.get('torch_version', '?')}: "
             f"{_fmt(d.get('total_s'), '.0f', ' s')} of the {d['budget_s']:.0f} s budget"]
    if peak:
        lines.append(f"measured peak ({peak['matmul_n']}^3 matmul): bf16 {_fmt(peak.get('bf16_tflops'), '.1f')}, "
                     f"fp32 {_fmt(peak.get('fp32_tflops'), '.1f')} (default precision), "
                     f"{_fmt(peak.get('fp32_highest_tflops'), '.1f')} (highest) TFLOP/s")
    step = d.get("step_bf16")
    if step:
        lines.append(
            f"(a) guided step bf16, batch {step['batch_size']}: {step['step_s'] * 1e3:.1f} ms, "
            f"{step['samples_per_s']:.2f} samples/s, {step['achieved_tflops']:.1f} TFLOP/s (XLA count), "
            f"MFU {_pct(step.get('mfu'))} [target >= {100 * TARGETS['mfu_bf16_min']:.0f} %], analytic MFU "
            f"{_pct(step.get('mfu_analytic'))}; compile {step['compile_s']:.1f} s; "
            f"peak memory {step['peak_memory_bytes'] / 2**30:.1f} GiB")
    fp32 = d.get("step_fp32")
    if fp32:
        lines.append(f"    fp32, batch {fp32['batch_size']}: {fp32['step_s'] * 1e3:.1f} ms, "
                     f"{fp32['samples_per_s']:.2f} samples/s, MFU {_pct(fp32.get('mfu'))} (default-precision peak), "
                     f"{_pct(fp32.get('mfu_vs_fp32_highest'))} (highest-precision peak)")
    mb = d.get("max_batch")
    if mb:
        lines.append(f"    largest bf16 batch that ran: {mb.get('max_batch')} ({mb.get('max_batch_note')}); "
                     f"predicted from XLA's memory analysis: {mb.get('predicted_max_batch')}")
    elif step:
        lines.append(f"    largest bf16 batch predicted from XLA's memory analysis: {step.get('predicted_max_batch')}")
    fitted = d.get("fit")
    if fitted:
        limit, share = fitted.get("device_bytes_limit"), fitted.get("limit_share_of_hbm")
        lines.append(f"    the sampler's loop program, bf16, {fitted['per_device_batch']} per device, compiled on the "
                     f"device: {fitted['memory']['total_bytes'] / 2**30:.2f} GiB (compare docs/performance.md); "
                     f"runtime limit {_fmt(None if not limit else limit / 2**30, '.1f', ' GiB')}"
                     f" ({_pct(share)} of HBM)")
    sampler = d.get("sampler")
    if sampler and _finite(sampler.get("cold_s")):
        lines.append(
            f"(b) {sampler['num_samples']} ranked edits ({sampler['steps']} steps, aug_num {sampler['aug_num']}, "
            f"batch {sampler['batch_size']}, bf16): {_fmt(sampler.get('warm_s'), '.1f', ' s')} warm "
            f"[target <= {TARGETS['edits_64_warm_s_max']:.0f} s for 64], {sampler['cold_s']:.1f} s cold "
            f"(compilation included); est. MFU {_pct(sampler.get('mfu_est'))}")
    ref = d.get("reference")
    if ref:
        if _finite(ref.get("step_s")):
            lines.append(
                f"(c) authors' PyTorch step ({ref.get('precision')}), batch {ref['batch_size']}: "
                f"{ref['step_s'] * 1e3:.1f} ms, {ref['samples_per_s']:.2f} samples/s; bdjax/reference samples/s "
                f"{ref['speedup']:.2f}x (fastest steps {ref['speedup_min']:.2f}x) "
                f"[target >= {TARGETS['speedup_vs_reference_min']:.0f}x]")
        else:
            lines.append(f"(c) reference: {ref.get('note')}")
    det = d.get("determinism") or {}
    step_same = det.get("step_identical", (step or {}).get("identical_two_runs"))
    sampler_same = det.get("sampler_identical", (sampler or {}).get("identical"))
    if det or step_same is not None or sampler_same is not None:
        line = f"(d) rerun byte-identical: sampler {_yes(sampler_same)}, step {_yes(step_same)}"
        if sampler and sampler.get("identical") is False:
            line += (f" ({sampler.get('samples_differing')} of {sampler['num_samples']} samples differ, "
                     f"max {sampler.get('max_abs_image_diff')}/255)")
        if det.get("deterministic_run") == "run":
            line += (f"; with {det.get('xla_flags', '').strip() or 'the deterministic flag'}: step "
                     f"{_yes(det.get('det_step_identical'))}, sampler {_yes(det.get('det_sampler_identical'))}, "
                     f"step {_fmt(det.get('det_step_s'), '.3f', ' s')} = {_fmt(det.get('det_step_cost'), '.2f', 'x')} "
                     "the default step's time")
        elif det.get("deterministic_run"):
            line += f"; deterministic ops: {det['deterministic_run']}"
        lines.append(line)
    met = [f"{name} {'met' if c['met'] else 'NOT met'}" for name, c in targets.items() if c["met"] is not None]
    if met:
        lines.append("targets: " + ", ".join(met) + ("" if is_real(d) else " (smoke config: meaningless)"))
    for name, phase in d.get("phases", {}).items():
        if phase.get("status") not in ("done",) and phase.get("note") != "not in --phases":
            lines.append(f"phase {name}: {phase.get('status')}: {phase.get('note') or phase.get('error', '')}")
    return lines


# ------------------------------------------------------------------------------------------ main


def main(argv) -> int:
    if len(argv) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    s = settings_from_flags()
    if FLAGS.internal_role == "orchestrate":
        return orchestrate(s)
    if FLAGS.internal_deadline is None:
        raise UsageError("--internal_role needs --internal_deadline")
    rec = Record(FLAGS.output).load()
    budget = Budget(FLAGS.internal_deadline)
    {"main": child_main, "reference": child_reference, "deterministic": child_deterministic,
     "extras": child_extras}[FLAGS.internal_role](rec, budget, s)
    return 0


def run(argv) -> int:
    try:
        return main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from bdjax.absl_flags import parse_flags  # bad flags: one line, exit status 2

    define_flags()
    app.run(run, flags_parser=parse_flags)
