"""Compile bdjax's sampler for a TPU topology on a machine without TPUs, and report what XLA says.

    python -m bench.compile_report --topology=v5e:2x2 --config=smoke --output=report.json
    python -m bench.compile_report --topology=v5e:16x16 --config=real --precision=bf16 \\
        --per_device_batch=16 --remat=blocks --output=v5e_256.json
    python -m bench.compile_report --topology=v6e:2x2 --config=real --max_batch --output=v6e.json

TPU topologies need libtpu (`pip install -e ".[tpu]"`), not a TPU; NVIDIA GPU targets (h100,
h200, optionally with a GPU count: h200:8) need JAX's CUDA plugin (`pip install -e ".[cuda]"`), not
a GPU. JAX describes the target's devices and XLA compiles the real program for them (on GPUs
without autotuning, and XLA:GPU gives memory figures but no FLOP or byte counts). What is compiled is the editor's own sampler
(`editor.CompiledSampler`: the begin, advance and end programs, sharded over a `data` mesh of
every chip), with parameters and inputs given only as shapes. Per device it reports the memory
XLA plans (arguments, outputs, temporaries) against the chip's HBM, XLA's FLOPs and bytes accessed
per sample-step, the gather, scatter, collective and host-transfer ops inside the compiled loop,
and compile times; `--max_batch` finds the largest per-device batch that fits, per remat policy:
by default (`--max_batch_budget=auto`) in what batch_size="auto" plans against on that device
with JAX's default settings (on GPUs JAX's allocator's 75 % share of the memory; on TPUs the
whole HBM; less auto's 10 % margin), so that its answer is auto's; `--max_batch_budget=hbm` fits
the whole HBM instead.
Every figure comes from the compiler: none is a measurement on a TPU.

How XLA counts, and so how the per-sample-step figures are made: XLA's cost analysis counts the
body of a while loop once, whatever its trip count and however deeply it is nested, and a
conditional as its costliest branch (tests/test_compile_report.py pins this on a small program).
The loop program's own count is therefore one step, but with one of the augmentations' two warps,
which the guided step runs as the two iterations of an inner loop. The per-sample-step figures
come instead from a counting program compiled for that purpose: the same sampler at one step per
call (XLA removes a one-iteration loop) with the two warps written out (`unroll_warps`), which has
no loop of bdjax's left, so that what it runs is counted once per step (XLA:TPU adds 4 small loops
of its own at the real configuration, layout copies in 3 slices, whose count misses under 0.1 %;
docs/performance.md). The loop program's own count is reported beside them
(`loop_program_per_sample_step`).
"""

from __future__ import annotations

import os
import re
import sys
import time

from absl import app, flags

from launch import cli, runtime

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Only when run as a program, like the other launch programs: importing this module defines no flags."""
    flags.DEFINE_string("topology", "v5e:2x2", "TPU topology GEN:SHAPE with GEN one of v4, v5e, v5p, v6e, e.g. "
                        "v5e:1x1 (one chip), v5e:2x2, v5e:16x16, v5p:2x2x1; or h100 / h200 GPUs, e.g. h200:8.")
    # launch/runtime.py's --config (the real networks or the smoke ones), without runtime's other
    # flags (weights, multi-process start), which mean nothing for a compile from shapes.
    runtime.define_config_flag()
    flags.DEFINE_enum("precision", "bf16", ["fp32", "bf16"], "Activations and parameters in float32 or bfloat16.")
    flags.DEFINE_integer("per_device_batch", 8, "Samples per device.")
    flags.DEFINE_enum("remat", "none", ["none", "dots", "blocks"], "UNet and CLIP rematerialisation in the guidance gradient.")
    flags.DEFINE_integer("aug_num", None, "CLIP augmentations per sample; default: 8 (smoke: the smoke preset's).")
    flags.DEFINE_enum("part", "sampler", ["sampler", "step", "augmentations", "end", "max_batch"],
                      "sampler: the editor's whole sampler; step: one guided step alone, its augmentations' warps "
                      "as --warps says; augmentations: the extending augmentations' forward and "
                      "gradient alone, as one guided step runs them (float32 images of the config's size, --aug_num "
                      "copies per sample), e.g. to compare formulations of the warps; end: the sampler's end program "
                      "alone (the result, its ranking distance and the quality scores), what a batch adds after "
                      "its steps; max_batch: only the --max_batch search.")
    flags.DEFINE_enum("warps", "unrolled", list(WARPS), "--part=step: the augmentations' two warps as the editor runs "
                      "them (loop: XLA counts one of them), written out (unrolled: the report's counting program) "
                      "or none (pooled copies only, to see what the warps add).")
    flags.DEFINE_integer("edits", 64, "Edits of the reference's length for the time bounds in the report.")
    flags.DEFINE_bool("max_batch", False, "Search the largest per-device batch whose loop program fits "
                      "--max_batch_budget, per remat policy (at --precision), as batch_size=auto does (a few "
                      "compiles each).")
    flags.DEFINE_list("max_batch_remat", ["none", "dots", "blocks"], "Remat policies for --max_batch.")
    flags.DEFINE_integer("max_batch_limit", 256, "Largest per-device batch --max_batch tries.")
    flags.DEFINE_list("max_batch_probes", ["1", "2"], "The two per-device batches --max_batch compiles first, to "
                      "predict the answer from (larger ones predict better where the answer is far).")
    flags.DEFINE_enum("max_batch_budget", "auto", ["auto", "hbm"], "What --max_batch fits the loop program into. "
                      "auto: what batch_size=auto plans against on that device with JAX's default settings (on "
                      "GPUs the allocator's share of the memory, XLA_PYTHON_CLIENT_MEM_FRACTION or 0.75; on TPUs "
                      "the whole HBM), less auto's margin; hbm: the whole HBM, no margin.")
    flags.DEFINE_string("output", None, "Write the report to this JSON file.")


GIB = 2 ** 30
# Per chip, from the vendors' published specifications: HBM bytes, dense bf16 TFLOP/s, HBM GB/s.
CHIPS = {
    "v4": {"device_kind": "TPU v4", "hbm_bytes": 32 * GIB, "bf16_tflops": 275.0, "hbm_gbps": 1228.0},
    "v5e": {"device_kind": "TPU v5 lite", "hbm_bytes": 16 * GIB, "bf16_tflops": 197.0, "hbm_gbps": 819.0},
    "v5p": {"device_kind": "TPU v5", "hbm_bytes": 95 * GIB, "bf16_tflops": 459.0, "hbm_gbps": 2765.0},
    "v6e": {"device_kind": "TPU v6 lite", "hbm_bytes": 32 * GIB, "bf16_tflops": 918.0, "hbm_gbps": 1640.0},
    "h100": {"device_kind": "NVIDIA H100", "hbm_bytes": 80 * GIB, "bf16_tflops": 989.0, "hbm_gbps": 3350.0},
    "h200": {"device_kind": "NVIDIA H200", "hbm_bytes": 150754820096, "bf16_tflops": 989.0, "hbm_gbps": 4800.0},
}
TPU_HOSTS = {"v4": "2x2x1", "v5e": "2x2", "v5p": "2x2x1", "v6e": "2x2"}  # the smallest host of each
# XLA:GPU's description of the target (GpuTargetConfigProto fields) for compiling without the GPU.
GPU_TARGETS = {
    "h100": dict(core_count=132, memory_bandwidth=3350000000000, l2_cache_size=52428800, clock_rate_ghz=1.98),
    "h200": dict(core_count=132, memory_bandwidth=4800000000000, l2_cache_size=52428800, clock_rate_ghz=1.98),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
HOST_TRANSFERS = ("send", "recv", "infeed", "outfeed")


# ----------------------------------------------------------------------------------- devices

def devices_for(topology: str) -> tuple[list, dict]:
    """(compile-only devices, the chip's figures) of a named topology: a TPU slice GEN:SHAPE
    (v4, v5e, v5p, v6e; GEN:1x1 is one chip) or NVIDIA GPUs on one host (h100, h200, h200:8)."""
    generation, _, shape = topology.partition(":")
    chip = dict(CHIPS.get(generation, {}), name=generation)
    if generation in GPU_TARGETS and (not shape or shape.isdigit()):
        return gpu_devices(generation, int(shape or 1)), chip
    if generation in TPU_HOSTS and re.fullmatch(r"\d+(x\d+)+", shape):
        return tpu_devices(generation, shape), chip
    raise ValueError(f"--topology={topology!r} must be GEN:SHAPE with GEN one of {', '.join(TPU_HOSTS)} "
                     f"(e.g. v5e:2x2, v5p:2x2x1), or {' or '.join(GPU_TARGETS)} with an optional GPU count (h200:8)")


def tpu_devices(generation: str, shape: str) -> list:
    """TPU devices described by libtpu, no TPU needed. One chip (1x1, 1x1x1) is the first chip of
    the generation's smallest host, the smallest topology libtpu describes."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # deviceless: no TPU is opened
    from jax.experimental import topologies

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ValueError('TPU topologies need libtpu: pip install -e ".[tpu]"') from None
    single = all(d == "1" for d in shape.split("x"))
    name = f"{generation}:{TPU_HOSTS[generation] if single else shape}"
    try:
        devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except Exception as e:  # noqa: BLE001 - libtpu's message says what is wrong with the shape
        raise ValueError(f"--topology={generation}:{shape}: {str(e).splitlines()[0]}") from None
    return list(devices[:1]) if single else list(devices)


def gpu_target_config(generation: str) -> str:
    """The text GpuTargetConfigProto of a GPU (Hopper, sm_90)."""
    target = GPU_TARGETS[generation]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {target['core_count']}
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {target['memory_bandwidth']} l2_cache_size: {target['l2_cache_size']}
  clock_rate_ghz: {target['clock_rate_ghz']} device_memory_size: {CHIPS[generation]['hbm_bytes']}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{CHIPS[generation]['device_kind']}"
"""


def gpu_devices(generation: str, count: int) -> list:
    """Compile-only CUDA devices from JAX's CUDA plugin (jax[cuda12] or jax[cuda13]), no GPU needed.
    Without a GPU the plugin's start-up check must be skipped, or it refuses to register."""
    import importlib.util

    if not any(importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)):
        raise ValueError('GPU topologies need JAX\'s CUDA plugin: pip install -e ".[cuda]"')
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    # Without a GPU nothing is autotuned, and XLA:GPU's Triton GEMM emitter then fails to tile a
    # small float32 dot (the augmentations' pooling): use its library GEMMs instead.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_triton_gemm=false").strip()
    from jax.experimental import topologies

    if count < 1:
        raise ValueError(f"--topology={generation}:{count}: the GPU count must be at least 1")
    try:
        return list(topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                                 target_config=gpu_target_config(generation)).devices)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--topology={generation}:{count}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------- HLO ops

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OPCODE = re.compile(r"=\s.*?\s([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"(?:calls|body|condition|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def parse_hlo(text: str) -> tuple[dict, str]:
    """({computation: [instruction lines]}, entry computation name) of an HLO module's text."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    return computations, entry


def _callees(line: str) -> list[str]:
    names = _CALLED.findall(line)
    for group in _BRANCHES.findall(line):
        names += [n.strip().lstrip("%") for n in group.split(",") if n.strip()]
    return names


def _reachable(computations: dict, roots: list[str]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in seen or name not in computations:
            continue
        seen.add(name)
        for line in computations[name]:
            todo += _callees(line)
    return seen


def loop_ops(text: str, whole: bool = False) -> dict:
    """Counts of gather, scatter, collective and host-transfer ops inside the program's loops (the
    bodies of the while loops the entry computation runs, and all they call); without a loop (a
    one-step scan is unrolled), or with `whole`, inside the whole program."""
    computations, entry = parse_hlo(text)
    bodies = [] if whole else [m.group(1) for line in computations.get(entry, []) if " while(" in line
                               for m in [re.search(r"body=%?([\w.\-]+)", line)] if m]
    scope = _reachable(computations, bodies or [entry])
    counts = {"gather": 0, "scatter": 0, "collective": 0, "host_transfer": 0, "host_callback": 0}
    collectives: dict[str, int] = {}
    for name in scope:
        for line in computations[name]:
            match = _OPCODE.search(line)
            if not match:
                continue
            op = match.group(1)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if op in ("gather", "scatter"):
                counts[op] += 1
            elif base in COLLECTIVES and not op.endswith("-done"):
                counts["collective"] += 1
                collectives[base] = collectives.get(base, 0) + 1
            elif op in HOST_TRANSFERS:
                counts["host_transfer"] += 1
            elif op == "custom-call":
                target = _TARGET.search(line)
                if target and "callback" in target.group(1).lower():
                    counts["host_callback"] += 1
    return {**counts, "collectives_by_kind": collectives, "in_loop": bool(bodies)}


# ----------------------------------------------------------------------------------- compiling

def model_fields(config: str) -> tuple[dict, dict, dict]:
    """The UNetModel fields, CLIP fields and edit option overrides of --config."""
    from bdjax import smoke
    from bdjax.models import clip as clip_lib
    from bdjax.models import unet as unet_lib

    if config == "smoke":
        return smoke.unet_config(), dict(smoke.CLIP_CONFIG), dict(smoke.OPTIONS)
    return unet_lib.preset("adm256_uncond"), clip_lib.preset("vit_b16"), {}


WARPS = ("loop", "unrolled", "none")  # --warps: how a --part=step program runs the augmentations' warps


def build_sampler(config: str, precision: str, remat: str, aug_num: int | None, mesh, warps: str = "loop"):
    """The editor's CompiledSampler for the configuration, the options, and the params as shapes.
    The networks are those the launch programs load: the UNet, CLIP and LPIPS (for the scores the
    end program computes; bdjax/scores.py). `warps`: "loop", the augmentations as the editor runs
    them (two warps, the two iterations of a loop); "unrolled", the two warps written out (the same
    values), for counting the work; "none", no warps (aug_num copies of the pooled images), to
    see what the warps add to a count."""
    import jax
    import jax.numpy as jnp

    from bdjax import augment as augment_lib
    from bdjax.blended import Models, make_sampler
    from bdjax.options import EditOptions
    from bdjax.editor import CompiledSampler
    from bdjax.models import clip as clip_lib
    from bdjax.models import lpips as lpips_lib
    from bdjax.models import unet as unet_lib
    from bdjax import parallel

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[precision]
    unet_fields, clip_fields, options = model_fields(config)
    if aug_num is not None:
        options["aug_num"] = aug_num
    options = EditOptions(**options)
    models = Models(unet=unet_lib.UNetModel(**unet_fields, dtype=dtype, remat=remat),
                    clip=clip_lib.CLIP(**clip_fields, dtype=dtype, remat=remat), lpips=lpips_lib.LPIPS(dtype=dtype))
    size = models.unet.image_size
    shapes = {"unet": unet_lib.param_shapes(models.unet), "clip": clip_lib.param_shapes(models.clip),
              "lpips": lpips_lib.param_shapes(models.lpips)}
    replicated = parallel.replicated_sharding(mesh)
    params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype if jnp.issubdtype(s.dtype, jnp.floating)
                                                         else s.dtype, sharding=replicated), shapes)
    def unrolled(images, keys):
        return augment_lib.extending_augmentations(
            images, keys, aug_num=options.aug_num, output_size=models.clip.image_resolution,
            symmetric_translation=options.symmetric_translation, unroll_warps=True)

    def pooled(images, keys):
        return jnp.tile(augment_lib.adaptive_avg_pool(images, models.clip.image_resolution), (options.aug_num, 1, 1, 1))

    augment = {"loop": None, "unrolled": unrolled, "none": pooled}[warps]
    sampler = CompiledSampler(make_sampler(models, options, guided=True, augment=augment), mesh)
    return sampler, options, params, size, models.clip.embed_dim


def compile_programs(sampler, params, size: int, embed_dim: int, batch: int, mesh, which=("begin", "advance", "end"),
                     steps: int | None = None):
    """Lower and compile the sampler's programs for a global batch, as batch_size="auto" does
    (bdjax/fit.py): {name: (compiled, seconds)}; `steps`: the advance program's steps per call."""
    from bdjax import fit

    return fit.compile_programs(sampler, params, size, embed_dim, batch, mesh, which, steps)


def memory(compiled) -> dict:
    """XLA's memory analysis per device, as batch_size="auto" reads it (bdjax/fit.py `memory`)."""
    from bdjax import fit

    return fit.memory(compiled)


def cost(compiled) -> dict:
    """XLA's FLOPs and bytes accessed; None where the backend has no cost analysis (XLA:GPU)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis:
        return {"flops": None, "bytes_accessed": None}
    return {"flops": float(analysis.get("flops", 0.0)), "bytes_accessed": float(analysis.get("bytes accessed", 0.0))}


def count_step(batch: int, mesh, log, warps: str = "unrolled") -> dict:
    """XLA's FLOPs and bytes accessed of one guided step of the global batch, from a program
    made for counting: the advance program at one step per call (XLA removes a loop of one
    iteration), by default with the augmentations' two warps unrolled. XLA's cost analysis counts
    the body of a while loop once, whatever its trip count and however deeply it is nested (and a
    conditional as its costliest branch), so the loop program's own count is one step with one
    of the two warps: this program counts both, and every figure in it runs once per step.
    `loops`: the while loops left in it (XLA:TPU makes a few itself at the real configuration:
    layout copies in slices)."""
    sampler, _, params, size, embed_dim = build_sampler(FLAGS.config, FLAGS.precision, FLAGS.remat, FLAGS.aug_num,
                                                        mesh, warps=warps)
    compiled, seconds = compile_programs(sampler, params, size, embed_dim, batch, mesh, which=("advance",),
                                         steps=1)["advance"]
    whiles = sum(" while(" in line for line in compiled.as_text().splitlines())
    log(f"  one step, warps {warps}: compiled in {seconds:.0f} s, {whiles} loops")
    return {"warps": warps, "cost": cost(compiled), "memory": memory(compiled), "compile_s": seconds, "loops": whiles}


def max_batch_budget(chip: dict, mode: str) -> tuple[int, str]:
    """The bytes --max_batch fits the loop program into, and how they were found. `auto`: what
    batch_size="auto" plans against on that device with JAX's default settings (bdjax/fit.py
    `choose`): the runtime's memory limit less fit.MARGIN, where the limit is, on a GPU, the share
    of its memory JAX's allocator takes (XLA_PYTHON_CLIENT_MEM_FRACTION, 0.75 unless set) and, on
    a TPU, the whole HBM. `hbm`: the whole HBM, no margin."""
    from bdjax import fit

    hbm = chip["hbm_bytes"]
    if mode == "hbm":
        return hbm, f"the whole HBM ({hbm / GIB:.1f} GiB), no margin"
    if mode != "auto":
        raise ValueError(f"max_batch budget {mode!r}: use auto or hbm")
    share, where = 1.0, "the whole HBM"
    if chip["device_kind"].startswith("NVIDIA"):
        text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75")
        try:
            share = float(text)
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise ValueError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text}: use a fraction in (0, 1], e.g. 0.75")
        where = f"JAX's allocator's {share:.0%} share"
    limit = int(hbm * share)
    return int(limit * (1 - fit.MARGIN)), (f"as batch_size=auto: {where} ({limit / GIB:.1f} GiB of {hbm / GIB:.1f}) "
                                           f"less a {fit.MARGIN:.0%} margin")


def search_max_batch(config: str, precision: str, remat: str, aug_num: int | None, mesh, chip: dict, limit: int,
                     log, probes: tuple[int, int] = (1, 2), budget: int | None = None) -> dict:
    """The largest per-device batch whose loop program (the largest of the sampler's three) fits
    `budget` bytes (max_batch_budget; the chip's whole HBM if None), found as batch_size="auto"
    finds it (bdjax/fit.py `search`: the two probes compiled, the answer predicted linearly and
    checked; predicted again, bisected or doubled where it is wrong). Every batch compiled on the way is kept
    with its memory figures (`memory_by_batch`)."""
    from bdjax import fit

    budget = chip["hbm_bytes"] if budget is None else budget
    sampler, _, params, size, embed_dim = build_sampler(config, precision, remat, aug_num, mesh)
    devices = mesh.devices.size
    tried = {}

    def measure(per_device):
        compiled, seconds = compile_programs(sampler, params, size, embed_dim, per_device * devices, mesh,
                                             which=("advance",))["advance"]
        tried[per_device] = {**memory(compiled), "compile_s": seconds}
        total = tried[per_device]["total_bytes"]
        log(f"  {precision} remat={remat} per-device batch {per_device}: {total / GIB:.2f} GiB "
            f"({'fits' if total <= budget else 'too big'}; compiled in {seconds:.0f} s)")
        return total

    found = fit.search(measure, budget, limit, probes)
    total = tried[found]["total_bytes"] if found else None
    return {"precision": precision, "remat": remat, "max_per_device_batch": found, "budget_bytes": budget,
            "total_bytes": total, "headroom_bytes": None if not found else chip["hbm_bytes"] - total,
            "total_bytes_by_batch": {str(k): v["total_bytes"] for k, v in sorted(tried.items())},
            "memory_by_batch": {str(k): v for k, v in sorted(tried.items())}}


def augmentations_report(mesh, size: int, clip_resolution: int, aug_num: int, per_device_batch: int) -> dict:
    """The extending augmentations' forward and gradient (what the guidance backpropagates through
    them) from `size` images to `clip_resolution` copies, per device on its share of the samples,
    compiled for the mesh's devices."""
    import jax
    import jax.numpy as jnp

    from bdjax import augment, parallel

    def forward_and_gradient(images, key_data):
        def loss(images):
            copies = augment.extending_augmentations(images, jax.random.wrap_key_data(key_data), aug_num=aug_num,
                                                     output_size=clip_resolution, unroll_warps=True)
            return jnp.sum(jnp.square(copies))
        return jax.value_and_grad(loss)(images)[1]

    batch = per_device_batch * mesh.devices.size
    sharded = parallel.batch_sharded(mesh)
    program = jax.jit(parallel.over_samples(forward_and_gradient, mesh, replicated=()))
    start = time.perf_counter()
    compiled = program.lower(jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=sharded),
                             jax.ShapeDtypeStruct((batch, 2), jnp.uint32, sharding=sharded)).compile()
    return {"compile_s": time.perf_counter() - start, "memory": memory(compiled), "cost": cost(compiled),
            "ops": loop_ops(compiled.as_text(), whole=True), "loops": compiled.as_text().count(" while("),
            "note": "compiled with the two warps unrolled (the editor runs them as the two iterations of a loop, "
                    "whose body XLA would count once), so the cost covers both warps"}


# ----------------------------------------------------------------------------------- main

def main(argv):
    if len(argv) > 1:
        raise ValueError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.per_device_batch < 1 or FLAGS.edits < 1 or FLAGS.max_batch_limit < 1:
        raise ValueError("--per_device_batch, --edits and --max_batch_limit must be at least 1")
    if FLAGS.aug_num is not None and FLAGS.aug_num < 1:
        raise ValueError(f"--aug_num={FLAGS.aug_num} must be at least 1")
    if len(FLAGS.max_batch_probes) != 2 or not all(p.isdigit() and int(p) >= 1 for p in FLAGS.max_batch_probes):
        raise ValueError(f"--max_batch_probes={','.join(FLAGS.max_batch_probes)} must be two batches of at least 1, "
                         "e.g. 1,2")
    unknown = sorted(set(FLAGS.max_batch_remat) - {"none", "dots", "blocks"})
    if unknown:
        raise ValueError(f"--max_batch_remat: unknown policies {unknown}; choose from none, dots, blocks")
    if FLAGS.output:
        from bdjax import files

        files.check_writable(os.path.dirname(os.path.abspath(FLAGS.output)))

    import jax

    from bdjax import parallel

    log = lambda message: print(message, flush=True)  # noqa: E731
    devices, chip = devices_for(FLAGS.topology)
    if FLAGS.max_batch or FLAGS.part == "max_batch":
        max_batch_budget(chip, FLAGS.max_batch_budget)  # a bad XLA_PYTHON_CLIENT_MEM_FRACTION, before any compile
    mesh = parallel.make_mesh(devices)
    batch = FLAGS.per_device_batch * len(devices)
    source = (f"XLA:{devices[0].platform.upper()} compiler analysis without the hardware "
              "(memory_analysis, cost_analysis, HLO text)")
    if FLAGS.part == "augmentations":
        from bdjax import smoke

        size = smoke.IMAGE_SIZE if FLAGS.config == "smoke" else 256
        aug_num = FLAGS.aug_num or (smoke.OPTIONS["aug_num"] if FLAGS.config == "smoke" else 8)
        clip_resolution = model_fields(FLAGS.config)[1]["image_resolution"]
        part = augmentations_report(mesh, size, clip_resolution, aug_num, FLAGS.per_device_batch)
        report = {"command": " ".join(["python -m bench.compile_report", *sys.argv[1:]]), "source": source,
                  "jax_version": jax.__version__, "topology": FLAGS.topology, "devices": len(devices),
                  "device_kind": devices[0].device_kind, "part": "augmentations", "image_size": size,
                  "clip_resolution": clip_resolution, "aug_num": aug_num,
                  "per_device_batch": FLAGS.per_device_batch, **part,
                  "per_sample_step": {k: None if v is None else v / FLAGS.per_device_batch
                                      for k, v in part["cost"].items()}}
        log(f"{FLAGS.topology}: the augmentations' forward and gradient, {FLAGS.per_device_batch} x {size}x{size} "
            f"images per device, aug_num {aug_num}: {part['memory']['temp_bytes'] / GIB:.2f} GiB temporaries; "
            f"per sample-step {report['per_sample_step']['flops']} FLOP, "
            f"{report['per_sample_step']['bytes_accessed']} bytes accessed; {part['ops']['gather']} gather, "
            f"{part['ops']['scatter']} scatter ops; compile {part['compile_s']:.1f} s")
        return write(report, log)
    if FLAGS.part == "step":
        step = count_step(batch, mesh, log, FLAGS.warps)
        report = {"command": " ".join(["python -m bench.compile_report", *sys.argv[1:]]), "source": source,
                  "jax_version": jax.__version__, "topology": FLAGS.topology, "devices": len(devices),
                  "device_kind": devices[0].device_kind, "part": "step", "config": FLAGS.config,
                  "precision": FLAGS.precision, "remat": FLAGS.remat, "per_device_batch": FLAGS.per_device_batch,
                  **step, "per_sample_step": {k: None if v is None else v / FLAGS.per_device_batch
                                              for k, v in step["cost"].items()}}
        log(f"{FLAGS.topology}: one guided step, warps {FLAGS.warps}, per-device batch {FLAGS.per_device_batch}: "
            f"per sample-step {report['per_sample_step']['flops']} FLOP, "
            f"{report['per_sample_step']['bytes_accessed']} bytes accessed")
        return write(report, log)
    if FLAGS.part == "max_batch":
        report = {"command": " ".join(["python -m bench.compile_report", *sys.argv[1:]]), "source": source,
                  "jax_version": jax.__version__, "topology": FLAGS.topology, "devices": len(devices),
                  "device_kind": devices[0].device_kind, "chip": chip, "part": "max_batch", "config": FLAGS.config,
                  "precision": FLAGS.precision, "max_batch": search_all(mesh, chip, log)}
        for found in report["max_batch"]:
            log(f"  largest per-device batch that fits, {found['precision']} remat={found['remat']}: "
                f"{found['max_per_device_batch']}")
        return write(report, log)
    if FLAGS.part == "end":
        report = end_report(mesh, devices, batch, source)
        log(f"{FLAGS.topology}: the end program, per-device batch {FLAGS.per_device_batch}: "
            f"{report['end_flops_per_sample']} FLOP per sample "
            f"({report['end_share_of_edit_flops']} of an edit's analytic FLOPs); "
            f"temporaries {report['memory']['temp_bytes'] / GIB:.2f} GiB; compile {report['compile_s']:.1f} s")
        return write(report, log)
    log(f"compiling bdjax's sampler for {FLAGS.topology} ({len(devices)} x {devices[0].device_kind}), "
        f"config={FLAGS.config} precision={FLAGS.precision} remat={FLAGS.remat} per-device batch "
        f"{FLAGS.per_device_batch}")
    sampler, options, params, size, embed_dim = build_sampler(FLAGS.config, FLAGS.precision, FLAGS.remat,
                                                              FLAGS.aug_num, mesh)
    programs = compile_programs(sampler, params, size, embed_dim, batch, mesh)
    steps_per_call = sampler.chunks.shape[1]
    report = {
        "command": " ".join(["python -m bench.compile_report", *sys.argv[1:]]),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "jax_version": jax.__version__,
        "topology": FLAGS.topology, "devices": len(devices), "device_kind": devices[0].device_kind,
        "chip": chip, "config": FLAGS.config, "precision": FLAGS.precision, "remat": FLAGS.remat,
        "aug_num": options.aug_num, "per_device_batch": FLAGS.per_device_batch, "global_batch": batch,
        "num_steps": sampler.num_steps, "steps_per_call": steps_per_call, "programs": {},
    }
    for name, (compiled, seconds) in programs.items():
        report["programs"][name] = {"compile_s": seconds, "memory": memory(compiled), "cost": cost(compiled),
                                    "ops": loop_ops(compiled.as_text())}
    loop = report["programs"]["advance"]
    # XLA's cost analysis counts a loop body once, whatever its trip count: the loop program's
    # figures are one step, but with one of the augmentations' two warps (an inner loop). The
    # counting program has no loop (count_step); XLA:GPU gives no counts, so it is not compiled there.
    per_batch_step = loop["cost"]
    if loop["cost"]["flops"] is not None:
        report["counting_program"] = count_step(batch, mesh, log)
        per_batch_step = report["counting_program"]["cost"]
    per_sample_step = {k: None if v is None else v / FLAGS.per_device_batch for k, v in per_batch_step.items()}
    peak = max(p["memory"]["total_bytes"] for p in report["programs"].values())
    # The end program: the result, its ranking distance and every quality score, once per sample.
    end_flops = report["programs"]["end"]["cost"]["flops"]
    end_per_sample = None if end_flops is None else end_flops / FLAGS.per_device_batch
    sample_steps = FLAGS.edits * sampler.num_steps / len(devices)  # per device, all devices busy
    report.update({
        "flops_per_sample_step": per_sample_step["flops"],
        "end_flops_per_sample": end_per_sample,
        "end_share_of_edit_flops": None if end_per_sample is None or not per_sample_step["flops"] else
        end_per_sample / (end_per_sample + sampler.num_steps * per_sample_step["flops"]),
        "bytes_accessed_per_sample_step": per_sample_step["bytes_accessed"],
        "loop_program_per_sample_step": {k: None if v is None else v / FLAGS.per_device_batch
                                         for k, v in loop["cost"].items()},
        "peak_program_bytes": peak,
        "hbm_headroom_bytes": chip["hbm_bytes"] - peak,
        "fits": peak <= chip["hbm_bytes"],
        "compile_s": sum(p["compile_s"] for p in report["programs"].values())
        + report.get("counting_program", {}).get("compile_s", 0.0),
        "loop_ops": loop["ops"],
        "bounds_for_edits": None if per_sample_step["flops"] is None else {
            "edits": FLAGS.edits, "steps_per_edit": sampler.num_steps,
            "flops_over_peak_s": sample_steps * per_sample_step["flops"] / (chip["bf16_tflops"] * 1e12),
            "bytes_over_bandwidth_s": sample_steps * per_sample_step["bytes_accessed"] / (chip["hbm_gbps"] * 1e9),
            "note": "lower bounds from XLA's counts at the chip's peak bf16 FLOP/s and HBM bandwidth, "
                    "with every device busy; not a run",
        },
    })
    if FLAGS.max_batch:
        log("searching the largest per-device batch that fits ...")
        report["max_batch"] = search_all(mesh, chip, log)
    log(summary(report))
    write(report, log)


def write(report: dict, log) -> None:
    """Write the report to --output, if given."""
    if FLAGS.output:
        from bdjax import outputs

        outputs.save_json(FLAGS.output, report)
        log(f"wrote {FLAGS.output}")


def search_all(mesh, chip: dict, log) -> list[dict]:
    """--max_batch: search_max_batch for every --max_batch_remat policy at --precision, against
    --max_batch_budget."""
    probes = tuple(int(p) for p in FLAGS.max_batch_probes)
    budget, how = max_batch_budget(chip, FLAGS.max_batch_budget)
    log(f"--max_batch: fitting the loop program into {budget / GIB:.2f} GiB per device ({how})")
    return [{**search_max_batch(FLAGS.config, FLAGS.precision, remat, FLAGS.aug_num, mesh, chip,
                                FLAGS.max_batch_limit, log, probes, budget), "budget": how}
            for remat in FLAGS.max_batch_remat]


def end_report(mesh, devices, batch: int, source: str) -> dict:
    """--part=end: the end program alone (no UNet: the result, CLIP of the masked and of the
    whole result, LPIPS of the background, PSNR, the seam), against the analytic FLOPs of an edit
    with the real networks (75 steps, the options' crops; bdjax/cost.py)."""
    import jax

    from bdjax import cost as cost_lib

    sampler, options, params, size, embed_dim = build_sampler(FLAGS.config, FLAGS.precision, FLAGS.remat,
                                                              FLAGS.aug_num, mesh)
    compiled, seconds = compile_programs(sampler, params, size, embed_dim, batch, mesh, which=("end",))["end"]
    figures = cost(compiled)
    per_sample = None if figures["flops"] is None else figures["flops"] / FLAGS.per_device_batch
    edit = sampler.num_steps * cost_lib.guided_step_flops(options.aug_num) if FLAGS.config == "real" else None
    return {"command": " ".join(["python -m bench.compile_report", *sys.argv[1:]]), "source": source,
            "jax_version": jax.__version__, "topology": FLAGS.topology, "devices": len(devices),
            "device_kind": devices[0].device_kind, "part": "end", "config": FLAGS.config,
            "precision": FLAGS.precision, "per_device_batch": FLAGS.per_device_batch, "global_batch": batch,
            "compile_s": seconds, "memory": memory(compiled), "cost": figures, "end_flops_per_sample": per_sample,
            "edit_flops_per_sample_analytic": edit,
            "end_share_of_edit_flops": None if per_sample is None or edit is None else per_sample / edit}


def summary(r: dict) -> str:
    memory = r["programs"]["advance"]["memory"]
    ops = r["loop_ops"]
    lines = [
        f"{r['topology']}: {r['devices']} x {r['device_kind']} ({r['chip']['hbm_bytes'] / GIB:.0f} GiB HBM each), "
        f"per-device batch {r['per_device_batch']}, {r['precision']}, remat={r['remat']}",
        f"  loop program per device: arguments {memory['argument_bytes'] / GIB:.2f} GiB, temporaries "
        f"{memory['temp_bytes'] / GIB:.2f} GiB, total {memory['total_bytes'] / GIB:.2f} GiB; largest program "
        f"{r['peak_program_bytes'] / GIB:.2f} GiB -> {'fits' if r['fits'] else 'does NOT fit'} "
        f"(headroom {r['hbm_headroom_bytes'] / GIB:.2f} GiB)",
        f"  inside the loop: {ops['gather']} gather, {ops['scatter']} scatter, {ops['collective']} collective, "
        f"{ops['host_transfer'] + ops['host_callback']} host transfer ops",
        f"  compile {r['compile_s']:.1f} s",
    ]
    bounds = r["bounds_for_edits"]
    if bounds is None:
        lines.insert(2, "  no FLOP or byte counts: this backend's compiler gives no cost analysis")
    else:
        raw = r["loop_program_per_sample_step"]
        lines.insert(2, f"  per sample-step: {r['flops_per_sample_step']:.3g} FLOP, "
                        f"{r['bytes_accessed_per_sample_step']:.3g} bytes accessed (the counting program; "
                        f"the loop program's own count, one of the two warps: {raw['flops']:.3g} FLOP, "
                        f"{raw['bytes_accessed']:.3g} bytes)")
        lines.insert(4, f"  {bounds['edits']} edits x {bounds['steps_per_edit']} steps: FLOPs/peak "
                        f"{bounds['flops_over_peak_s']:.1f} s, bytes/bandwidth {bounds['bytes_over_bandwidth_s']:.1f} s "
                        "(compiler counts, not a run)")
    for found in r.get("max_batch", []):
        lines.append(f"  largest per-device batch that fits, {found['precision']} remat={found['remat']}: "
                     f"{found['max_per_device_batch']}")
    return "\n".join(lines)


if __name__ == "__main__":
    define_flags()
    app.run(cli.program(main), flags_parser=cli.parse_flags)
