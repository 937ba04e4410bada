"""launch/runtime.py, the model and runtime flags every program has and what a run says before it
starts: the line naming samples, steps, devices and precision (with the analytic FLOP count for
the real networks), the "compiling" line naming the compilation cache, and --help listing them.

The programs run in-process on a stand-in sampler (tests/launch_helpers.py), --help in a
subprocess."""

import json
import os
import re
import types

import jax
import numpy as np
import pytest

from launch_helpers import SIZE, SlowCompile, fake_editor, recording_tqdm, run_module, run_program


@pytest.mark.parametrize("module", ["launch.edit", "launch.batch_edit", "launch.extrapolate"])
def test_help_lists_the_model_and_runtime_flags(module):
    """--help shows what a user needs to choose networks and how they run, not only the edit flags."""
    proc = run_module(module, "--help")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", proc.stdout, flags=re.M))
    needed = {"config", "precision", "model_output_size", "checkpoint_dir", "download", "remat", "compilation_cache"}
    assert needed <= listed, needed - listed
    assert {"output_dir", "batch_size"} <= listed


def test_batch_size_auto_on_a_cpu_is_the_default_batch_said_before_the_run_and_reported(
        program_flags, monkeypatch, capsys, image_file, tmp_path):
    assert run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                            "--num_samples=5", "--batch_size=auto",
                                                            f"--output_dir={tmp_path / 'o'}"]) == 0
    err = capsys.readouterr().err
    assert "fp32, batch 4 per run (auto: the default 4 on a CPU), smoke networks\n" in err, err
    with open(tmp_path / "o" / "report.json", encoding="utf-8") as f:
        report = json.load(f)
    assert report["options"]["batch_size"] == "auto" and report["batch_rows"] == 4
    assert report["batch_size_auto"]["rows"] == 4 and report["batch_size_auto"]["per_device"] is None


def test_launch_programs_say_what_runs_where_and_where_compiles_are_kept(program_flags, monkeypatch, capsys,
                                                                         image_file, tmp_path):
    """One line before anything compiles (samples, steps, devices, precision), one "compiling"
    line naming the cache (or that there is none), and a program's own bar (batch_edit's) whose
    clock leaves the compile out."""
    import time

    import tqdm.auto as tqdm_auto

    from launch import runtime

    run = SlowCompile(compile_s=0.01)
    assert run_program(program_flags, monkeypatch, "edit", ["--prompt=a cat", f"--init_image={image_file}",
                                                            "--num_samples=3", f"--output_dir={tmp_path / 'o'}"],
                       run) == 0
    err = capsys.readouterr().err
    where = f"{jax.device_count()} x cpu, fp32, batch 2 per run, smoke networks"  # the smoke preset's batch
    assert err.count(f"running 3 samples (4 guided steps each) on {where}\n") == 1
    assert err.count("compiling (not cached: --nocompilation_cache)\n") == 1
    assert re.search(r"compiled in [\d.]+ s \(not cached: --nocompilation_cache\)$", err, flags=re.M), err
    assert err.index("running 3 samples") < err.index("compiling (") < err.index("compiled in")

    program_flags.unparse_flags()
    program_flags(["batch_edit", "--config=smoke", f"--compilation_cache_dir={tmp_path / 'xla'}"])
    editor = fake_editor(SlowCompile(compile_s=0.6))
    bars = recording_tqdm(monkeypatch, tqdm_auto)
    bar = tqdm_auto.tqdm(total=4, unit="sample")  # as launch.batch_edit makes its bar
    monkeypatch.setattr(runtime, "CACHE_OFF", None)  # as setup leaves it with a usable --compilation_cache_dir
    runtime.announce_compiles(editor, bar)
    began = time.perf_counter()
    init = np.zeros((4, SIZE, SIZE, 3), np.float32)
    for start in (0, 2):  # as bdjax.batch.run: one call per batch, the bar moved after each
        editor.sample(editor.options(batch_size=2), True, init[start:start + 2], init[start:start + 2, ..., :1],
                      np.zeros((2, 8)), np.arange(start, start + 2), np.zeros(2))
        bar.update(2)
    took = time.perf_counter() - began
    bar.close()
    err = capsys.readouterr().err
    assert len(re.findall(rf"compiled in [\d.]+ s \(cached in {re.escape(str(tmp_path / 'xla'))}\)$", err,
                          flags=re.M)) == 1, err
    assert "compiling" not in err  # nothing says it compiles before it is known
    assert took - bars[0].final["elapsed"] >= 0.55  # the bar's clock skipped the 0.6 s compile, whatever the load


def test_the_real_networks_line_gives_the_analytic_count_and_on_a_cpu_its_time(program_flags):
    """For the real 256x256 networks the line before compiling adds the analytic FLOP count
    (bdjax/cost.py) and, on a CPU, the time it takes at the throughput measured there."""
    from bdjax import cost
    from bdjax import fit
    from bdjax.options import EditOptions
    from launch import runtime

    program_flags.unparse_flags()
    program_flags(["edit", "--config=real"])
    editor = types.SimpleNamespace(sampler=lambda options, guided: types.SimpleNamespace(num_steps=75),
                                   batch_choice=lambda options, guided, n: fit.fixed(options.batch_size, n))
    line = runtime.describe_run(editor, [(EditOptions(), True, 32)])
    per_sample = 75 * cost.guided_step_flops(8)
    assert round(per_sample / 1e12) == 567
    hours = 32 * per_sample / (runtime.CPU_TFLOPS_MEASURED * 1e12) / 3600
    assert line == (f"running 32 samples (75 guided steps each) on {jax.device_count()} x cpu, fp32, batch 4 per "
                    f"run: about "
                    f"{32 * per_sample / 1e15:.1f} PFLOP by the analytic count (567 TFLOP per sample), roughly "
                    f"{hours:.0f} h at the 0.05 TFLOP/s measured on a 2-core CPU")


def test_every_process_decides_the_batches_before_process_0_says_them(monkeypatch, capsys):
    """batch_size="auto" makes the processes agree on a decision (a collective in bdjax/fit.py),
    so announce_run decides each run's batch on every process, not only on process 0, which
    alone prints the line."""
    from bdjax import fit
    from bdjax.options import EditOptions
    from launch import runtime

    asked = []
    editor = types.SimpleNamespace(batch_choice=lambda options, guided, n: asked.append((options, guided, n))
                                   or fit.fixed(4, n))
    runs = [(EditOptions(batch_size="auto"), True, 32), (EditOptions(batch_size="auto", aug_num=4), False, 8)]
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    runtime.announce_run(editor, runs)
    assert asked == runs and capsys.readouterr().err == ""


# A machine where `pip install -e ".[cuda]"` was run but no GPU is usable, simulated: JAX's CUDA
# plugin fails as the real one does without a driver (its libraries print C++ log lines as JAX
# imports them; its initialize() raises unless the platforms exclude CUDA, and JAX logs that
# with a traceback).
FAKE_PLUGIN = {
    "jax_cuda12_plugin-0.10.2.dist-info/METADATA": "Metadata-Version: 2.1\nName: jax-cuda12-plugin\nVersion: 0.10.2\n",
    "jax_cuda12_plugin/__init__.py": "",
    "jax_cuda12_plugin/_versions.py": (
        "import os\n"
        "os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n'\n"
        "            b'I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\\n')\n"
        "raise ImportError('libcudart.so.12: cannot open shared object file')\n"),
    "jax_plugins/xla_cuda12/__init__.py": (
        "def initialize():\n"
        "    import jax\n"
        "    if 'cuda' in (jax.config.jax_platforms or 'cuda'):\n"
        "        raise RuntimeError('Unable to load CUDA. Is it installed?')\n"),
}


@pytest.fixture(scope="module")
def no_gpu_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("cuda_plugin_without_gpu")
    for name, text in FAKE_PLUGIN.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}


def test_a_cuda_plugin_without_a_gpu_is_one_line_and_no_traceback(no_gpu_env, image_file, tmp_path):
    """The simulated plugin fails as JAX starts (a traceback and C++ lines); the programs choose the
    CPU before JAX is imported and say why in one line: an error for the real networks, a note
    before a smoke run, which then runs."""
    import subprocess
    import sys

    from launch_helpers import ROOT

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                              env=no_gpu_env)

    bare = run("-c", "import jax; jax.devices()")
    assert "Traceback" in bare.stderr and "cudart_stub.cc" in bare.stderr  # what users saw before
    real = run("-m", "launch.edit", "--prompt=a cat", f"--init_image={image_file}", f"--output_dir={tmp_path / 'a'}")
    assert real.returncode == 2, real.stderr[-3000:]
    [line] = real.stderr.strip().splitlines()
    assert re.fullmatch(r"error: jax\[cuda12\] is installed but no GPU is usable here \(.+\): the real networks would "
                        r"take hours per sample on the CPU; try --config=smoke \(tiny random networks, no weights\), run where "
                        r"a GPU is usable, or pass --allow_cpu to run anyway", line), line
    smoke_run = run("-m", "launch.edit", "--config=smoke", "--prompt=a cat", f"--init_image={image_file}",
                    "--num_samples=1", "--skip_timesteps=22", f"--output_dir={tmp_path / 'b'}",
                    f"--compilation_cache_dir={jax.config.jax_compilation_cache_dir}")
    assert smoke_run.returncode == 0, smoke_run.stderr[-3000:]
    assert "Traceback" not in smoke_run.stderr and "cudart_stub" not in smoke_run.stderr, smoke_run.stderr[-3000:]
    assert re.search(r"^note: jax\[cuda12\] is installed but no GPU is usable here \(.+\); running on the CPU$",
                     smoke_run.stderr, flags=re.M), smoke_run.stderr[-3000:]


def test_the_driver_is_asked_as_the_cuda_plugin_asks_it(monkeypatch):
    """cuInit's error is named; a driver with no device, or none at all, is said plainly."""
    import ctypes

    from launch import platform

    class Driver:
        def __init__(self, status, count):
            self.status, self.count = status, count

        def cuInit(self, flags):
            return self.status

        def cuGetErrorName(self, status, name):
            name._obj.value = b"CUDA_ERROR_NO_DEVICE" if status == 100 else None
            return 0

        def cuDeviceGetCount(self, count):
            count._obj.value = self.count
            return 0

    for driver, said in ((Driver(100, 0), "cuInit error 100: CUDA_ERROR_NO_DEVICE"), (Driver(999, 0), "cuInit error 999"),
                         (Driver(0, 0), "the driver lists no GPU"), (Driver(0, 2), None)):
        monkeypatch.setattr(ctypes, "CDLL", lambda name, driver=driver: driver)
        assert platform.cuda_problem() == said
    monkeypatch.setattr(ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(f"{name}: cannot open")))
    assert platform.cuda_problem() == "no NVIDIA driver: libcuda.so.1 not found"
    monkeypatch.setattr(platform, "cuda_plugin", lambda: None)
    assert platform.unusable_cuda() is None  # no plugin: nothing to say, whatever the driver


def test_model_output_size_512_with_the_smoke_config_is_refused(program_flags, monkeypatch, image_file, tmp_path):
    """--config=smoke runs its own tiny networks at one size: a 512 asked for with it is refused,
    not ignored while the report says 512."""
    from launch import cli

    program_flags.unparse_flags()
    program_flags(["edit", "--config=smoke", "--model_output_size=512", "--prompt=a cat", f"--init_image={image_file}",
                   f"--output_dir={tmp_path / 'out'}"])
    from launch import edit

    with pytest.raises(cli.FlagError, match=r"^--model_output_size=512 applies to the real networks: --config=smoke "
                                            r"always runs its tiny networks at 64 px; drop one of the two flags$"):
        edit.main(["edit"])
    assert not (tmp_path / "out").exists()

