"""bench/compile_report.py: bdjax's sampler compiled for TPU chips by libtpu on this CPU machine
(no TPU). The smoke configuration's report is complete and shows a purely data-parallel loop; the
HLO op counting and the batch search are checked on small cases whose answers are known."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import compile_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tpu_mesh(count):
    devices = compile_report.devices_for("v5e:2x2")[0][:count]
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def test_loop_ops_counts_gathers_scatters_and_collectives_inside_the_loop_only():
    mesh = tpu_mesh(2)
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.ShapeDtypeStruct((2, 512), jnp.float32, sharding=sharded)
    index = jax.ShapeDtypeStruct((2, 64), jnp.int32, sharding=sharded)

    def program(with_collective):
        def per_device(x, index):
            def body(carry, _):
                # A data-dependent read and its gradient: one gather and one scatter-add.
                value, grad = jax.value_and_grad(lambda c: jnp.sum(jnp.take_along_axis(c, index, axis=1) ** 2))(carry)
                carry = carry - 0.1 * grad
                if with_collective:
                    carry = carry + jax.lax.psum(value, "data")
                return carry, None
            return jax.lax.scan(body, x, None, length=3)[0]
        spec = jax.sharding.PartitionSpec("data")
        f = jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=spec)
        return jax.jit(f).lower(x, index).compile().as_text()

    alone = compile_report.loop_ops(program(False))
    assert alone["in_loop"] and alone["gather"] >= 1 and alone["scatter"] >= 1
    assert alone["collective"] == 0 and alone["host_transfer"] == alone["host_callback"] == 0
    shared = compile_report.loop_ops(program(True))
    assert shared["collective"] >= 1 and "all-reduce" in shared["collectives_by_kind"]


def test_xla_tpu_counts_a_loop_body_once_so_the_report_counts_a_program_without_loops():
    """What the report's per-sample-step figures rest on, on a small program whose right count is
    known (XLA:TPU, one v5e chip). A step runs a "warp" (a matmul, a gather and its scatter-add
    gradient) twice, as the guided step runs the augmentations' affine and perspective warps as
    two iterations of a loop: its right FLOP count is twice one warp's. XLA's cost analysis counts
    a while body once, whatever its trip count and however deeply nested, and a conditional as its
    costliest branch; only the step written without a loop (scan unroll=True, the report's
    counting program) is counted right."""
    mesh = tpu_mesh(1)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((4, 256), jnp.float32, sharding=replicated)
    index = jax.ShapeDtypeStruct((4, 64), jnp.int32, sharding=replicated)
    weights = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=replicated)

    def warp(c, index, weights):
        grad = jax.grad(lambda c: jnp.sum(jnp.take_along_axis(jnp.tanh(c @ weights), index, axis=1) ** 2))(c)
        return c - 0.1 * grad

    def two_warps(unroll):
        def step(c, index, weights):
            return jax.lax.scan(lambda c, _: (warp(c, index, weights), None), c, None, length=2, unroll=unroll)[0]
        return step

    def steps(step, length):
        return lambda c, *args: jax.lax.scan(lambda c, _: (step(c, *args), None), c, None, length=length)[0]

    def counted(f, *args):
        """(XLA's FLOP count, while loops in the compiled program)."""
        compiled = jax.jit(f).lower(*(args or (x, index, weights))).compile()
        return compile_report.cost(compiled)["flops"], compiled.as_text().count(" while(")

    one, _ = counted(warp)
    twice, loops = counted(lambda c, *args: warp(warp(c, *args), *args))  # written out: the right count
    assert one > 0 and loops == 0 and abs(twice - 2 * one) <= 0.01 * 2 * one
    for program in (two_warps(False), steps(two_warps(False), 10)):  # a loop of two warps, and ten steps of it
        flops, loops = counted(program)
        assert loops >= 1 and flops < 1.1 * one  # the body counted once: one warp of the two
    flops, loops = counted(two_warps(True))  # the counting program's way: no loop, the right count
    assert loops == 0 and abs(flops - twice) <= 0.01 * twice
    flops, loops = counted(steps(two_warps(True), 10))  # ten such steps: one step counted, both warps
    assert loops == 1 and abs(flops - twice) <= 0.05 * twice  # (a loop adds a little: its invariants)
    which = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    flops, _ = counted(lambda c, index, weights, i: jax.lax.switch(
        i, (lambda c: warp(warp(c, index, weights), index, weights), lambda c: c), c), x, index, weights, which)
    assert abs(flops - twice) <= 0.01 * twice  # a conditional: its costliest branch


def test_max_batch_is_the_largest_batch_whose_loop_program_fits_a_fake_chip(monkeypatch):
    """--max_batch against fake HBM sizes: the loop program's footprint is faked as the compiler's
    grows (the parameters, then bytes per sample, and once a jump, as when XLA changes its plan),
    and the batch found is the largest whose footprint fits, in a few compiles."""
    mesh = tpu_mesh(2)
    compiled = []

    def footprint(per_device):
        return 1000 + 300 * per_device + (5000 if per_device > 7 else 0)

    def fake_compile(sampler, params, size, embed_dim, batch, mesh, which, steps=None):
        assert which == ("advance",) and batch % 2 == 0  # global batches: per-device batch x 2 devices
        compiled.append(batch // 2)
        return {"advance": (batch // 2, 0.0)}

    monkeypatch.setattr(compile_report, "compile_programs", fake_compile)
    monkeypatch.setattr(compile_report, "memory", lambda per_device: {"total_bytes": footprint(per_device)})
    for hbm, expected in ((1299, 0), (1300, 1), (2500, 5), (2799, 5), (8000, 7), (10_000, 13), (footprint(20), 20),
                          (10 ** 9, 256)):
        compiled.clear()
        found = compile_report.search_max_batch("smoke", "bf16", "blocks", None, mesh, {"hbm_bytes": hbm}, 256,
                                                log=lambda message: None)
        assert found["max_per_device_batch"] == expected, hbm
        if expected:
            assert found["total_bytes"] == footprint(expected) and found["headroom_bytes"] == hbm - footprint(expected)
            assert footprint(expected + 1) > hbm or expected == 256
        assert len(compiled) <= 12, compiled  # a prediction and a check, not a scan
    # Against a budget below the HBM (what auto plans against): the largest under the budget, its
    # headroom against the whole HBM, and every batch compiled kept with its memory figures.
    found = compile_report.search_max_batch("smoke", "bf16", "blocks", None, mesh, {"hbm_bytes": 10 ** 9}, 256,
                                            log=lambda message: None, probes=(4, 8), budget=2500)
    assert found["max_per_device_batch"] == 5 and found["budget_bytes"] == 2500
    assert found["headroom_bytes"] == 10 ** 9 - footprint(5)
    assert set(found["memory_by_batch"]) == set(found["total_bytes_by_batch"]) >= {"4", "5", "6", "8"}
    assert all(found["memory_by_batch"][k]["total_bytes"] == footprint(int(k)) for k in found["memory_by_batch"])


def test_max_batch_budget_is_what_auto_plans_against(monkeypatch):
    """--max_batch_budget=auto: on a GPU, JAX's allocator's share (XLA_PYTHON_CLIENT_MEM_FRACTION,
    0.75 unless set) less fit.MARGIN, as batch_size=auto plans on a GPU whose memory_stats()
    reports that share; on a TPU, the whole HBM less the margin; hbm: the whole HBM."""
    from bdjax import fit

    gpu = {"device_kind": "NVIDIA H200", "hbm_bytes": 150754820096}
    tpu = {"device_kind": "TPU v5 lite", "hbm_bytes": 16 * 2 ** 30}
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert compile_report.max_batch_budget(gpu, "hbm")[0] == gpu["hbm_bytes"]
    budget, how = compile_report.max_batch_budget(gpu, "auto")
    assert budget == int(int(gpu["hbm_bytes"] * 0.75) * (1 - fit.MARGIN)) and "75%" in how
    assert compile_report.max_batch_budget(tpu, "auto")[0] == int(tpu["hbm_bytes"] * (1 - fit.MARGIN))
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".5")
    assert compile_report.max_batch_budget(gpu, "auto")[0] == int(int(gpu["hbm_bytes"] * 0.5) * (1 - fit.MARGIN))
    assert compile_report.max_batch_budget(tpu, "auto")[0] == int(tpu["hbm_bytes"] * (1 - fit.MARGIN))
    for bad in ("lots", "0", "1.5"):
        monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad)
        with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
            compile_report.max_batch_budget(gpu, "auto")


def run(*flags):
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=1500, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def filled(value):
    """No field left empty: every leaf is a number, string or bool (and numbers are finite)."""
    if isinstance(value, dict):
        return all(filled(v) for v in value.values())
    if isinstance(value, list):
        return all(filled(v) for v in value)
    if isinstance(value, float):
        return np.isfinite(value)
    return value is not None


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    """(the smoke sampler's report for a v5e:2x2 slice, 2 samples per chip, its stdout)."""
    output = tmp_path_factory.mktemp("smoke_report") / "report.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--per_device_batch=2", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(output.read_text()), proc.stdout  # strict JSON


def test_smoke_report_for_a_v5e_slice(smoke_report):
    report, stdout = smoke_report
    assert filled(report), report
    assert report["config"] == "smoke"
    assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite" and report["global_batch"] == 8
    assert set(report["programs"]) == {"begin", "advance", "end"}
    loop = report["loop_ops"]
    # Pure data parallelism: nothing crosses devices inside the loop, and nothing goes to the host
    # (the progress bar is drawn between calls, not from inside the program).
    assert loop["in_loop"] and loop["collective"] == 0 and loop["collectives_by_kind"] == {}
    assert loop["host_transfer"] == 0 and loop["host_callback"] == 0
    memory = report["programs"]["advance"]["memory"]
    assert 0 < memory["argument_bytes"] and 0 < memory["temp_bytes"] < report["chip"]["hbm_bytes"]
    assert report["fits"] and report["hbm_headroom_bytes"] == report["chip"]["hbm_bytes"] - report["peak_program_bytes"]
    assert report["flops_per_sample_step"] > 0 and report["bytes_accessed_per_sample_step"] > 0
    # The per-sample-step counts come from the counting program (one step, no loop left), which
    # counts both augmentation warps where the loop program's own count has one.
    counting = report["counting_program"]
    assert counting["loops"] == 0
    assert report["flops_per_sample_step"] == counting["cost"]["flops"] / 2
    raw = report["loop_program_per_sample_step"]
    assert raw["flops"] == report["programs"]["advance"]["cost"]["flops"] / 2
    assert report["flops_per_sample_step"] > raw["flops"]
    assert report["bytes_accessed_per_sample_step"] > raw["bytes_accessed"]
    assert report["num_steps"] == report["steps_per_call"] * (report["num_steps"] // report["steps_per_call"])
    assert "v5e:2x2" in stdout and "not a run" in stdout


def test_the_warps_bytes_are_in_the_whole_steps_count(smoke_report, tmp_path):
    """One guided step without the augmentations' warps (--part=step --warps=none: pooled copies)
    counts fewer bytes than the loop program (one warp counted), which counts fewer than the
    counting program (both warps): each warp's bytes show in the count of the whole step."""
    report, _ = smoke_report
    output = tmp_path / "step.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--per_device_batch=2", "--part=step", "--warps=none",
               f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    step = json.loads(output.read_text())
    assert step["part"] == "step" and step["warps"] == "none" and step["loops"] == 0
    assert step["per_sample_step"]["bytes_accessed"] == step["cost"]["bytes_accessed"] / 2
    no_warps = step["per_sample_step"]["bytes_accessed"]
    one_warp = report["loop_program_per_sample_step"]["bytes_accessed"]
    both = report["bytes_accessed_per_sample_step"]
    assert 0 < no_warps < one_warp < both
    # The second warp adds about what the first does (the unrolled program's layout differs a little).
    assert 0.5 < (both - one_warp) / (one_warp - no_warps) < 1.5


def test_smoke_report_for_an_h200_gives_the_gpu_memory_fields(tmp_path):
    """The GPU path (JAX's CUDA plugin describes an H200, no GPU needed): memory per program and
    the headroom against the H200's 141 GB; XLA:GPU gives no FLOP or byte counts, so there is no
    counting program and no time bound."""
    output = tmp_path / "h200.json"
    proc = run("--topology=h200", "--config=smoke", "--per_device_batch=2", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["device_kind"] == "NVIDIA H200" and report["devices"] == 1 and report["global_batch"] == 2
    assert report["chip"]["hbm_bytes"] == 150754820096 and report["source"].startswith("XLA:GPU")
    assert set(report["programs"]) == {"begin", "advance", "end"}
    for program in report["programs"].values():
        assert program["memory"]["total_bytes"] > 0 and program["compile_s"] > 0
    peak = max(p["memory"]["total_bytes"] for p in report["programs"].values())
    assert report["peak_program_bytes"] == peak == report["programs"]["advance"]["memory"]["total_bytes"]
    assert report["fits"] and report["hbm_headroom_bytes"] == 150754820096 - peak
    assert report["flops_per_sample_step"] is None and report["bounds_for_edits"] is None
    assert "counting_program" not in report
    assert "no FLOP or byte counts" in proc.stdout


@pytest.mark.parametrize("flag, words", [("--topology=v9x:2x2", "--topology"), ("--per_device_batch=0", "at least 1"),
                                         ("--max_batch_remat=none,often", "often"),
                                         ("--max_batch_probes=4", "--max_batch_probes")])
def test_bad_flags_are_one_line_errors(flag, words):
    proc = run(flag, "--config=smoke")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and words in lines[-1]
    assert "Traceback" not in proc.stderr


def test_augmentations_part_reports_the_warps_alone(tmp_path):
    """--part=augmentations compiles the extending augmentations' forward and gradient by themselves,
    the two warps written out (so both are counted): four bilinear taps per warp, each a gather
    forward and a scatter-add backward, and no loop left."""
    output = tmp_path / "augment.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--part=augmentations", "--per_device_batch=2",
               f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert filled(report), report
    assert report["part"] == "augmentations" and report["aug_num"] == 4 and report["image_size"] == 64
    assert report["ops"]["gather"] >= 8 and report["ops"]["scatter"] >= 8 and report["ops"]["collective"] == 0
    assert report["loops"] == 0 and "unrolled" in report["note"]
    assert report["per_sample_step"]["bytes_accessed"] == report["cost"]["bytes_accessed"] / 2 > 0


def test_end_part_reports_what_the_scores_and_ranking_cost_per_sample(tmp_path):
    """--part=end compiles the sampler's end program alone: the result, its ranking distance and
    the quality scores (CLIP twice, LPIPS on the background), no UNet."""
    output = tmp_path / "end.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--part=end", "--per_device_batch=2", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["part"] == "end" and report["global_batch"] == 8
    assert report["end_flops_per_sample"] == report["cost"]["flops"] / 2 > 0
    # The edit's analytic count is that of the real networks: none for the smoke ones.
    assert report["edit_flops_per_sample_analytic"] is None and report["end_share_of_edit_flops"] is None
    assert report["memory"]["argument_bytes"] > 0 and "end program" in proc.stdout
