"""bench/gpu_proof.py (and its shell entry) on the CPU: the smoke dry run fills every field of the JSON
with sane values; the budget skips phases with notes; an overrunning phase is stopped and its partial
JSON kept; bad flags give one line and exit status 2. Speed is never asserted here."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from bench import gpu_proof

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fields that stay null in the CPU dry run: the analytic FLOP count is for the real models only; a CPU has no
# device memory limit to predict a batch from; the 64-edit target needs 64 samples.
NULL_IN_DRY_RUN = {
    "step_bf16.analytic_flops_per_sample_step", "step_bf16.analytic_flops_per_step", "step_bf16.mfu_analytic",
    "step_bf16.device_bytes_limit", "step_bf16.predicted_max_batch",
    "step_fp32.analytic_flops_per_sample_step", "step_fp32.analytic_flops_per_step", "step_fp32.mfu_analytic",
    "max_batch.predicted_max_batch", "targets.edits_64_warm_s.measured", "targets.edits_64_warm_s.met",
    # A CPU reports no memory limit and is not in the HBM table.
    "fit.device_bytes_limit", "fit.hbm_bytes", "fit.limit_share_of_hbm", "fit.auto_budget_bytes",
}
IDENTITY_FIELDS = {
    "step_bf16.identical_two_runs", "step_fp32.identical_two_runs", "sampler.identical", "sampler.images_identical",
    "sampler.distances_identical", "determinism.step_identical", "determinism.sampler_identical",
    "determinism.identical", "determinism.det_step_identical", "determinism.det_sampler_identical",
    "determinism.det_sampler_images_identical", "determinism.det_sampler_distances_identical",
}
TIMES = {
    "step_bf16": ("compile_s", "lower_s", "xla_compile_s", "step_s", "step_s_min", "prepare_s", "samples_per_s",
                  "flops_per_step", "flops_per_sample_step", "achieved_tflops", "peak_memory_bytes", "mfu"),
    "step_fp32": ("compile_s", "step_s", "step_s_min", "samples_per_s", "flops_per_step", "achieved_tflops", "mfu",
                  "mfu_vs_fp32_highest"),
    "peak": ("bf16_tflops", "fp32_tflops", "fp32_highest_tflops"),
    "reference": ("step_s", "step_s_min", "samples_per_s", "bdjax_step_s", "bdjax_samples_per_s", "speedup",
                  "speedup_min"),
    "sampler": ("cold_s", "warm_s", "achieved_tflops_est", "mfu_est"),
    "determinism": ("det_step_s", "det_step_s_min", "det_step_cost", "det_compile_s", "det_sampler_cold_s",
                    "det_sampler_warm_s"),
}


def positive(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    else:
        yield prefix, tree


def proof_command(output, *flags):
    command = [sys.executable, "-m", "bench.gpu_proof", "--config=smoke", f"--output={output}", *flags]
    cache = jax.config.jax_compilation_cache_dir  # conftest's cache: later runs skip compiling
    if cache:
        command.append(f"--compilation_cache_dir={cache}")
    return command


def cpu_env(**extra):
    return dict(os.environ, JAX_PLATFORMS="cpu", **extra)


def run_proof(tmp_path, *flags, timeout=1500, **env):
    output = tmp_path / "proof.json"
    proc = subprocess.run(proof_command(output, *flags), cwd=REPO, env=cpu_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(output) as f:
        return json.load(f), proc


def test_dry_run_fills_every_field(tmp_path):
    result, proc = run_proof(tmp_path, "--deterministic=always", "--budget_s=1200")
    assert all(phase["status"] == "done" for phase in result["phases"].values()), result["phases"]
    for section in ("step_bf16", "peak", "reference", "sampler", "determinism", "fit", "step_fp32", "max_batch",
                    "targets"):
        for path, value in leaves(result[section], section):
            if path not in NULL_IN_DRY_RUN:
                assert value is not None, path
    for path in NULL_IN_DRY_RUN:
        section, *keys = path.split(".")
        value = result[section]
        for key in keys:
            value = value[key]
        assert value is None, path
    for path in IDENTITY_FIELDS:
        section, key = path.split(".")
        assert isinstance(result[section][key], bool), path
    for section, keys in TIMES.items():
        for key in keys:
            assert positive(result[section][key]), (section, key, result[section][key])

    step, sampler, reference, det = result["step_bf16"], result["sampler"], result["reference"], result["determinism"]
    assert step["precision"] == "bf16" and step["batch_size"] == 2 and result["step_fp32"]["precision"] == "fp32"
    assert math.isclose(step["mfu"], step["achieved_tflops"] / result["peak"]["bf16_tflops"], rel_tol=1e-9)
    assert math.isclose(step["samples_per_s"], 2 / step["step_s"], rel_tol=1e-9)
    assert step["identical_two_runs"] is True  # XLA:CPU has no atomics
    assert math.isclose(reference["speedup"], reference["step_s"] / reference["bdjax_step_s"], rel_tol=1e-9)
    assert reference["precision"] == "fp32" and reference["batch_size"] == 2
    assert sampler["num_samples"] == 4 and sampler["batch_size"] == 2 and sampler["steps"] == 5
    assert sampler["identical"] is True and sampler["max_abs_image_diff"] == 0
    assert sampler["cold_s"] > 0 and sampler["warm_s"] > 0
    assert det["deterministic_run"] == "run" and "--xla_gpu_deterministic_ops=true" in det["xla_flags"]
    assert det["det_step_identical"] is True and det["det_sampler_identical"] is True
    assert math.isclose(det["det_step_cost"], det["det_step_s"] / step["step_s"], rel_tol=1e-9)
    assert result["max_batch"]["max_batch"] == 4 and result["max_batch"]["max_batch_tried"][0]["ran"] is True
    fitted = result["fit"]  # the compile report's loop program at the smoke config, compiled on the device
    assert fitted["per_device_batch"] == 2 and fitted["precision"] == "bf16" and fitted["compile_s"] > 0
    assert fitted["memory"]["total_bytes"] > fitted["memory"]["argument_bytes"] > 0
    assert result["machine"]["platform"] == "cpu" and result["machine"]["jax_version"]
    assert [p["role"] for p in result["processes"]] == ["main", "reference", "deterministic", "extras"]
    assert all(p["returncode"] == 0 for p in result["processes"])
    assert positive(result["total_s"]) and result["total_s"] < 1200
    summary = "\n".join(result["summary"])
    for part in ("(a) guided step bf16", "(b) 4 ranked edits", "(c) authors' PyTorch step", "(d) rerun byte-identical",
                 "measured peak"):
        assert part in summary and part in proc.stdout, part
    assert "(smoke config: meaningless)" in summary and "real config" in result["targets_note"]
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_budget_skips_phases_with_notes(tmp_path):
    result, proc = run_proof(tmp_path, "--budget_s=1", "--phases=step_bf16,peak,determinism,step_fp32",
                             timeout=300)
    phases = result["phases"]
    for name in ("step_bf16", "peak", "step_fp32"):
        assert phases[name]["status"] == "skipped" and "budget" in phases[name]["note"], (name, phases[name])
    for name in ("reference", "sampler", "max_batch"):
        assert phases[name] == {"status": "skipped", "note": "not in --phases"}
    assert result["determinism"]["deterministic_run"].startswith("not run")
    assert "step_bf16" not in result and "sampler" not in result
    assert "phase step_bf16: skipped: budget" in proc.stdout


def test_overrunning_phase_is_stopped_and_json_kept(tmp_path):
    """A phase still running at the budget's end (+10 s) is stopped with its process; the JSON says so."""
    began = time.monotonic()
    result, proc = run_proof(tmp_path, "--budget_s=20", "--phases=step_bf16,peak,step_fp32", timeout=300,
                             BDJAX_GPU_PROOF_STALL_PHASE="step_bf16")
    assert time.monotonic() - began < 120
    assert result["phases"]["step_bf16"]["status"] == "killed"
    assert "end of the budget" in result["phases"]["step_bf16"]["note"]
    assert result["phases"]["peak"]["status"] == "skipped"
    assert result["phases"]["step_fp32"]["status"] == "skipped"
    main = result["processes"][0]
    assert main["role"] == "main" and main["stopped"] and main["returncode"] != 0
    with pytest.raises(ProcessLookupError):
        os.kill(main["pid"], 0)
    assert "phase step_bf16: killed" in proc.stdout


def test_sigterm_stops_the_child_and_writes_the_json(tmp_path):
    output = tmp_path / "proof.json"
    proc = subprocess.Popen(proof_command(output, "--budget_s=600", "--phases=step_bf16"), cwd=REPO,
                            env=cpu_env(BDJAX_GPU_PROOF_STALL_PHASE="step_bf16"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with open(output) as f:
                    if json.load(f)["phases"]["step_bf16"]["status"] == "running":
                        break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the phase never started")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-3000:]
    with open(output) as f:
        result = json.load(f)
    assert result["phases"]["step_bf16"]["status"] == "killed"
    assert "stopped" in result["phases"]["step_bf16"]["note"]
    pid = result["phases"]["step_bf16"].get("pid")
    assert pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert result["summary"] and "wrote" in stdout


@pytest.mark.parametrize("flag", ["--budget_s=abc", "--bogus", "--config=huge", "--num_samples=0",
                                  "--phases=sampler", "--phases=warp", "--budget_s=-5", "stray"])
def test_bad_flags_one_line_status_2(tmp_path, flag):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_proof", f"--output={tmp_path / 'x.json'}", flag],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_shell_entry_without_wheels(tmp_path):
    """bench/gpu_proof.sh with an empty wheel directory: runs the proof from the checkout, JSON and log in OUT."""
    wheels, out = tmp_path / "wheels", tmp_path / "out"
    wheels.mkdir()
    env = cpu_env(PYTHON=sys.executable, GPU_PROOF_WHEELS=str(wheels), GPU_PROOF_SITE=str(tmp_path / "site"))
    proc = subprocess.run(["bash", "bench/gpu_proof.sh", str(out), "--config=smoke", "--budget_s=1",
                           "--phases=step_bf16"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "gpu_proof.json") as f:
        result = json.load(f)
    assert result["config"] == "smoke" and result["summary"]
    log = (out / "gpu_proof.log").read_text()
    assert "no wheels in" in log and "wrote" in log and "bdjax GPU proof" in log
    usage = subprocess.run(["bash", "bench/gpu_proof.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage:")


def test_predicted_max_batch():
    gib = 2 ** 30
    memory = {"argument_size_in_bytes": 2 * gib, "temp_size_in_bytes": 15 * gib, "output_size_in_bytes": gib}
    # 1 GiB per sample beyond 2 GiB of arguments, in 95 % of 127 GiB.
    assert gpu_proof.predicted_max_batch(memory, 16, 127 * gib, 256) == 64
    assert gpu_proof.predicted_max_batch(memory, 16, 127 * gib, 32) == 32
    assert gpu_proof.predicted_max_batch(memory, 16, 20 * gib, 256) == 16
    assert gpu_proof.predicted_max_batch(memory, 16, None, 256) is None
    assert gpu_proof.predicted_max_batch({}, 16, 127 * gib, 256) is None


def test_derive_mfu_and_targets():
    data = {"config": "real", "peak": {"bf16_tflops": 800.0, "fp32_tflops": 400.0, "fp32_highest_tflops": 50.0},
            "step_bf16": {"achieved_tflops": 480.0, "step_s": 0.25, "analytic_flops_per_step": 1.2e14,
                          "flops_per_sample_step": 7.5e12},
            "sampler": {"num_samples": 64, "steps": 75, "warm_s": 70.0},
            "reference": {"speedup": 12.0},
            "determinism": {"det_step_s": 0.3}}
    gpu_proof.derive(data)
    assert math.isclose(data["step_bf16"]["mfu"], 0.6)
    assert math.isclose(data["step_bf16"]["mfu_analytic"], 1.2e14 / 0.25 / 1e12 / 800)
    assert math.isclose(data["sampler"]["achieved_tflops_est"], 7.5e12 * 64 * 75 / 70 / 1e12)
    assert math.isclose(data["determinism"]["det_step_cost"], 1.2)
    assert data["targets"]["mfu_bf16"]["met"] is True
    assert data["targets"]["edits_64_warm_s"]["met"] is True
    assert data["targets"]["speedup_vs_reference"]["met"] is False
    assert "targets_note" not in data


def test_json_with_the_older_config_names_reads_the_same():
    """Targets are judged only for the real config, which JSON written by older versions names "full"."""
    for name, real in (("real", True), ("full", True), ("smoke", False), ("tiny", False)):
        data = {"config": name, "budget_s": 450.0, "reference": {"speedup": 30.0}}
        gpu_proof.derive(data)
        assert ("targets_note" in data) is not real, name
        summary = "\n".join(gpu_proof.summary_lines(data))
        assert "targets: speedup_vs_reference met" in summary
        assert ("(smoke config: meaningless)" in summary) is not real, name


def test_determinism_retries_with_the_narrower_flag_when_xla_rejects_the_first(tmp_path, monkeypatch):
    rec = gpu_proof.Record(str(tmp_path / "proof.json"))
    rec.data = {"config": "real", "started_unix": time.time(), "phases": {"determinism": {"status": "pending"}},
                "step_bf16": {"identical_two_runs": False, "compile_s": 1.0, "step_s": 0.1, "setup_s": 1.0},
                "sampler": {"identical": False}}
    rec.save()
    calls = []

    def fake_child(rec, budget, role, env_extra=None, grace_s=10.0):
        calls.append((role, env_extra["XLA_FLAGS"]))
        rec.load()
        if len(calls) == 1:
            rec.phase("determinism", "killed", note="its process ended with status -6")
            rec.save()
            return -6, "F0000 parse_flags_from_env.cc] Unknown flag in XLA_FLAGS: --xla_gpu_deterministic_ops=true\n"
        rec.phase("determinism", "done", seconds=1.0)
        rec.save()
        return 0, ""

    monkeypatch.setattr(gpu_proof, "run_child", fake_child)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    settings = dict(gpu_proof.CONFIGS["real"], deterministic="auto")
    gpu_proof.determinism_child(rec, gpu_proof.Budget(time.time() + 600), settings)
    assert calls == [("deterministic", gpu_proof.DETERMINISTIC_FLAG),
                     ("deterministic", gpu_proof.DETERMINISTIC_FALLBACK_FLAG)]
    rec.load()
    assert rec.data["determinism"]["rejected_flag"] == gpu_proof.DETERMINISTIC_FLAG
    assert rec.data["determinism"]["deterministic_run"] == "run"
    assert rec.data["determinism"]["sampler_identical"] is False
    assert rec.data["phases"]["determinism"]["status"] == "done"


def test_determinism_not_needed_when_identical(tmp_path, monkeypatch):
    rec = gpu_proof.Record(str(tmp_path / "proof.json"))
    rec.data = {"config": "real", "phases": {}, "step_bf16": {"identical_two_runs": True},
                "sampler": {"identical": True}}
    monkeypatch.setattr(gpu_proof, "run_child", lambda *a, **k: pytest.fail("no process is needed"))
    gpu_proof.determinism_child(rec, gpu_proof.Budget(time.time() + 600), dict(gpu_proof.CONFIGS["real"],
                                                                              deterministic="auto"))
    assert rec.data["determinism"]["deterministic_run"].startswith("not needed")
    assert rec.data["phases"]["determinism"]["status"] == "done"


def test_summary_of_a_partial_gpu_run():
    """What a run stopped during the warm sampler run, with the reference out of memory, prints."""
    data = {"config": "real", "budget_s": 450.0, "total_s": 455.0,
            "machine": {"device_kind": "NVIDIA H200", "platform": "gpu", "jax_version": "0.11.2",
                        "torch_version": "2.11.0"},
            "peak": {"matmul_n": 8192, "bf16_tflops": 790.0, "fp32_tflops": 400.0, "fp32_highest_tflops": 55.0},
            "step_bf16": {"batch_size": 16, "step_s": 0.3, "samples_per_s": 53.3, "achieved_tflops": 330.0,
                          "compile_s": 80.0, "peak_memory_bytes": 30 * 2 ** 30, "identical_two_runs": False,
                          "analytic_flops_per_step": 1.2e14, "flops_per_sample_step": 5e12,
                          "predicted_max_batch": 64},
            "sampler": {"num_samples": 64, "steps": 75, "aug_num": 8, "batch_size": 64, "cold_s": 190.0,
                        "warm_s": None},
            "reference": {"batch_size": 16, "note": "the reference step ran out of GPU memory at batch 16"},
            "determinism": {"step_identical": False, "sampler_identical": None,
                            "deterministic_run": "not run (budget: 5 s left, ...)"},
            "phases": {"sampler": {"status": "killed", "note": "at the end of the budget (see the log)"},
                       "step_fp32": {"status": "skipped", "note": "budget: 0 s left"}}}
    gpu_proof.derive(data)
    text = "\n".join(gpu_proof.summary_lines(data))
    assert "MFU 41.8 %" in text and "n/a warm" in text and "190.0 s cold" in text
    assert "ran out of GPU memory" in text and "step NO" in text
    assert "phase sampler: killed" in text and "phase step_fp32: skipped" in text
    assert data["targets"]["mfu_bf16"]["met"] is False and data["targets"]["edits_64_warm_s"]["met"] is None
