"""launch/cli.py, the plumbing every program shares: a user's mistake (bad flags, unreadable
inputs, a full disk, running out of memory) ends as one line and exit status 2, while a crash
keeps its traceback. Bad flags are tried on every program, in a subprocess, before any network."""

import os
import subprocess
import sys

import jax
import pytest

from bdjax import outputs
from launch_helpers import ROOT


@pytest.mark.parametrize("error, shown", [
    (MemoryError("Unable to allocate 4.47 TiB for an array"), "Unable to allocate 4.47 TiB"),  # numpy, host
    (jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 2458624055416648 bytes.\nmore"),
     "RESOURCE_EXHAUSTED: Out of memory allocating"),  # XLA, device
])
def test_out_of_memory_is_one_line_naming_the_fix(capsys, error, shown):
    from launch import cli

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as stop:
        cli.program(main)(["prog"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: out of memory ({shown}") and "--batch_size" in err[0]


def test_out_of_memory_while_reading_the_inputs_blames_the_inputs(capsys, monkeypatch, tmp_path):
    """Host memory that runs out while an input is decoded (inside bdjax's input modules) is
    advice about the input, not about --batch_size."""
    from PIL import Image

    from bdjax import image_io
    from launch import cli

    path = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate 1.49 TiB for an array")

    monkeypatch.setattr(Image, "open", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        cli.program(lambda argv: image_io.load_image(str(path), 64))(["prog"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2
    assert line == ("error: out of memory (Unable to allocate 1.49 TiB for an array); reading the inputs took it: "
                    "use a smaller image or mask (or split a manifest)")


PROGRAMS = ["launch.edit", "launch.batch_edit", "launch.extrapolate", "launch.app", "checkpoints_convert.fetch",
            "checkpoints_convert.unet", "checkpoints_convert.clip", "checkpoints_convert.lpips", "bench.benchmark",
            "bench.compile_report", "bench.gpu_proof"]


@pytest.mark.parametrize("module", PROGRAMS)
def test_help_exits_0_in_every_program(module):
    """--help (and -h) print the usage and exit 0, where absl exits 1."""
    for asked in ("--help", "-h"):
        proc = subprocess.run([sys.executable, "-m", module, asked], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (asked, proc.stderr[-2000:])
        assert "Try --helpfull to get a list of all flags." in proc.stdout, proc.stdout[-500:]


def test_other_runtime_errors_keep_their_traceback():
    from launch import cli

    def main(argv):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        cli.program(main)(["prog"])


def test_user_errors_are_one_line_and_crashes_keep_their_traceback(capsys):
    import errno
    import json as json_lib

    import jax

    from launch import cli

    def raised(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  the exception under test
            return e
        raise AssertionError("did not raise")

    user = [raised(lambda: json_lib.loads("{oops")), raised(lambda: b"\xff".decode("utf-8")),
            NotADirectoryError("x is a file"), OSError(errno.ENOSPC, "No space left on device"),
            OSError(errno.EIO, "Input/output error", "photo.png"),  # any failure on a file the user named
            ValueError("--seed=-1 must be in [0, 2**31)")]
    crashes = [outputs.NonFiniteJSONError("r.json: nan"), OSError(errno.EIO, "I/O error"), RuntimeError("bug"),
               raised(lambda: jax.numpy.reshape(jax.numpy.zeros(3), (2, 2))), KeyError("x")]
    assert [cli.is_user_error(e) for e in user] == [True] * len(user)
    assert [cli.is_user_error(e) for e in crashes] == [False] * len(crashes)
    with pytest.raises(SystemExit) as exit_:
        with cli.user_errors():
            raise user[0]
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: Expecting property name") and len(err.strip().splitlines()) == 1
    with pytest.raises(RuntimeError):
        with cli.user_errors():
            raise crashes[2]


BAD_FLAGS = {
    "launch.edit": ["--precision=fp16", "--seed=abc", "--clip_guidance_lambda=x", "--prompt", "--batch_size=big",
                    "--batch_size=0"],
    "launch.batch_edit": ["--precision=fp16", "--batch_size=abc"],
    "launch.extrapolate": ["--side=up", "--strip=wide"],
    "bench.benchmark": ["--config=huge", "--batch_size=abc"],
    "bench.compile_report": ["--precision=fp16", "--per_device_batch=abc"],
    "bench.gpu_proof": ["--deterministic=maybe", "--num_samples=abc"],
    "checkpoints_convert.unet": ["--overwrite=maybe"],
    "checkpoints_convert.clip": ["--overwrite=maybe"],
    "checkpoints_convert.lpips": ["--overwrite=maybe"],
    "checkpoints_convert.fetch": ["--force=maybe", "--models"],
}


@pytest.mark.parametrize("module,flag", [(m, f) for m, fs in BAD_FLAGS.items() for f in ["--bogus_flag=1", *fs]])
def test_bad_flags_are_one_line_and_status_2(module, flag, tmp_path):
    proc = subprocess.run([sys.executable, "-m", module, flag], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    name = flag.split("=")[0].lstrip("-")
    assert name in err, err
    assert os.listdir(tmp_path) == []  # nothing written where it ran
