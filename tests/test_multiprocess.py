"""launch/batch_edit.py as a pod runs it, on one machine: several processes on 127.0.0.1 joined by
jax.distributed (CPU collectives through gloo), each with several CPU devices.

- 1 x 8 and 2 x 4 write byte-identical PNGs and the same rankings: both compile the same
  8-partition program. 1 process x 1 device writes the same samples and rankings, but its pixels
  may differ by one uint8 level: with one device XLA skips its SPMD partitioner pipeline (it runs
  only for more than one partition), whose early clean-up passes change later fusion decisions and
  with them FMA contraction and accumulation order (float differences ~1e-6), so a value near a
  rounding boundary can land on either side. The same topology reproduces its bytes exactly.
- Both processes of a 2 x 4 run SIGKILLed mid-run, then the same command again: the final outputs
  equal the uninterrupted run's, nothing duplicated, no temporary files.
- One process SIGKILLed while the other runs: the survivor exits non-zero within the heartbeat
  timeout (10 s here) plus a margin, naming the lost process: with our one line and status 3 when
  the loss surfaces in a collective, or through JAX's own abort when it surfaces in the
  coordination service first (e.g. while compiling).
Every process is started and stopped by the test, and every wait is bounded.
"""

import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_S = 10
PROMPTS = [("a red ball", 2, 1), ("a cat", 1, 2), ("a tree", 2, 3), ("snow", 1, 4), ("a boat", 1, 5), ("fire", 1, 6)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pod")
    rng = np.random.RandomState(0)
    for i in range(3):
        Image.fromarray(rng.randint(0, 256, (70, 90, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    mask = np.zeros((70, 90), np.uint8)
    mask[20:50, 20:60] = 255
    Image.fromarray(mask).save(root / "mask.png")
    small = np.zeros((35, 45), np.uint8)  # another size than the image: resized, with a warning
    small[5:30, 25:40] = 255
    Image.fromarray(small).save(root / "mask_small.png")
    with open(root / "jobs.jsonl", "w") as f:
        for i, (prompt, n, seed) in enumerate(PROMPTS):
            job = dict(image=f"img{i % 3}.png", mask="mask.png", prompt=prompt, num_samples=n, seed=seed,
                       name=f"job{i}", skip_timesteps=21, invert_mask=i == 2)
            if i == 4:
                del job["mask"]  # edit the whole image
            if i == 5:
                job["mask"] = "mask_small.png"
            f.write(json.dumps(job) + "\n")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir, out, devices, processes, *extra):
    """Start the processes of one run; returns their Popen objects (stderr to files)."""
    port = free_port()
    procs = []
    for pid in range(processes):
        args = [sys.executable, "-m", "launch.batch_edit", "--config=smoke", f"--manifest={workdir / 'jobs.jsonl'}",
                f"--output_dir={out}", "--batch_size=4", f"--compilation_cache_dir={workdir / 'xla'}",
                f"--heartbeat_timeout={HEARTBEAT_S}", *extra]
        if processes > 1:
            args += ["--distributed", f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                     f"--process_id={pid}"]
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
        log = open(out.parent / f"{out.name}.p{pid}.log", "w")
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def finish(procs, timeout=600):
    codes = [p.wait(timeout=timeout) for p in procs]
    return codes


def run(workdir, out, devices, processes):
    procs = start(workdir, out, devices, processes)
    assert finish(procs) == [0] * processes, _logs(out)
    return out


def _logs(out):
    return "\n".join(open(p).read()[-2000:] for p in sorted(glob.glob(f"{out}.p*.log")))


def outputs(out):
    """{relative path: pixels} of every sample, and each job's ranking."""
    images = {os.path.relpath(p, out): np.asarray(Image.open(p)) for p in glob.glob(f"{out}/job*/sample_*.png")}
    rankings = {os.path.basename(os.path.dirname(p)): [s["sample_id"] for s in json.load(open(p))["samples"]]
                for p in glob.glob(f"{out}/job*/ranked.json")}
    return images, rankings


@pytest.fixture(scope="module")
def pod_run(workdir):
    return outputs(run(workdir, workdir / "pod_2x4", devices=4, processes=2))


def test_topologies_give_the_same_outputs(workdir, pod_run):
    images, rankings = pod_run
    assert len(images) == sum(n for _, n, _ in PROMPTS) and len(rankings) == len(PROMPTS)
    for devices in (8, 1):
        other_images, other_rankings = outputs(run(workdir, workdir / f"single_1x{devices}", devices, 1))
        assert sorted(other_images) == sorted(images)
        assert other_rankings == rankings
        for name, pixels in images.items():
            if devices == 8:  # the same 8-partition program on one host or two: the same bytes
                np.testing.assert_array_equal(other_images[name], pixels, err_msg=f"1x8 {name}")
            else:
                diff = np.abs(other_images[name].astype(int) - pixels)
                assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (f"1x1 {name}", diff.max(), (diff > 0).mean())
    report = json.load(open(workdir / "pod_2x4" / "report.json"))
    assert report["items"]["computed"] == len(images) and report["device"]["processes"] == 2
    writers = {json.load(open(p))["process_index"] for p in glob.glob(f"{workdir / 'pod_2x4'}/job*/sample_*.json")}
    assert writers == {0, 1}  # both processes wrote their own items


def test_killed_run_resumes_to_the_same_outputs(workdir, pod_run):
    out = workdir / "killed"
    procs = start(workdir, out, 4, 2, "--batch_size=2")  # more, smaller batches: more chances to cut in
    deadline = time.monotonic() + 400
    while not glob.glob(f"{out}/job*/sample_*.png"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _logs(out)
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)
    partial = glob.glob(f"{out}/job*/sample_*.png")
    assert 0 < len(partial) < len(pod_run[0]), "the kill must land between the first and the last item"

    procs = start(workdir, out, 4, 2, "--batch_size=2")
    assert finish(procs) == [0, 0], _logs(out)
    images, rankings = outputs(out)
    assert sorted(images) == sorted(pod_run[0])
    for name, pixels in pod_run[0].items():
        np.testing.assert_array_equal(images[name], pixels, err_msg=name)
    assert rankings == pod_run[1]
    assert not [p for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.basename(p).startswith(".tmp")]
    report = json.load(open(out / "report.json"))
    assert report["items"]["skipped"] >= len(partial) and report["items"]["failed"] == 0


def test_lost_process_stops_the_survivor_naming_it(workdir):
    out = workdir / "lost"
    procs = start(workdir, out, 4, 2)
    log0 = out.parent / f"{out.name}.p0.log"
    deadline = time.monotonic() + 400
    while "to compute on" not in log0.read_text():  # both processes joined and started sampling
        assert time.monotonic() < deadline and procs[0].poll() is None, _logs(out)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = procs[0].wait(timeout=HEARTBEAT_S + 60)
    procs[1].wait(timeout=10)
    assert time.monotonic() - killed <= HEARTBEAT_S + 30
    text = log0.read_text()
    if code == 3:  # the survivor was in a collective: our one-line message
        assert "error: process(es) [1] of this 2-process run stopped" in text
    else:  # it was elsewhere (e.g. compiling): JAX's coordination service aborts it, naming task 1
        assert code != 0 and re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*1\b", text), text[-3000:]


HELPERS = """
import sys
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           heartbeat_timeout_seconds=30)
from bdjax import parallel
me = jax.process_index()
parallel.barrier("started")
rows = parallel.allgather(np.array([me, 10 + me], np.int32))
best = parallel.allgather(np.float32(0.25 * (2 - me)))
print("rows", rows.tolist(), rows.dtype, "best", best.tolist(), flush=True)
"""


def test_barrier_and_allgather_across_two_processes(tmp_path):
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", HELPERS, f"127.0.0.1:{port}", str(pid)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in range(2)]
    try:
        results = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], results
    for text in results:  # both processes see the same stack, in process order
        assert "rows [[0, 10], [1, 11]] int32 best [0.5, 0.25]" in text, text[-2000:]
