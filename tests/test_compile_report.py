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


def test_largest_finds_the_boundary_by_doubling_and_bisection():
    for boundary in (0, 1, 5, 16, 37, 300):
        calls = []

        def ok(n):
            calls.append(n)
            return n <= boundary
        assert compile_report.largest(ok, 256) == min(boundary, 256)
        assert len(calls) <= 2 * 9 + 1  # logarithmic, not a scan


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


def test_smoke_report_for_a_v5e_slice(tmp_path):
    output = tmp_path / "report.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--per_device_batch=2", f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())  # strict JSON
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
    assert report["num_steps"] == report["steps_per_call"] * (report["num_steps"] // report["steps_per_call"])
    assert "v5e:2x2" in proc.stdout and "not a run" in proc.stdout


@pytest.mark.parametrize("flag, words", [("--topology=v9x:2x2", "--topology"), ("--per_device_batch=0", "at least 1"),
                                         ("--max_batch_remat=none,often", "often")])
def test_bad_flags_are_one_line_errors(flag, words):
    proc = run(flag, "--config=smoke")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and words in lines[-1]
    assert "Traceback" not in proc.stderr


def test_augmentations_part_reports_the_warps_alone(tmp_path):
    """--part=augmentations compiles the extending augmentations' forward and gradient by themselves:
    four bilinear taps per warp, each a gather forward and a scatter-add backward."""
    output = tmp_path / "augment.json"
    proc = run("--topology=v5e:2x2", "--config=smoke", "--part=augmentations", "--per_device_batch=2",
               f"--output={output}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert filled(report), report
    assert report["part"] == "augmentations" and report["aug_num"] == 4 and report["image_size"] == 64
    assert report["ops"]["gather"] == 8 and report["ops"]["scatter"] == 8 and report["ops"]["collective"] == 0
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
