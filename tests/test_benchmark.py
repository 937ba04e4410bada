"""bench/benchmark.py end to end on the smoke networks: bdjax's step and the PyTorch reference step
run, and the JSON holds every field with a sane value; flags that cannot run stop before any network.
Speed is never asserted here."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from bdjax import smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, AUG_NUM = 2, 2
# Fields that stay null on the smoke networks: the analytic FLOP count is for the real networks only,
# and the batch search is not requested.
NULL_AT_SMOKE = {"analytic_flops_per_sample_step", "analytic_flops_per_step", "mfu_analytic", "max_batch"}
REFERENCE_FIELDS = {"reference_device", "reference_precision", "reference_step_s", "reference_step_s_min",
                    "reference_step_s_all", "reference_samples_per_s", "speedup", "speedup_min"}


def run_benchmark(tmp_path, *flags):
    output = tmp_path / "bench.json"
    cache = jax.config.jax_compilation_cache_dir  # conftest's cache, so the second run skips compiling
    command = [sys.executable, "-m", "bench.benchmark", "--config=smoke", f"--batch_size={BATCH}",
               f"--aug_num={AUG_NUM}", "--iters=2", "--warmup=1", f"--output={output}", *flags]
    if cache:
        command.append(f"--compilation_cache_dir={cache}")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s" in proc.stdout  # the human summary
    with open(output) as f:
        return json.load(f)


def positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_common(result):
    machine = result["machine"]
    for key in ("platform", "device_kind", "jax_version", "torch_version", "os", "python"):
        assert isinstance(machine[key], str) and machine[key], key
    assert positive(machine["cpu_count"]) and positive(machine["device_count"])
    assert result["config"] == "smoke" and result["networks"] == "smoke"
    assert result["precision"] == "fp32" and result["remat"] == "none"
    assert result["batch_size"] == BATCH and result["aug_num"] == AUG_NUM
    smoke_configs = {"unet": smoke.unet_config(), "clip": smoke.CLIP_CONFIG}
    assert result["model_configs"] == json.loads(json.dumps(smoke_configs))  # tuples become lists in JSON
    for key in ("compile_s", "lower_s", "xla_compile_s", "step_s", "step_s_min", "samples_per_s", "flops_per_step",
                "flops_per_sample_step", "achieved_tflops", "peak_memory_bytes"):
        assert positive(result[key]), (key, result[key])
    assert len(result["step_s_all"]) == 2 and all(positive(t) for t in result["step_s_all"])
    assert result["step_s_min"] == min(result["step_s_all"])
    assert math.isclose(result["samples_per_s"], BATCH / result["step_s"], rel_tol=1e-9)
    assert math.isclose(result["flops_per_sample_step"] * BATCH, result["flops_per_step"], rel_tol=1e-9)
    # A guided step is at least a UNet forward and backward and aug_num CLIP passes.
    assert result["flops_per_step"] > 1e8
    assert isinstance(result["peak_memory_kind"], str) and result["peak_memory_kind"]
    assert result["max_batch_note"]
    assert result["param_counts"]["unet"] > 0 and result["param_counts"]["clip"] > 0


def test_benchmark_with_reference_and_peak(tmp_path):
    result = run_benchmark(tmp_path, "--peak_tflops=1")
    check_common(result)
    for key, value in result.items():
        if key not in NULL_AT_SMOKE:
            assert value is not None, key
    assert all(result[key] is None for key in NULL_AT_SMOKE)
    assert math.isclose(result["mfu"], result["flops_per_step"] / result["step_s"] / 1e12, rel_tol=1e-9)
    assert result["timing"] == "interleaved"
    for key in ("reference_step_s", "reference_step_s_min", "reference_samples_per_s", "speedup", "speedup_min"):
        assert positive(result[key]), (key, result[key])
    assert result["reference_precision"] == "fp32" and result["reference_note"]
    assert math.isclose(result["speedup"], result["reference_step_s"] / result["step_s"], rel_tol=1e-9)
    assert math.isclose(result["reference_samples_per_s"], BATCH / result["reference_step_s"], rel_tol=1e-9)


def test_benchmark_without_reference_or_peak(tmp_path):
    result = run_benchmark(tmp_path, "--noreference")
    check_common(result)
    assert result["mfu"] is None and result["peak_tflops"] is None and result["timing"] == "sequential"
    assert all(result[key] is None for key in REFERENCE_FIELDS)


def test_analytic_flops_of_the_real_networks():
    """The analytic count: about 7.5 TFLOP per sample-step at the real sizes with 8 augmentations."""
    code = ("from bench.benchmark import analytic_flops_per_sample_step as f; "
            "print(f('real', 8), f('reduced', 8))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    real, reduced = proc.stdout.split()
    assert math.isclose(float(real), 7.5e12, rel_tol=0.01) and reduced == "None"


@pytest.mark.parametrize("flags,message", [
    (["--config=smoke", "--reduced"], "--reduced applies to --config=real"),
    (["--model_output_size=512"], "--model_output_size=512"),
    (["--config=real"], "--config=smoke"),  # the real networks on a CPU, without --allow_cpu
])
def test_flags_that_cannot_run_stop_before_any_network(flags, message, tmp_path):
    output = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "bench.benchmark", f"--output={output}", *flags], cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not output.exists()


def test_scores_cost_times_a_batch_with_and_without_the_scores(tmp_path):
    """bench.scores_cost on the smoke networks: XLA's FLOPs of the scores, and the end program
    timed with the scores against the ranking alone, after a whole batch."""
    output = tmp_path / "scores.json"
    proc = subprocess.run([sys.executable, "-m", "bench.scores_cost", "--config=smoke", "--batch_size=1", "--iters=1",
                           f"--output={output}"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["scores_flops_per_sample"] > 0 and report["machine"]["platform"] == "cpu"
    timed = report["time"]
    assert timed["batch_s"] > 0 and timed["num_steps"] == 10
    assert timed["scores_added_s"] == pytest.approx(timed["end_with_scores_s"] - timed["end_ranking_only_s"])
    refused = subprocess.run([sys.executable, "-m", "bench.scores_cost", "--config=real"], cwd=REPO,
                             capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert refused.returncode == 2 and "use --config=smoke, or --notime" in refused.stderr.strip().splitlines()[-1]
