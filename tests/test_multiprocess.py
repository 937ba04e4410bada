"""launch/batch_edit.py as a pod runs it, on one machine: several processes on 127.0.0.1 joined by
jax.distributed (CPU collectives through gloo), each with several CPU devices.

- 1 x 8 and 2 x 4 write the same files byte for byte (every PNG, provenance included, and every
  ranked.json), but for the one field that names the topology: `process_index`, the process that
  wrote a sample, in its sample JSON and in report.json; the distances there are equal to the bit.
  Both compile the same 8-partition program. 1 process x 1 device writes the same samples and
  rankings, but its pixels may differ by one uint8 level: with one device XLA skips its SPMD
  partitioner pipeline (it runs only for more than one partition), whose early clean-up passes
  change later fusion decisions and with them FMA contraction and accumulation order (float
  differences ~1e-6), so a value near a rounding boundary can land on either side.
- Both processes of a 2 x 4 run SIGKILLed mid-run, then the same command again: the final files
  are the uninterrupted run's in the same sense, nothing duplicated, no temporary files.
- One process SIGKILLed while the other runs: the survivor exits non-zero within the heartbeat
  timeout (10 s here) plus a margin, naming the lost process, through one of two paths (see that
  test). launch/cli.py's own path (one line, status 3) is also driven deterministically, in
  process, with the coordination service faked.
Every process is started and stopped by the test, and every wait is bounded.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from launch_helpers import free_port, in_two_processes

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


WRITER = "process_index"  # the one field of the outputs that depends on the topology


def files(out) -> dict:
    """{path relative to `out`: bytes} of every file a run wrote but report.json (its flags,
    timings and devices differ by design; `results` compares what it says of the samples)."""
    paths = [p for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.isfile(p)]
    return {os.path.relpath(p, out): open(p, "rb").read() for p in paths if os.path.basename(p) != "report.json"}


def without_writer(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != WRITER}


def results(out) -> list:
    """report.json's per-job results (samples, distances, options, framing), but which process
    wrote each sample."""
    jobs = json.load(open(out / "report.json"))["results"]
    return [dict(job, samples=[without_writer(s) for s in job["samples"]]) for job in jobs]


def assert_same_files(out, expected, label):
    """`out` holds the files of the run in `expected`, byte for byte (PNGs with their provenance,
    ranked.json), but the sample JSONs, which are equal but for `WRITER` (distances to the bit:
    JSON keeps a float's shortest repr, which parses back to the same double); and its report
    says the same of every job."""
    got, want = files(out), files(expected)
    assert sorted(got) == sorted(want), label
    for path, data in want.items():
        if re.fullmatch(r"job\d+/sample_\d+\.json", path):
            assert without_writer(json.loads(got[path])) == without_writer(json.loads(data)), f"{label} {path}"
        else:
            assert got[path] == data, f"{label} {path}"
    assert results(out) == results(expected), label


def samples(out):
    """{relative path: pixels} of every sample, and each job's ranking."""
    images = {os.path.relpath(p, out): np.asarray(Image.open(p)) for p in glob.glob(f"{out}/job*/sample_*.png")}
    rankings = {os.path.basename(os.path.dirname(p)): [s["sample_id"] for s in json.load(open(p))["samples"]]
                for p in glob.glob(f"{out}/job*/ranked.json")}
    return images, rankings


@pytest.fixture(scope="module")
def pod_run(workdir):
    """The output directory of an uninterrupted 2 x 4 run."""
    return run(workdir, workdir / "pod_2x4", devices=4, processes=2)


def test_topologies_give_the_same_outputs(workdir, pod_run):
    images, rankings = samples(pod_run)
    assert len(images) == sum(n for _, n, _ in PROMPTS) and len(rankings) == len(PROMPTS)
    report = json.load(open(pod_run / "report.json"))
    assert report["items"]["computed"] == len(images) and report["device"]["processes"] == 2
    writers = {json.load(open(p))[WRITER] for p in glob.glob(f"{pod_run}/job*/sample_*.json")}
    assert writers == {0, 1}  # both processes wrote their own items

    # The same 8-partition program on one host or two: the same files.
    assert_same_files(run(workdir, workdir / "single_1x8", 8, 1), pod_run, "1x8")

    one_images, one_rankings = samples(run(workdir, workdir / "single_1x1", 1, 1))
    assert sorted(one_images) == sorted(images) and one_rankings == rankings
    for name, pixels in images.items():
        diff = np.abs(one_images[name].astype(int) - pixels)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (f"1x1 {name}", diff.max(), (diff > 0).mean())


def test_killed_run_resumes_to_the_same_outputs(workdir, pod_run):
    """The command of `pod_run` (its batch size is in every file's provenance), killed as soon as a
    sample of its first batch is on disk (its second batch is seconds away), then run again."""
    out = workdir / "killed"
    procs = start(workdir, out, 4, 2)
    deadline = time.monotonic() + 400
    while not glob.glob(f"{out}/job*/sample_*.png"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), _logs(out)
        time.sleep(0.2)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    finish(procs)
    partial = glob.glob(f"{out}/job*/sample_*.png")
    assert 0 < len(partial) < sum(n for _, n, _ in PROMPTS), "the kill must land between the first and the last item"

    procs = start(workdir, out, 4, 2)
    assert finish(procs) == [0, 0], _logs(out)
    assert_same_files(out, pod_run, "resumed")
    assert not [p for p in glob.glob(f"{out}/**/*", recursive=True) if os.path.basename(p).startswith(".tmp")]
    report = json.load(open(out / "report.json"))
    assert report["items"]["skipped"] >= len(partial) and report["items"]["failed"] == 0


def test_lost_process_stops_the_survivor_naming_it(workdir):
    """End to end, with real processes: a SIGKILLed peer never leaves the survivor waiting; it
    exits non-zero within the heartbeat timeout plus a margin, and the lost process is named. Which
    path names it depends on timing, so this does not prove that launch/cli.py's handler runs: when
    the loss surfaces in a collective, the handler ends the survivor (our line, status 3); when
    JAX's coordination service notices first (e.g. while the survivor compiles), JAX aborts the
    process itself, naming task 1. `test_a_lost_peer_ends_the_survivor_with_one_line_and_status_3`
    drives the handler deterministically."""
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


class CoordinationClient:
    """jax.distributed's client as a survivor sees it: each get_live_nodes call gives the next of
    `answers`, the processes still heard from, or an exception (the service is gone)."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def get_live_nodes(self, processes):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.mark.parametrize("me, answers, lost", [
    (0, [[0, 1], [0]], [1]),  # process 1 is flagged a poll later than its connection closed
    (1, [jax.errors.JaxRuntimeError("UNAVAILABLE: failed to connect")], [0]),  # the service went with process 0
])
def test_a_lost_peer_ends_the_survivor_with_one_line_and_status_3(program_flags, monkeypatch, capsys, me, answers,
                                                                 lost):
    """launch/cli.py's handler, in process: a collective fails on a 2-process run, the survivor
    names the lost process in one line with the resume advice and leaves through os._exit, which
    skips JAX's exit-time shutdown barrier (it would wait for the lost peer)."""
    from jax._src import distributed

    from launch import cli

    program_flags(["batch_edit", f"--heartbeat_timeout={HEARTBEAT_S}"])
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: me)
    monkeypatch.setattr(distributed.global_state, "client", CoordinationClient(*answers))
    exits = []

    def exit_now(status):
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", exit_now)
    failure = "INTERNAL: Gloo all-gather failed: Connection closed by peer [127.0.0.1]:40123"

    def main(argv):
        raise jax.errors.JaxRuntimeError(f"{failure}\nmore detail")

    with pytest.raises(SystemExit):
        cli.program(main)(["batch_edit"])
    assert exits == [cli.LOST_PEER] == [3]
    assert capsys.readouterr().err == (
        f"error: process(es) {lost} of this 2-process run stopped ({failure}); finished items are on disk: "
        "rerun the same command on every process to resume\n")


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
    for text in in_two_processes(HELPERS):  # both processes see the same stack, in process order
        assert "rows [[0, 10], [1, 11]] int32 best [0.5, 0.25]" in text, text[-2000:]
