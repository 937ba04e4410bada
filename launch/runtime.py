"""What the launch programs share to run the model: the model and runtime flags, the edit
options as flags, multi-process start, the compilation cache, the editor, and the lines said
before a run. The command-line plumbing (errors, exit statuses, checks, reports) is launch/cli.py."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings

from absl import flags

from bdjax import weights
from launch import cli

FLAGS = flags.FLAGS


def define_config_flag(flag_values: flags.FlagValues = FLAGS) -> None:
    """--config: the real networks, or the smoke preset's tiny random ones; every program's."""
    flags.DEFINE_enum("config", "real", ["real", "smoke"], "smoke: tiny random networks, no weights needed.",
                      flag_values=flag_values)


def define_flags():
    """Flags every launch program takes: which networks, how to run them, where they live."""
    define_config_flag()
    flags.DEFINE_enum("model_output_size", "256", ["256", "512"], "256: unconditional ADM; 512: class-conditional.")
    flags.DEFINE_enum("precision", "fp32", ["fp32", "bf16"], "bf16: bfloat16 activations and parameters.")
    flags.DEFINE_enum("remat", "none", ["none", "dots", "blocks"],
                      "Recompute the UNet's and CLIP's blocks in the guidance gradient instead of keeping "
                      "their activations: less memory (larger batches), more compute.")
    flags.DEFINE_string("checkpoint_dir", None, "Converted weights; default: the weights cache ($BDJAX_CACHE, else ~/.cache/bdjax).")
    flags.DEFINE_bool("allow_cpu", False, "Run the real networks even when JAX sees only a CPU (hours per sample); "
                      "without it such a run stops before loading weights and names the alternatives.")
    flags.DEFINE_bool("download", True, "Fetch missing weights (checkpoints_convert.fetch) into the cache.")
    flags.DEFINE_bool("verify_weights", True, "Check the weights against the digests recorded at conversion.")
    flags.DEFINE_bool("compilation_cache", True, "Keep compiled programs on disk, so later runs skip compiling.")
    flags.DEFINE_string("compilation_cache_dir", None, "Where compiled programs are kept; default: "
                        "xla_cache/ in the weights cache ($BDJAX_CACHE, else ~/.cache/bdjax).")
    flags.DEFINE_bool("distributed", False, "Join a multi-process run with jax.distributed.initialize(); "
                      "automatic on TPU pods. Peers are found by JAX on TPU/Slurm, else from the flags below.")
    flags.DEFINE_string("coordinator_address", os.environ.get("BDJAX_COORDINATOR_ADDRESS"),
                        "host:port of process 0's coordinator (env BDJAX_COORDINATOR_ADDRESS).")
    flags.DEFINE_integer("num_processes", _env_int("BDJAX_NUM_PROCESSES"), "Processes in the run (env BDJAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", _env_int("BDJAX_PROCESS_ID"), "This process's index (env BDJAX_PROCESS_ID).")
    flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as "
                         "dead and the others stop with an error instead of waiting forever.")


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value else None


def setup() -> None:
    """Quiet logging, join the multi-process run if asked (or on a TPU pod), compilation cache."""
    import jax
    from absl import logging

    if not FLAGS["verbosity"].present:  # JAX's INFO lines (e.g. TPU probing) are noise here
        logging.set_verbosity(logging.WARNING)
    if FLAGS.distributed or _on_tpu_pod():
        # CPU processes (tests, laptops) exchange data through gloo; accelerators ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    if FLAGS.compilation_cache:
        enable_compilation_cache(FLAGS.compilation_cache_dir)


def compilation_cache_dir(flag: str | None) -> str:
    """--compilation_cache_dir, else xla_cache/ inside the weights cache."""
    if flag:
        return os.path.abspath(os.path.expanduser(flag))
    return weights.compilation_cache_dir()


def enable_compilation_cache(flag: str | None) -> str:
    """Turn on JAX's persistent compilation cache (every program that takes a second or more to
    compile); returns its directory."""
    import jax

    directory = compilation_cache_dir(flag)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


def check_device() -> None:
    """Stop before weights load when the real networks would run on a CPU, unless --allow_cpu:
    a guided edit takes hours per sample there, which is rarely what a user meant."""
    import jax

    if FLAGS.config == "real" and jax.default_backend() == "cpu" and not FLAGS.allow_cpu:
        raise cli.FlagError("JAX sees only a CPU, where the real networks take hours per sample: try --config=smoke "
                        "(seconds, random networks), install JAX for your accelerator (pip install -e '.[cuda]' "
                        "or '.[tpu]'), or pass --allow_cpu to run anyway")


def build_editor(need_lpips: bool):
    """The editor the flags ask for: smoke networks, or converted weights (fetched if allowed)."""
    import jax
    import jax.numpy as jnp

    from bdjax import parallel, smoke
    from bdjax.editor import BlendedDiffusion

    dtype = jnp.bfloat16 if FLAGS.precision == "bf16" else jnp.float32
    check_device()
    if FLAGS.config == "smoke":
        if FLAGS.checkpoint_dir:
            warnings.warn(f"--checkpoint_dir={FLAGS.checkpoint_dir} is not used: --config=smoke runs random networks")
        return smoke.editor(dtype=dtype, with_lpips=need_lpips)
    checkpoint_dir = unet_dir = FLAGS.checkpoint_dir
    if checkpoint_dir is None:
        from checkpoints_convert.fetch import ensure_weights  # the one place launch/ fetches

        models = weights.needed(int(FLAGS.model_output_size), need_lpips)
        if jax.process_index() == 0:  # one process fetches; the others wait for it
            checkpoint_dir = ensure_weights(models=models, download=FLAGS.download)
        if jax.process_count() > 1:
            parallel.barrier("weights ready")
            checkpoint_dir = ensure_weights(models=models, download=False)
        unet_dir = weights.model_dir(checkpoint_dir, models[0])
    return BlendedDiffusion.from_pretrained(checkpoint_dir, dtype=dtype, param_dtype=dtype, unet_dir=unet_dir,
                                            remat=FLAGS.remat, with_lpips=need_lpips,
                                            image_size=int(FLAGS.model_output_size),
                                            verify_weights=FLAGS.verify_weights)


def _on_tpu_pod() -> bool:
    # TPU VMs of a multi-host slice list their workers here; a single host lists one.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def define_option_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """One flag per edit option, from its declaration (bdjax/options.py): name, type, default, help."""
    from bdjax.options import EditOptions

    define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
              "str": flags.DEFINE_string}
    for field in EditOptions.declaration():
        define[field.type](field.name, field.default, field.metadata["help"], flag_values=flag_values)


def options_from_flags(flag_values: flags.FlagValues = FLAGS) -> dict:
    """The edit options as the flags set them; with --config=smoke, the smoke preset's values
    replace the defaults of the flags the user did not set."""
    from bdjax import smoke
    from bdjax.options import EditOptions

    options = {name: flag_values[name].value for name in EditOptions.names()}
    if flag_values["config"].value == "smoke":
        options.update({name: value for name, value in smoke.OPTIONS.items() if not flag_values[name].present})
    return options


# Throughput of the guided step measured on this project's 2-core CPU (bench/benchmark.py, the
# README's Performance section): the one basis for a time before a CPU run starts.
CPU_TFLOPS_MEASURED = 0.05


def describe_run(editor, runs) -> str:
    """What a run will compute and where, said once before anything compiles: `runs` are
    (options, guided, num_samples) for each configuration. The real 256x256 guided networks also
    get the analytic FLOP count (bdjax/cost.py), and on a CPU the time that count takes at
    the throughput measured on a 2-core CPU; elsewhere the progress bar's ETA, which starts after
    compiling, is the estimate."""
    import jax

    from bdjax import cost

    samples = sum(n for _, _, n in runs)
    counts = sorted({editor.sampler(options, guided).num_steps for options, guided, _ in runs})
    kinds = {guided for _, guided, _ in runs}
    kind = "" if len(kinds) > 1 else (" guided" if kinds == {True} else " unguided")
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    steps = f"{span}{kind} step" + ("" if counts == [1] else "s")
    device = jax.devices()[0]
    where = f"{jax.device_count()} x {device.device_kind}"
    if device.platform.lower() not in device.device_kind.lower():
        where += f" ({device.platform})"
    if jax.process_count() > 1:
        where += f" in {jax.process_count()} processes"
    line = f"running {samples} sample{'s' * (samples != 1)} ({steps} each) on {where}, {FLAGS.precision}"
    if FLAGS.config == "smoke":
        return line + ", smoke networks"
    if FLAGS.model_output_size == "256" and kinds == {True}:
        flops = sum(n * editor.sampler(options, True).num_steps
                    * cost.guided_step_flops(options.aug_num) for options, _, n in runs)
        line += (f": about {flops / 1e15:.1f} PFLOP by the analytic count "
                 f"({flops / samples / 1e12:.0f} TFLOP per sample)")
        if device.platform == "cpu":
            hours = flops / (CPU_TFLOPS_MEASURED * 1e12) / 3600
            line += f", roughly {hours:.0f} h at the {CPU_TFLOPS_MEASURED} TFLOP/s measured on a 2-core CPU"
    return line


def compiling_line() -> str:
    """The line said before compiling: where compiled programs are kept, so later runs skip it."""
    if not FLAGS.compilation_cache:
        return "compiling (not cached: --nocompilation_cache)"
    return f"compiling (first run only, cached in {compilation_cache_dir(FLAGS.compilation_cache_dir)})"


def announce_run(editor, runs) -> None:
    """Say `describe_run` on process 0's stderr."""
    import jax

    if jax.process_index() == 0:
        print(describe_run(editor, runs), file=sys.stderr, flush=True)


def announce_compiles(editor, bar=None, show=None) -> None:
    """Have `editor` say `compiling_line()` on process 0's stderr each time it compiles a
    sampler (and call `show()`, a program's own way of saying it: the web app's page), and keep
    the compiles off the clock of `bar` (a tqdm bar of the program's own), so that its rate and
    ETA are those of sampling."""
    import jax
    from tqdm.auto import tqdm

    @contextlib.contextmanager
    def compiling():
        if jax.process_index() == 0:
            tqdm.write(compiling_line(), file=sys.stderr)
        if show is not None:
            show()
        yield
        if bar is not None:
            bar.unpause()

    editor.on_compile = compiling
