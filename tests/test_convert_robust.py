"""The converters against a hostile machine and hostile files: a full, read-only or over-quota
disk, a symbolic link loop, memory running out, JSON nested or sized to crash a reader, tensors
of another dtype. Each is one line naming the file and the fix, exit status 2; converted files
get the mode the umask gives a plain open(). The checkpoints are tiny random guided-diffusion
UNets, converted by checkpoints_convert.unet."""

import errno
import json
import os
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from guided_diffusion.unet import UNetModel as TorchUNet
from safetensors import SafetensorError

from bdjax import checkpoint
from bdjax.files import TMP_PREFIX
from bdjax.models import unet
from checkpoints_convert import common
from checkpoints_convert import unet as convert_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=None, num_heads=2,
            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
            resblock_updown=True, use_new_attention_order=False)
DISK_ERRORS = {errno.ENOSPC: "free space", errno.EROFS: "read-only", errno.EDQUOT: "quota"}


class FailingFile:
    """A file whose writes fail with `code` and no file name, as writes to a full disk do."""

    def __init__(self, f, code: int):
        self._f, self._code = f, code

    def write(self, data):
        raise OSError(self._code, os.strerror(self._code))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def failing_writes(monkeypatch, module, matches, code: int) -> None:
    """Files that `module` opens for writing at a path `matches` accepts fail on write with `code`."""
    def patched(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if ("w" in mode or "a" in mode) and matches(os.fspath(path)):
            return FailingFile(f, code)
        return f
    monkeypatch.setattr(module, "open", patched, raising=False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "checkpoints_convert.unet", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def run_in_cli(call, capsys) -> str:
    """Run `call` as a converter's main runs (under common.cli); returns its one line of stderr
    after asserting exit status 2."""
    with pytest.raises(SystemExit) as exited:
        common.cli(lambda argv: call())(["converter"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(TorchUNet(**TINY).eval().state_dict(), path)
    return str(path)


def test_converted_files_follow_the_umask(tiny_pt, tmp_path):
    """Both files get 0666 less the umask, as a plain open() gives (a cache shared by a group)."""
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        out = tmp_path / f"umask{umask:03o}"
        old = os.umask(umask)
        try:
            convert_unet.convert(tiny_pt, str(out), TINY)
        finally:
            os.umask(old)
        for name in ("unet.safetensors", "unet.json"):
            assert stat.S_IMODE(os.stat(out / name).st_mode) == mode, (name, oct(umask))


@pytest.mark.parametrize("code", sorted(DISK_ERRORS), ids=errno.errorcode.get)
@pytest.mark.parametrize("target", ["unet.safetensors", "unet.json"])
def test_disk_errors_while_writing_are_one_line(tiny_pt, tmp_path, monkeypatch, capsys, code, target):
    """A write failing with only an errno names the converted file and the fix; no temporary stays."""
    if target == "unet.safetensors":  # safetensors writes in Rust and reports the errno in its message
        def fail(*args, **kwargs):
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        monkeypatch.setattr(checkpoint, "save_file", fail)
    else:
        failing_writes(monkeypatch, checkpoint, lambda p: os.path.basename(p).startswith(TMP_PREFIX), code)
    out = tmp_path / "out"
    line = run_in_cli(lambda: convert_unet.convert(tiny_pt, str(out), TINY), capsys)
    assert line.startswith(f"error: {os.strerror(code)} ({out / target}): "), line
    assert DISK_ERRORS[code] in line
    assert not [n for n in os.listdir(out) if n.startswith(TMP_PREFIX)]


def test_symlink_loop_in_config_json_is_one_line(tmp_path):
    """A real ELOOP, through the command line: no traceback."""
    os.symlink("loop", tmp_path / "loop")
    config = tmp_path / "loop" / "tiny.json"
    proc = run_cli(f"--input={tmp_path / 'x.pt'}", f"--output={tmp_path / 'out'}", f"--config_json={config}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {os.strerror(errno.ELOOP)} ({config}): symbolic links on that path form a loop: fix or remove them"]


def test_out_of_memory_names_the_file_and_is_not_blamed_on_it(tiny_pt, monkeypatch, capsys):
    """A checkpoint too large for this machine's memory is not a damaged one (ConversionError)."""
    def exhausted(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(torch, "load", exhausted)
    with pytest.raises(MemoryError) as error:
        common.read_torch_state_dict(tiny_pt)
    assert not isinstance(error.value, common.ConversionError)
    line = run_in_cli(lambda: common.read_torch_state_dict(tiny_pt), capsys)
    assert line.startswith(f"error: out of memory loading {tiny_pt} (") and "more memory" in line, line


def test_bugs_keep_their_traceback():
    for bug in (RecursionError("maximum recursion depth exceeded"), KeyError("x"), TypeError("x"),
                OSError(errno.EBADF, os.strerror(errno.EBADF))):
        assert common.user_error_line(bug) is None, bug
    assert common.user_error_line(OSError(errno.EIO, os.strerror(errno.EIO), "/data/x.pt")).startswith(
        f"{os.strerror(errno.EIO)} (/data/x.pt): ")


DEEP = "[" * 100_000  # Python's JSON reader recurses once per level


@pytest.mark.parametrize("text,fragment", [
    (DEEP, "nested more than 64 levels deep"),
    ("[" * 65 + "]" * 65, "nested more than 64 levels deep"),  # parses, but deeper than any such file
    (" " * (checkpoint.MAX_JSON_BYTES + 1), f"larger than the {checkpoint.MAX_JSON_BYTES:,} bytes"),
], ids=["deep", "parseable_but_deep", "large"])
def test_config_json_nested_or_sized_to_crash_is_one_line(tiny_pt, tmp_path, capsys, text, fragment):
    config = tmp_path / "config.json"
    config.write_text(text)
    line = run_in_cli(lambda: convert_unet.read_config(str(config)), capsys)
    assert line.startswith(f"error: {config} is ") and fragment in line and "--preset" in line, line


def test_a_json_file_of_gigabytes_is_refused_by_its_size_unread(tmp_path):
    path = tmp_path / "unet.json"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # sparse: reading it would take minutes and 64 GB
    with pytest.raises(checkpoint.JSONFileError, match=f"larger than the {checkpoint.MAX_JSON_BYTES:,} bytes"):
        checkpoint.read_json(str(path))
    with pytest.raises(checkpoint.JSONFileError, match="larger than"):
        checkpoint.read_json("/dev/zero")  # no size to judge by: the read itself is bounded


def test_json_within_the_limits_reads_as_json(tmp_path):
    path = tmp_path / "ok.json"
    value = {"config": {"channel_mult": [1, 2]}, "nested": "[" * 500}
    path.write_text(json.dumps(value))
    assert checkpoint.read_json(str(path)) == value
    path.write_text("[" * 64 + "]" * 64)
    assert checkpoint._depth(checkpoint.read_json(str(path))) == 64


@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16", "float64", "complex64"])
def test_the_converters_refuse_tensors_of_another_dtype(tiny_pt, dtype):
    """check_params, which every converter and loader runs, names the tensor and its dtype."""
    flat = convert_unet.convert_state_dict(common.read_torch_state_dict(tiny_pt))
    key = "out_2/kernel"
    flat[key] = flat[key].astype(jnp.dtype(dtype))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.check_params(flat, unet.param_shapes(unet.UNetModel(**TINY)), what=tiny_pt)
    message = str(error.value)
    assert "\n" not in message and f"1 tensor(s) of the wrong dtype: {key} {dtype} (expected float32)" in message
    assert error.value.mistyped == [(key, dtype, "float32")]


def test_float32_tensors_pass_and_arrays_of_any_kind_are_compared_by_dtype():
    expected = {"a": jax.ShapeDtypeStruct((2,), jnp.float32), "b": {"c": jnp.zeros((), jnp.float32)}}
    checkpoint.check_params({"a": np.zeros(2, np.float32), "b/c": np.float32(1)}, expected)
    with pytest.raises(checkpoint.CheckpointMismatchError, match=r"b/c int64 \(expected float32\)"):
        checkpoint.check_params({"a": jnp.zeros(2), "b/c": 1}, expected)
