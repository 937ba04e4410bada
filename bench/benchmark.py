"""Speed of one guided Blended Diffusion step: bdjax against the authors' PyTorch step.

In one process and one run, on random networks of the chosen size:
  (a) bdjax's step (`blended.step_draws` + `blended.make_step`, one UNet forward and one vjp),
      jit-compiled once: compile time, median time per step, samples/s, XLA's FLOP count of the
      compiled step, MFU against --peak_tflops, peak memory;
  (b) the authors' step as bench.reference rebuilds it: guided_diffusion's `p_sample`
      with their `cond_fn` (a no-grad `p_mean_variance`, then a second UNet forward with grad for
      the CLIP loss through kornia's augmentations, `autograd.grad`), then the background blend;
      fp32 on CPU, the authors' fp16 (`convert_to_fp16`, CLIP's `convert_weights`) on CUDA;
  (c) the ratio of the two, written to --output as JSON with the machine and the command.

    python -m bench.benchmark --reduced --batch_size=2 --output=bench.json
    python -m bench.benchmark --precision=bf16 --peak_tflops=989 --output=h100.json
    python -m bench.benchmark --config=smoke --batch_size=2 --output=smoke.json

The networks follow the shared flags: --config=real is ADM 256 unconditional + CLIP ViT-B/16 at
their real sizes (--reduced: the same UNet topology at a smaller width and image size, for CPUs),
--config=smoke the smoke networks (bdjax/smoke.py). Weights are random (speed does not depend on
their values); nothing is downloaded. The compilation cache is off unless asked for
(--compilation_cache or --compilation_cache_dir), so that compile_s times a compile.

FLOPs: `flops_per_step` is XLA's count for the compiled step, where the vjp is taken with respect
to x only (no weight gradients), so a backward costs about one forward; `analytic_flops_*` follow
the analytic count (a backward counted as two forwards: 7.56 TFLOP per sample-step for the real
networks with 8 augmentations) and `mfu_analytic` uses them. The --max_batch_search runs last, after
the reference, so that PyTorch finds the GPU memory free.
"""

from __future__ import annotations

import importlib.metadata
import gc
import os
import platform
import resource
import statistics
import sys
import time
import warnings

from collections.abc import Callable
from typing import Any

from absl import app, flags

from launch import cli, runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line: the shared runtime flags and the benchmark's own, defined only when this
    module runs as the program, so that other programs (bench/gpu_proof.py) can import its pieces
    without clashing flag names."""
    runtime.define_flags()
    FLAGS.set_default("compilation_cache", False)  # compile_s should time a compile, not a cache read
    flags.DEFINE_bool("reduced", False,
                      "With --config=real: the full ADM 256 topology at width 64 and 64x64 images with a small "
                      "CLIP ViT, for CPUs.")
    flags.DEFINE_integer("batch_size", 4, "Samples per step.")
    flags.DEFINE_integer("aug_num", 8, "CLIP augmentations per sample (the reference's default is 8).")
    flags.DEFINE_integer("iters", 5, "Timed steps per side; the median is reported.")
    flags.DEFINE_integer("warmup", 1, "Untimed steps per side before timing.")
    flags.DEFINE_bool("interleave", True,
                      "Alternate bdjax and reference steps while timing, so both see the same load on a shared "
                      "machine (--nointerleave: all bdjax steps, then all reference steps).")
    flags.DEFINE_string("output", None, "Write the results to this JSON file.")
    flags.DEFINE_bool("reference", True, "Also time the authors' PyTorch step (--noreference skips it).")
    flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of the device at this precision, for MFU.")
    flags.DEFINE_bool("max_batch_search", False,
                      "Double the batch until the device runs out of memory or --max_batch_limit; report the largest "
                      "that ran. Skipped on CPU (host memory is not the limit being asked about).")
    flags.DEFINE_integer("max_batch_limit", 256, "Upper bound of --max_batch_search.")
    flags.DEFINE_integer("step_index", 50, "Respaced step index i of the timed step (the reference runs 74..0).")
    flags.DEFINE_integer("seed", 0, "Seed of the random networks and inputs.")


NETWORKS = ("real", "reduced", "smoke")


def networks_from_flags() -> str:
    """Which of NETWORKS the flags ask for."""
    if FLAGS.model_output_size != "256":
        raise cli.FlagError(f"--model_output_size={FLAGS.model_output_size}: the benchmark times the 256x256 "
                                "unconditional model only")
    if FLAGS.config == "smoke":
        if FLAGS.reduced:
            raise cli.FlagError("--reduced applies to --config=real, not to --config=smoke")
        return "smoke"
    return "reduced" if FLAGS.reduced else "real"


def model_configs(networks: str) -> dict:
    """UNetModel and CLIP fields of one of NETWORKS, shared by bdjax and the reference."""
    from bdjax import smoke
    from bdjax.models import clip as clip_lib
    from bdjax.models import unet as unet_lib

    if networks == "real":
        return {"unet": unet_lib.preset("adm256_uncond"), "clip": clip_lib.preset("vit_b16")}
    if networks == "reduced":
        # ADM 256's topology unchanged (6 levels, 2 res blocks, attention at ds 8/16/32, 64-channel
        # heads, up/down ResBlocks, scale-shift norm) at a quarter of its width and image size.
        # CLIP keeps ViT-B/16's input size, context and vocabulary; its vision_heads is
        # vision_width // 64, as clip.model.CLIP derives it.
        unet = dict(unet_lib.preset("adm256_uncond"), image_size=64, model_channels=64)
        clip = dict(clip_lib.preset("vit_b16"), embed_dim=256, vision_layers=4, vision_width=256,
                    vision_patch_size=32, vision_heads=4, transformer_width=256, transformer_heads=4,
                    transformer_layers=1)
        return {"unet": unet, "clip": clip}
    if networks == "smoke":
        return {"unet": smoke.unet_config(), "clip": dict(smoke.CLIP_CONFIG)}
    raise ValueError(f"unknown networks {networks!r}; choose one of {NETWORKS}")


def analytic_flops_per_sample_step(networks: str, aug_num: int) -> float | None:
    """The analytic FLOP count for the real networks: 3 x (UNet forward + aug_num CLIP forwards); None otherwise."""
    from bdjax import cost

    return cost.guided_step_flops(aug_num) if networks == "real" else None


def machine_description() -> dict:
    import jax

    device = jax.devices()[0]
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                             cpu_model)
    except OSError:
        pass

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jaxlib_version": version("jaxlib"),
        "flax_version": version("flax"),
        "torch_version": version("torch"),
        "load_average_1m_at_start": os.getloadavg()[0],  # other processes share these cores
        "bdjax_git": git_description(),
    }


def git_description() -> str | None:
    """The repository's commit (with -dirty when the tree has changes), or None outside git."""
    import subprocess

    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def time_steps(sides: dict, iters: int, interleave: bool) -> dict:
    """{name: [seconds] * iters} for each synchronising callable in `sides` (already warmed up),
    taken in turns when `interleave`, else one side after the other."""
    times = {name: [] for name in sides}
    order = [name for _ in range(iters) for name in sides] if interleave else \
        [name for name in sides for _ in range(iters)]
    for name in order:
        start = time.perf_counter()
        sides[name]()
        times[name].append(time.perf_counter() - start)
    return times


def host_peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def is_out_of_memory(error: Exception) -> bool:
    text = str(error).lower()
    return "resource_exhausted" in text or "out of memory" in text or "oom" in text.split()


# ----------------------------------------------------------------------------------------- bdjax


def random_host_params(configs: dict, seed: int) -> dict:
    """{"unet": ..., "clip": ...}: float32 numpy params of the configuration's networks (smoke.random_params),
    for BdjaxStep(host_params=...) when several steps share one draw."""
    import jax
    import jax.numpy as jnp

    from bdjax import smoke
    from bdjax.models import clip as clip_lib
    from bdjax.models import unet as unet_lib

    size, resolution = configs["unet"]["image_size"], configs["clip"]["image_resolution"]
    image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return {
        "unet": smoke.random_params(unet_lib.UNetModel(**configs["unet"]), image,
                                    jax.ShapeDtypeStruct((1,), jnp.float32), seed=seed),
        "clip": smoke.random_params(clip_lib.CLIP(**configs["clip"]),
                                    jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32),
                                    jax.ShapeDtypeStruct((1, configs["clip"]["context_length"]), jnp.int32),
                                    seed=seed + 1),
    }


class BdjaxStep:
    """bdjax's guided step at one configuration: random params, inputs, and the jitted step."""

    def __init__(self, configs: dict, precision: str, aug_num: int, step_index: int, seed: int,
                 host_params: dict | None = None, remat: str = "none"):
        """`host_params`: float32 params from random_host_params(configs, seed) to reuse; drawn here if None.
        `remat`: the networks' rematerialisation policy in the guidance gradient (bdjax/models/remat.py)."""
        import jax
        import jax.numpy as jnp

        from bdjax import blended, diffusion
        from bdjax.models import clip as clip_lib
        from bdjax.models import unet as unet_lib

        dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
        self.size = configs["unet"]["image_size"]
        self.models = blended.Models(unet=unet_lib.UNetModel(**configs["unet"], dtype=dtype, remat=remat),
                                     clip=clip_lib.CLIP(**configs["clip"], dtype=dtype, remat=remat))
        params = random_host_params(configs, seed) if host_params is None else host_params
        self.params = jax.device_put(jax.tree.map(lambda p: p.astype(dtype), params))
        self.param_counts = {k: sum(p.size for p in jax.tree.leaves(v)) for k, v in params.items()}
        self.aug_num, self.step_index, self.seed = aug_num, step_index, seed
        self.d = diffusion.make_diffusion(timestep_respacing="100")
        self._blended, self._jax, self._jnp = blended, jax, jnp

    def inputs(self, batch: int) -> tuple:
        jax, jnp = self._jax, self._jnp
        rng = jax.random.split(jax.random.key(self.seed + 2), 3)
        init = jax.random.uniform(rng[0], (1, self.size, self.size, 3), minval=-1, maxval=1)
        mask = jnp.zeros((1, self.size, self.size, 1)).at[:, self.size // 4:3 * self.size // 4,
                                                          self.size // 4:3 * self.size // 4].set(1)
        x = 0.6 * init + 0.8 * jax.random.normal(rng[1], (batch, self.size, self.size, 3))
        text_embed = jax.random.normal(rng[2], (self.models.clip.embed_dim,))
        keys, background_key = self._blended.sample_keys(self.seed, jnp.arange(batch))
        return (self.params, x, jnp.int32(self.step_index), keys, background_key, init, mask, text_embed)

    def compile(self, batch: int):
        """(compiled step, trace+lower seconds, XLA compile seconds)."""
        blended = self._blended
        options = blended.EditOptions(aug_num=self.aug_num, batch_size=batch)
        step = blended.make_step(self.models, options, self.d, guided=True)

        def guided_step(params, x, i, keys, background_key, init, mask, text_embed):
            # The step's randomness is drawn inside, as in the sampler's scan body.
            draws = blended.step_draws(self.models, options, keys, background_key, i, x.shape)
            out = step(params, x, i, draws, init, mask, text_embed)
            return out["sample"], out["pred_xstart"]

        start = time.perf_counter()
        lowered = self._jax.jit(guided_step).lower(*self.inputs(batch))
        lowered_at = time.perf_counter()
        compiled = lowered.compile()
        return compiled, lowered_at - start, time.perf_counter() - lowered_at


def xla_flops(compiled) -> float:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
        analysis = analysis[0]
    return float(analysis["flops"])


def xla_memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    names = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
             "generated_code_size_in_bytes")
    return {name: int(getattr(stats, name)) for name in names if hasattr(stats, name)}


def peak_memory() -> tuple[int, str]:
    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and stats.get("peak_bytes_in_use"):
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use (jax memory_stats)"
    return host_peak_rss_bytes(), "host: process peak RSS (no device memory stats on this platform)"


def prepare_bdjax(configs: dict, *, precision: str, batch_size: int, aug_num: int, step_index: int, seed: int,
                  warmup: int, host_params: dict | None = None,
                  remat: str = "none") -> tuple[BdjaxStep, Callable[[], Any], dict]:
    """Compile and warm up bdjax's step: (bench, a synchronised step, compile/FLOP/memory figures)."""
    import jax

    bench = BdjaxStep(configs, precision, aug_num, step_index, seed, host_params=host_params, remat=remat)
    compiled, lower_s, xla_compile_s = bench.compile(batch_size)
    args = bench.inputs(batch_size)

    def run():
        return jax.block_until_ready(compiled(*args))

    for _ in range(warmup):
        run()
    memory_bytes, memory_kind = peak_memory()  # before the reference exists, so it is bdjax's alone
    return bench, run, {
        "param_counts": bench.param_counts,
        "lower_s": lower_s,
        "xla_compile_s": xla_compile_s,
        "compile_s": lower_s + xla_compile_s,
        "flops_per_step": xla_flops(compiled),
        "flops_per_sample_step": xla_flops(compiled) / batch_size,
        "peak_memory_bytes": memory_bytes,
        "peak_memory_kind": memory_kind,
        "xla_memory_analysis": xla_memory(compiled),
    }


def max_batch_search(bench: BdjaxStep, start: int, limit: int, *, allow_cpu: bool = False,
                     may_try: Callable[[int], str | None] | None = None) -> dict:
    """The largest batch (doubling from `start`, which is known to run) that compiles and runs on the
    device, up to `limit`. `may_try(batch)` returns None to go on, or why to stop before that batch
    (e.g. the time budget). Each batch tried is listed with its outcome and seconds."""
    import jax

    if jax.devices()[0].platform == "cpu" and not allow_cpu:
        return {"max_batch": None, "max_batch_note": "skipped on CPU: host memory is not the device limit",
                "max_batch_tried": []}
    fits, batch, note, tried = start, start * 2, f"reached the limit {limit}", []
    while batch <= limit:
        stop = may_try(batch) if may_try is not None else None
        if stop:
            note = f"stopped before batch {batch}: {stop}"
            break
        began = time.perf_counter()
        try:
            compiled, _, _ = bench.compile(batch)
            jax.block_until_ready(compiled(*bench.inputs(batch)))
        except Exception as error:  # noqa: BLE001 - only out-of-memory ends the search quietly
            if not is_out_of_memory(error):
                raise
            tried.append({"batch": batch, "ran": False, "seconds": time.perf_counter() - began})
            note = f"batch {batch} ran out of device memory"
            break
        tried.append({"batch": batch, "ran": True, "seconds": time.perf_counter() - began})
        fits, batch = batch, batch * 2
    return {"max_batch": fits, "max_batch_note": note, "max_batch_tried": tried}


# ------------------------------------------------------------------------------------- reference


def prepare_reference(configs: dict, *, batch_size: int, aug_num: int, step_index: int, seed: int,
                      warmup: int) -> dict:
    """The authors' step (bench.reference) at the same configuration, batch and step
    index, warmed up: {"run": synchronised step, "reference_*": description}, or only a
    "reference_note" when it does not fit on the GPU. Its memory is freed once `run` is dropped
    (see release_torch_memory)."""
    import torch

    from bdjax.blended import EditOptions
    from bench import reference

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    fp16 = cuda  # the authors' use_fp16 UNet and fp16 CLIP on GPU; float32 on CPU
    torch.manual_seed(seed)
    batch, size = batch_size, configs["unet"]["image_size"]
    unet, clip_model = reference.random_networks(configs["unet"], configs["clip"], fp16=fp16, device=device)
    options = EditOptions(aug_num=aug_num, batch_size=batch)
    diffusion = reference.spaced_diffusion(options.timestep_respacing)
    augment = reference.image_augmentations(configs["clip"]["image_resolution"], aug_num,
                                            reference.random_augmentations())

    init = torch.rand(1, 3, size, size, device=device) * 2 - 1
    mask = torch.zeros(1, 1, size, size, device=device)
    mask[..., size // 4:3 * size // 4, size // 4:3 * size // 4] = 1
    x = 0.6 * init + 0.8 * torch.randn(batch, 3, size, size, device=device)
    text_embed = torch.randn(1, configs["clip"]["embed_dim"], device=device)
    t = torch.full((batch,), step_index, device=device, dtype=torch.long)

    def run():
        out = reference.guided_step(diffusion, (unet, clip_model, None), options, x, t, init, mask, text_embed,
                                    augment)
        if cuda:
            torch.cuda.synchronize()
        return out

    try:
        for _ in range(warmup):
            run()
    except torch.cuda.OutOfMemoryError as error:
        return {"reference_note": f"the reference step ran out of GPU memory at batch {batch}: {error}"}
    return {
        "run": run,
        "reference_note": "guided_diffusion p_sample (no-grad p_mean_variance) + cond_fn (second forward with "
                          "grad, kornia augmentations, CLIP, autograd.grad) + background blend",
        "reference_device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "reference_precision": "fp16 (convert_to_fp16 UNet, fp16 CLIP)" if fp16 else "fp32",
    }


def release_torch_memory() -> None:
    """Return the reference's GPU memory to the device once nothing refers to its step."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ main


def summary(r: dict) -> str:
    lines = [
        f"bdjax Blended Diffusion step: networks={r['networks']} precision={r['precision']} remat={r['remat']} "
        f"batch={r['batch_size']} aug_num={r['aug_num']} on {r['machine']['device_kind']} "
        f"({r['machine']['platform']})",
        f"  compile {r['compile_s']:.1f} s; step {r['step_s'] * 1e3:.1f} ms (median of {r['iters']}, "
        f"fastest {r['step_s_min'] * 1e3:.1f} ms); "
        f"{r['samples_per_s']:.3f} samples/s",
        f"  XLA FLOPs/step {r['flops_per_step']:.4g} ({r['flops_per_sample_step']:.4g}/sample); "
        f"achieved {r['achieved_tflops']:.3f} TFLOP/s; MFU "
        + ("n/a (no --peak_tflops)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"),
        f"  peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})",
    ]
    if r["reference_step_s"] is not None:
        lines.append(f"reference (PyTorch, {r['reference_precision']}): step {r['reference_step_s'] * 1e3:.1f} ms "
                     f"(fastest {r['reference_step_s_min'] * 1e3:.1f} ms); "
                     f"{r['reference_samples_per_s']:.3f} samples/s")
        lines.append(f"speedup (reference time / bdjax time): {r['speedup']:.2f}x on medians, "
                     f"{r['speedup_min']:.2f}x on the fastest steps ({r['timing']} timing)")
    else:
        lines.append(f"reference: {r['reference_note']}")
    if r["max_batch"] is not None:
        lines.append(f"largest batch that ran: {r['max_batch']} ({r['max_batch_note']})")
    return "\n".join(lines)


@cli.program
def main(argv):
    if len(argv) > 1:
        raise cli.FlagError(f"unexpected arguments: {argv[1:]}")
    networks = networks_from_flags()
    for name in ("batch_size", "aug_num", "iters"):
        if getattr(FLAGS, name) < 1:
            raise cli.FlagError(f"--{name} must be at least 1")
    if FLAGS.peak_tflops is not None and FLAGS.peak_tflops <= 0:
        raise cli.FlagError("--peak_tflops must be positive")
    if FLAGS.checkpoint_dir:
        warnings.warn(f"--checkpoint_dir={FLAGS.checkpoint_dir} is not used: the benchmark runs random networks")
    if FLAGS.reference:
        # On a GPU, PyTorch shares the device: JAX grows its pool as needed instead of taking 75 %
        # up front (its peak, which is what is reported, is unchanged).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if FLAGS.compilation_cache_dir and not FLAGS["compilation_cache"].present:
        FLAGS.compilation_cache = True  # naming the cache's directory asks for the cache
    runtime.setup()
    if networks == "real":
        runtime.check_device()

    configs = model_configs(networks)
    result = {
        "command": " ".join(["python -m bench.benchmark", *sys.argv[1:]]),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine_description(),
        "config": FLAGS.config,
        "networks": networks,
        "model_configs": configs,
        "precision": FLAGS.precision,
        "remat": FLAGS.remat,
        "batch_size": FLAGS.batch_size,
        "aug_num": FLAGS.aug_num,
        "step_index": FLAGS.step_index,
        "warmup": FLAGS.warmup,
        "iters": FLAGS.iters,
        "compilation_cache_dir": (runtime.compilation_cache_dir(FLAGS.compilation_cache_dir)
                                  if FLAGS.compilation_cache else None),
    }
    # bdjax first, before torch is imported, so that a host RSS peak is bdjax's own.
    bench, bdjax_run, bdjax_figures = prepare_bdjax(
        configs, precision=FLAGS.precision, batch_size=FLAGS.batch_size, aug_num=FLAGS.aug_num,
        step_index=FLAGS.step_index, seed=FLAGS.seed, warmup=FLAGS.warmup, remat=FLAGS.remat)
    result.update(bdjax_figures)
    sides = {"bdjax": bdjax_run}
    reference = {"reference_note": "not run (--noreference)", "reference_device": None,
                 "reference_precision": None}
    if FLAGS.reference:
        reference.update(prepare_reference(configs, batch_size=FLAGS.batch_size, aug_num=FLAGS.aug_num,
                                           step_index=FLAGS.step_index, seed=FLAGS.seed, warmup=FLAGS.warmup))
        if "run" in reference:
            sides["reference"] = reference.pop("run")
    times = time_steps(sides, FLAGS.iters, FLAGS.interleave and len(sides) > 1)
    sides.clear()
    if FLAGS.reference:
        release_torch_memory()
    result["timing"] = "interleaved" if FLAGS.interleave and len(times) > 1 else "sequential"

    step_s = statistics.median(times["bdjax"])
    analytic = analytic_flops_per_sample_step(networks, FLAGS.aug_num)
    peak = None if FLAGS.peak_tflops is None else FLAGS.peak_tflops * 1e12
    result.update({
        "step_s": step_s,
        "step_s_min": min(times["bdjax"]),
        "step_s_all": times["bdjax"],
        "samples_per_s": FLAGS.batch_size / step_s,
        "achieved_tflops": result["flops_per_step"] / step_s / 1e12,
        "analytic_flops_per_sample_step": analytic,
        "analytic_flops_per_step": None if analytic is None else analytic * FLAGS.batch_size,
        "peak_tflops": FLAGS.peak_tflops,
        "mfu": None if peak is None else result["flops_per_step"] / step_s / peak,
        "mfu_analytic": None if peak is None or analytic is None else analytic * FLAGS.batch_size / step_s / peak,
    })
    result.update(reference)
    ref_times = times.get("reference")
    ref_step_s = None if ref_times is None else statistics.median(ref_times)
    result.update({
        "reference_step_s": ref_step_s,
        "reference_step_s_min": None if ref_times is None else min(ref_times),
        "reference_step_s_all": ref_times,
        "reference_samples_per_s": None if ref_times is None else FLAGS.batch_size / ref_step_s,
        "speedup": None if ref_times is None else ref_step_s / step_s,
        "speedup_min": None if ref_times is None else min(ref_times) / min(times["bdjax"]),
    })
    # Last, so that bdjax's reported peak is the timed batch's and PyTorch found the device free.
    if FLAGS.max_batch_search:
        search = max_batch_search(bench, FLAGS.batch_size, FLAGS.max_batch_limit)
    else:
        search = {"max_batch": None, "max_batch_note": "not requested (--max_batch_search)", "max_batch_tried": []}
    result.update(search)
    result["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]

    print(summary(result))
    if FLAGS.output:
        from bdjax import outputs

        outputs.save_json(FLAGS.output, outputs.finite_or_none(result))  # strict JSON: NaN becomes null
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
