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
from launch import cli, platform

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
    """Check the flags that contradict each other, quiet logging, join the multi-process run if
    asked (or on a TPU pod), compilation cache; where a CUDA plugin found no GPU (launch/platform.py),
    initialise the CPU backend with the plugin's start-up lines held back."""
    import jax
    from absl import logging

    check_config_flags()
    if not FLAGS["verbosity"].present:  # JAX's INFO lines (e.g. TPU probing) are noise here
        logging.set_verbosity(logging.WARNING)
    if FLAGS.distributed or _on_tpu_pod():
        # CPU processes (tests, laptops) exchange data through gloo; accelerators ignore this.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id, heartbeat_timeout_seconds=FLAGS.heartbeat_timeout)
    global CACHE_OFF
    if FLAGS.compilation_cache:
        enable_compilation_cache(FLAGS.compilation_cache_dir)
    else:
        CACHE_OFF = "--nocompilation_cache"
    if platform.NO_GPU:
        platform.initialize_quietly()


def compilation_cache_dir(flag: str | None) -> str:
    """--compilation_cache_dir, else xla_cache/ inside the weights cache."""
    if flag:
        return os.path.abspath(os.path.expanduser(flag))
    return weights.compilation_cache_dir()


# Why compiled programs are not kept this run ("--nocompilation_cache", an unusable directory), or None.
CACHE_OFF: str | None = "the compilation cache is not enabled"


def enable_compilation_cache(flag: str | None) -> str:
    """Turn on JAX's persistent compilation cache (every program that takes a second or more to
    compile, or as $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says) in the directory `flag` names, once a file could be written there; returns the
    directory. Where none can be (a file in the way, no permission, a symlink loop), the run goes
    on uncached and `CACHE_OFF` says why."""
    global CACHE_OFF
    import jax

    directory = compilation_cache_dir(flag)
    CACHE_OFF = cache_problem(directory)
    if CACHE_OFF is None:
        jax.config.update("jax_compilation_cache_dir", directory)
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:  # JAX's own setting wins
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


def cache_problem(directory: str) -> str | None:
    """Why compiled programs cannot be kept in `directory`, or None; nothing is created (JAX makes
    the directory when it first writes there)."""
    import stat

    path = directory
    while True:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if os.path.dirname(path) == path:
                return f"{directory} is not usable: no existing parent"
            path = os.path.dirname(path)
            continue
        except OSError as e:  # a symlink loop, a name too long, ...
            return f"{directory} is not usable: {e.strerror or e}"
        break
    if not stat.S_ISDIR(mode):
        return f"{directory} is not usable: {path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{directory} is not usable: {path} is not writable"
    return None


def check_config_flags() -> None:
    """Refuse flags that the chosen --config would silently ignore."""
    from bdjax import smoke

    if FLAGS.config == "smoke" and FLAGS["model_output_size"].present and FLAGS.model_output_size != "256":
        raise cli.FlagError(f"--model_output_size={FLAGS.model_output_size} applies to the real networks: "
                            f"--config=smoke always runs its tiny networks at {smoke.IMAGE_SIZE} px; drop one of "
                            "the two flags")


def check_device() -> None:
    """Stop before weights load when the real networks would run on a CPU, unless --allow_cpu:
    a guided edit takes hours per sample there, which is rarely what a user meant. Where a CUDA
    plugin found no GPU, say so first (as a note, for runs that go on on the CPU)."""
    import jax

    if FLAGS.config == "real" and jax.default_backend() == "cpu" and not FLAGS.allow_cpu:
        if platform.NO_GPU:
            raise cli.FlagError(f"{platform.NO_GPU}: the real networks would take hours per sample on the CPU; try "
                                "--config=smoke (tiny random networks, no weights), run where a GPU is usable, or pass "
                                "--allow_cpu to run anyway")
        raise cli.FlagError("JAX sees only a CPU, where the real networks take hours per sample: try --config=smoke "
                        "(tiny random networks, no weights), install JAX for your accelerator (pip install -e '.[cuda]' "
                        "or '.[tpu]'), or pass --allow_cpu to run anyway")
    if platform.NO_GPU and jax.process_index() == 0:
        print(f"note: {platform.NO_GPU}; running on the CPU", file=sys.stderr, flush=True)


def build_editor(need_lpips: bool, devices=None):
    """The editor the flags ask for: smoke networks, or converted weights (fetched if allowed),
    over `devices` (default: every device)."""
    import jax
    import jax.numpy as jnp

    from bdjax import parallel, smoke
    from bdjax.editor import BlendedDiffusion

    dtype = jnp.bfloat16 if FLAGS.precision == "bf16" else jnp.float32
    check_device()
    mesh = None if devices is None else parallel.make_mesh(devices)
    if FLAGS.config == "smoke":
        if FLAGS.checkpoint_dir:
            warnings.warn(f"--checkpoint_dir={FLAGS.checkpoint_dir} is not used: --config=smoke runs random networks")
        return with_fit_cache(smoke.editor(dtype=dtype, with_lpips=need_lpips, mesh=mesh))
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
    return with_fit_cache(BlendedDiffusion.from_pretrained(
        checkpoint_dir, dtype=dtype, param_dtype=dtype, unet_dir=unet_dir, remat=FLAGS.remat, with_lpips=need_lpips,
        image_size=int(FLAGS.model_output_size), verify_weights=FLAGS.verify_weights, mesh=mesh))


def with_fit_cache(editor):
    """`editor`, keeping its batch_size="auto" decisions (bdjax/fit.py) beside the compiled
    programs, in the compilation cache directory (not with --nocompilation_cache, or where that
    directory is unusable), and saying on process 0's stderr what a search for one does."""
    import jax

    if CACHE_OFF is None:
        editor.fit_cache_dir = compilation_cache_dir(FLAGS.compilation_cache_dir)
    if jax.process_index() == 0:
        editor.on_fit = lambda line: print(line, file=sys.stderr, flush=True)
    return editor


def _on_tpu_pod() -> bool:
    # TPU VMs of a multi-host slice list their workers here; a single host lists one.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def define_option_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """One flag per edit option, from its declaration (bdjax/options.py): name, type, default, help."""
    from bdjax.options import EditOptions, flag_default

    define = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer, "float": flags.DEFINE_float,
              "str": flags.DEFINE_string, "BatchSize": define_batch_size}
    for field in EditOptions.declaration():
        define[field.type](field.name, flag_default(field), field.metadata["help"], flag_values=flag_values)
    flags.DEFINE_bool("lpips_scores", True, "Load the LPIPS network for the background_lpips and diversity scores "
                      "(a 553 MB download, once); off: those scores are null.", flag_values=flag_values)


class BatchSizeParser(flags.ArgumentParser):
    """--batch_size: a whole number of at least 1, or auto (bdjax/options.py parse_batch_size);
    anything else is a flag error (one line, exit status 2, before anything loads)."""
    syntactic_help = "a whole number of at least 1, or auto"

    def parse(self, argument):
        from bdjax.options import OptionError, parse_batch_size

        try:
            return parse_batch_size(argument)
        except OptionError:
            raise ValueError(f"{argument!r} is not a whole number of at least 1, nor auto (the largest batch "
                             "that fits the device's memory)") from None

    def flag_type(self) -> str:
        return "int or auto"


def define_batch_size(name: str, default, help: str, flag_values: flags.FlagValues = FLAGS) -> None:
    """The --batch_size flag (`BatchSizeParser`)."""
    flags.DEFINE(BatchSizeParser(), name, default, help, flag_values=flag_values)


def with_lpips(needed: bool) -> bool:
    """Whether to load the LPIPS network: the options need it, or --lpips_scores asks for its scores."""
    return needed or bool(FLAGS["lpips_scores"].value if "lpips_scores" in FLAGS else False)


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


def describe_run(editor, runs, lead: str = "running") -> str:
    """What a run will compute and where, said once before anything compiles, after `lead`:
    `runs` are (options, guided, num_samples) for each configuration, each run's batch among it
    (with batch_size="auto", decided now if it was not yet: bdjax/fit.py). The real 256x256 guided
    networks also get the analytic FLOP count (bdjax/cost.py), and on a CPU the time that count
    takes at the throughput measured on a 2-core CPU; elsewhere the progress bar's ETA, which
    starts after compiling, is the estimate."""
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
    line = f"{lead} {samples} sample{'s' * (samples != 1)} ({steps} each) on {where}, {FLAGS.precision}"
    choices = {editor.batch_choice(options, guided, n).describe() for options, guided, n in runs}
    line += f", {'; '.join(sorted(choices))}"
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
    """The line said as a sampler starts compiling where nothing can be cached: why not."""
    return f"compiling (not cached: {CACHE_OFF})"


def compiled_line(seconds: float, requests: int, hits: int) -> str:
    """The line said when a sampler is ready: compiled, or read from the compilation cache, as
    JAX's cache reported it (`requests` programs looked up there, `hits` found)."""
    where = compilation_cache_dir(FLAGS.compilation_cache_dir)
    if requests and hits == requests:
        return f"loaded the compiled sampler from the compilation cache in {seconds:.1f} s ({where})"
    if CACHE_OFF:
        return f"compiled in {seconds:.1f} s (not cached: {CACHE_OFF})"
    loaded = f"; {hits} of {requests} programs loaded from the cache" if hits else ""
    return f"compiled in {seconds:.1f} s (cached in {where}{loaded})"


class CacheEvents:
    """Counts of JAX's persistent-cache lookups and hits (jax.monitoring events), read around a
    compile to tell a compile from a cache read. Registered once per process."""
    REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
    HIT = "/jax/compilation_cache/cache_hits"
    requests = hits = 0
    _listening = False

    @classmethod
    def listen(cls) -> None:
        import jax

        if not cls._listening:
            jax.monitoring.register_event_listener(cls._record)
            cls._listening = True

    @classmethod
    def _record(cls, event: str, **_) -> None:
        if event == cls.REQUEST:
            cls.requests += 1
        elif event == cls.HIT:
            cls.hits += 1


def announce_run(editor, runs) -> None:
    """Say `describe_run` on process 0's stderr. Every process decides each run's batch first:
    with batch_size="auto" the processes agree on it (bdjax/fit.py), which they all must join."""
    import jax

    for options, guided, n in runs:
        editor.batch_choice(options, guided, n)
    if jax.process_index() == 0:
        print(describe_run(editor, runs), file=sys.stderr, flush=True)


def announce_compiles(editor, bar=None, show=None) -> None:
    """Have `editor` say on process 0's stderr what preparing each sampler did, as JAX's cache
    reports it: `compiled_line()` when it is ready (compiled, or loaded from the compilation
    cache), and `compiling_line()` as it starts where nothing can be cached. `show()`, a
    program's own way of saying it (the web app's page), is called as preparing starts. The time
    is kept off the clock of `bar` (a tqdm bar of the program's own), so that its rate and ETA are
    those of sampling."""
    import time

    import jax
    from tqdm.auto import tqdm

    CacheEvents.listen()
    speak = jax.process_index() == 0

    @contextlib.contextmanager
    def compiling():
        if show is not None:
            show()
        if speak and CACHE_OFF:
            tqdm.write(compiling_line(), file=sys.stderr)
        requests, hits, began = CacheEvents.requests, CacheEvents.hits, time.perf_counter()
        yield
        if speak:
            tqdm.write(compiled_line(time.perf_counter() - began, CacheEvents.requests - requests,
                                     CacheEvents.hits - hits), file=sys.stderr)
        if bar is not None:
            bar.unpause()

    editor.on_compile = compiling
