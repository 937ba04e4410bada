"""launch/runtime.py, the model and runtime flags every program has and what a run says before it
starts: the line naming samples, steps, devices and precision (with the analytic FLOP count for
the real networks), the "compiling" line naming the compilation cache, and --help listing them.

The programs run in-process on a stand-in sampler (tests/launch_helpers.py), --help in a
subprocess."""

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
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # absl's --help exits 1
    listed = set(re.findall(r"^\s+--(?:\[no\])?(\w+)", proc.stdout, flags=re.M))
    needed = {"config", "precision", "model_output_size", "checkpoint_dir", "download", "remat", "compilation_cache"}
    assert needed <= listed, needed - listed
    assert {"output_dir", "batch_size"} <= listed


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
    where = f"{jax.device_count()} x cpu, fp32, smoke networks"
    assert err.count(f"running 3 samples (4 guided steps each) on {where}\n") == 1
    assert err.count("compiling (not cached: --nocompilation_cache)\n") == 1
    assert err.index("running 3 samples") < err.index("compiling (")

    program_flags.unparse_flags()
    program_flags(["batch_edit", "--config=smoke", f"--compilation_cache_dir={tmp_path / 'xla'}"])
    editor = fake_editor(SlowCompile(compile_s=0.6))
    bars = recording_tqdm(monkeypatch, tqdm_auto)
    bar = tqdm_auto.tqdm(total=4, unit="sample")  # as launch.batch_edit makes its bar
    runtime.announce_compiles(editor, bar)
    began = time.perf_counter()
    init = np.zeros((4, SIZE, SIZE, 3), np.float32)
    for start in (0, 2):  # as bdjax.batch.run: one call per batch, the bar moved after each
        editor.sample(editor.options(batch_size=2), True, init[start:start + 2], init[start:start + 2, ..., :1],
                      np.zeros((2, 8)), np.arange(start, start + 2), np.zeros(2))
        bar.update(2)
    took = time.perf_counter() - began
    bar.close()
    assert capsys.readouterr().err.count(f"compiling (first run only, cached in {tmp_path / 'xla'})\n") == 1
    assert took >= 0.6 > bars[0].final["elapsed"]


def test_the_real_networks_line_gives_the_analytic_count_and_on_a_cpu_its_time(program_flags):
    """For the real 256x256 networks the line before compiling adds the analytic FLOP count
    (bdjax/cost.py) and, on a CPU, the time it takes at the throughput measured there."""
    from bdjax import cost
    from bdjax.options import EditOptions
    from launch import runtime

    program_flags.unparse_flags()
    program_flags(["edit", "--config=real"])
    editor = types.SimpleNamespace(sampler=lambda options, guided: types.SimpleNamespace(num_steps=75))
    line = runtime.describe_run(editor, [(EditOptions(), True, 32)])
    per_sample = 75 * cost.guided_step_flops(8)
    assert round(per_sample / 1e12) == 565
    hours = 32 * per_sample / (runtime.CPU_TFLOPS_MEASURED * 1e12) / 3600
    assert line == (f"running 32 samples (75 guided steps each) on {jax.device_count()} x cpu, fp32: about "
                    f"{32 * per_sample / 1e15:.1f} PFLOP by the analytic count (565 TFLOP per sample), roughly "
                    f"{hours:.0f} h at the 0.05 TFLOP/s measured on a 2-core CPU")
