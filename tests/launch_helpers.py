"""Stand-ins for the launch programs' tests: a sampler that computes nothing (`FakeRun`, and
`SlowCompile`, which takes its time to compile), an editor around it (`fake_editor`: no networks,
nothing compiled), and running a program's main in-process as its command line would
(`run_program`, with the `program_flags` fixture of tests/conftest.py), and a script run in two
jax.distributed processes on 127.0.0.1 (`in_two_processes`). Used by test_cli.py, test_runtime.py,
test_editor.py, test_launch_edit.py, test_extrapolate.py, test_fit.py and test_multiprocess.py."""

import collections
import json
import os
import socket
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np

from bdjax import parallel
from bdjax.blended import Models
from bdjax.editor import BlendedDiffusion
from bdjax.scores import PSNR_CAP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # the smoke preset's model size, which the launch programs check against


class FakeRun:
    """Stands in for a CompiledSampler: sample k's image is a flat grey of k / 100, its distance
    1 / (k + 1) (so later samples rank first); samples in `nan` come out NaN, those in `inf`
    get an infinite distance. Its scores: clip_masked the distance, clip_whole 1 + k / 100 (so
    rank_by=clip_whole ranks earlier samples first), the background kept (PSNR at its cap, LPIPS
    0) and seam 1. Records the shape of every batch it is given."""
    num_steps = 1

    def __init__(self, nan=(), inf=()):
        self.nan, self.inf, self.batches = set(nan), set(inf), []

    def compiled(self, *inputs) -> bool:
        return True  # nothing to compile

    def __call__(self, params, init, mask, text_embed, sample_ids, seeds, on_steps=None):
        ids = np.asarray(sample_ids)
        self.batches.append({"init": init.shape, "ids": ids.tolist(), "seeds": np.asarray(seeds).tolist()})
        images = np.broadcast_to((ids / 100.0)[:, None, None, None], (len(ids), SIZE, SIZE, 3)).copy()
        distances = 1.0 / (ids + 1.0)
        for k in self.nan:
            images[ids == k] = np.nan
        for k in self.inf:
            distances[ids == k] = np.inf
        scores = {"clip_masked": distances, "clip_whole": 1 + ids / 100.0,
                  "background_psnr": np.full(len(ids), PSNR_CAP), "background_lpips": np.zeros(len(ids)),
                  "seam": np.ones(len(ids))}
        return {"images": jnp.asarray(images, jnp.float32), "distances": jnp.asarray(distances, jnp.float32),
                "scores": {k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}}


def fake_editor(run: FakeRun) -> BlendedDiffusion:
    """An editor whose sampler is `run` and whose prompt encoder is a constant: no networks."""
    editor = BlendedDiffusion.__new__(BlendedDiffusion)
    editor.models = Models(unet=None, clip=types.SimpleNamespace(context_length=77))
    editor.mesh = parallel.make_mesh()
    editor.params = {}
    editor.image_size = SIZE
    editor.label, editor.param_dtype = "", "float32"
    editor._samplers = collections.OrderedDict()
    editor.defaults = {}
    editor.weights_digest = "fake"
    editor.sampler = lambda options, guided: run
    editor.encode_tokens = lambda tokens: jnp.zeros(8)
    return editor


def photo():
    return np.random.RandomState(0).randint(0, 256, (20, 24, 3), dtype=np.uint8)


def run_program(flags_, monkeypatch, program: str, args: list[str], run: FakeRun | None = None) -> int:
    """Run launch.<program>'s main as its command line would, with `run` as the sampler; returns
    the exit status (0 when main returns)."""
    import importlib

    from launch import cli, runtime

    module = importlib.import_module(f"launch.{program}")
    flags_.unparse_flags()
    flags_([program, "--config=smoke", "--nocompilation_cache", *args])
    editor = fake_editor(run or FakeRun())
    monkeypatch.setattr(runtime, "build_editor", lambda need_lpips, devices=None: editor)
    try:
        cli.program(module.main)([program])
    except SystemExit as e:
        return e.code
    return 0


def snapshot(directory) -> dict:
    """Every file under `directory` (relative path -> bytes), to compare before and after."""
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, directory)] = f.read()
    return found


def strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def run_module(module: str, *args, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


class SlowCompile(FakeRun):
    """A FakeRun whose programs take `compile_s` to compile (once) and whose run reports its
    `num_steps` in two chunks, `chunk_s` apart; `descriptions` are the bars' while compiling."""
    num_steps = 4

    def __init__(self, compile_s: float, chunk_s: float = 0.02, bars=()):
        super().__init__()
        self.compile_s, self.chunk_s, self.bars = compile_s, chunk_s, bars
        self.compiles, self.descriptions = 0, []

    def compiled(self, *inputs) -> bool:
        return self.compiles > 0

    def compile(self, params, *inputs):
        import time

        self.descriptions += [bar.desc for bar in self.bars]
        time.sleep(self.compile_s)
        self.compiles += 1

    def __call__(self, *args, on_steps=None):
        import time

        out = super().__call__(*args)
        for _ in range(2):
            time.sleep(self.chunk_s)
            if on_steps is not None:
                on_steps(self.num_steps // 2)
        return out


def recording_tqdm(monkeypatch, module):
    """Replace `module`'s tqdm by one that keeps its bars and, as each closes, its elapsed time."""
    from tqdm.auto import tqdm

    bars = []

    class Recording(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

        def close(self):
            self.final = dict(self.format_dict)
            super().close()

    monkeypatch.setattr(module, "tqdm", Recording)
    return bars


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_two_processes(script: str, *args, timeout: int = 300, env: dict | None = None) -> list[str]:
    """Run `script` (python -c) as processes 0 and 1, each given the coordinator's address, its
    process id and `args` (a callable of the process id for per-process arguments); the outputs,
    in process order, once both ended with status 0."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    procs = [subprocess.Popen([sys.executable, "-c", script, f"127.0.0.1:{port}", str(pid),
                               *[str(a(pid) if callable(a) else a) for a in args]], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    return outputs
