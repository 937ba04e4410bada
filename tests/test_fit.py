"""bdjax/fit.py: batch_size="auto", the largest batch whose compiled sampler fits a device's memory.

The search itself (`largest`, `search`) runs on made-up footprints. The editor's decisions run the
smoke networks' real sampler, compiled for XLA's memory analysis on the CPU, with the accelerator
and its memory limit faked (bdjax.fit.accelerator and memory_limit), so that the limit can be set
where a known batch just fits. Compiles are counted by wrapping bdjax.fit.compile_programs.
"""

import json
import math

import numpy as np
import pytest

from bdjax import fit, smoke
from bdjax.errors import OptionError
from bdjax.options import EditOptions
from launch_helpers import in_two_processes


@pytest.fixture(autouse=True)
def no_decisions_kept():
    """Every test starts with no decision in memory (the file's are the test's own)."""
    fit.forget()
    yield
    fit.forget()


# ----------------------------------------------------------------------------------- searching

@pytest.mark.parametrize("boundary", [0, 1, 2, 3, 5, 8, 13, 63, 64, 100])
def test_largest_doubles_then_bisects_to_the_boundary(boundary):
    asked = []

    def ok(n):
        asked.append(n)
        return n <= boundary

    assert fit.largest(ok, 64) == min(boundary, 64)
    assert max(asked) <= 64 and len(asked) <= 2 * math.log2(64) + 2, asked
    if boundary == 0:
        assert asked == [1]


def test_search_predicts_linearly_and_corrects_a_wrong_prediction():
    def counted(measure):
        asked = []

        def measured(n):
            asked.append(n)
            return measure(n)
        return measured, asked

    linear, asked = counted(lambda n: 100 + 10 * n)
    assert fit.search(linear, budget=175, limit=64) == 7 and sorted(asked) == [1, 2, 7, 8]  # right at once
    assert fit.search(linear, budget=175, limit=5) == 5  # never beyond what is needed
    convex, asked = counted(lambda n: 100 + 10 * n + n * n)  # the prediction is too large: bisected below it
    assert fit.search(convex, budget=200, limit=64) == max(n for n in range(1, 65) if 100 + 10 * n + n * n <= 200)
    concave, _ = counted(lambda n: 100 + 20 * n - n * n // 8)  # too small: doubled above it
    # Straight, but a little steeper than the probes say (the compiler's plans beyond the smallest
    # batches): the prediction overshoots, and the line through it and the last fit is right.
    steeper, asked = counted(lambda n: 1000 + 300 * n + 20 * max(0, n - 4) * (n > 4))
    assert fit.search(steeper, budget=7320, limit=64) == 20 and sorted(asked) == [1, 2, 19, 20, 21]
    for budget in range(1000, 9000, 37):  # wherever the boundary is, the largest that fits
        for measure in (steeper, convex, concave):
            found = fit.search(measure, budget, limit=64)
            assert found == max([n for n in range(1, 65) if measure(n) <= budget], default=0), (budget, found)
    assert fit.search(concave, budget=400, limit=64) == 16
    assert fit.search(lambda n: 1000 * n, budget=999, limit=8) == 0
    assert fit.search(lambda n: 1000 * n, budget=1500, limit=8) == 1
    # Larger probes (the compile report's --max_batch_probes): right at once from them, and where
    # the answer lies below the smaller probe, found below it.
    linear, asked = counted(lambda n: 100 + 10 * n)
    assert fit.search(linear, budget=1000, limit=256, probes=(16, 32)) == 90 and sorted(asked) == [16, 32, 90, 91]
    linear, asked = counted(lambda n: 100 + 10 * n)
    assert fit.search(linear, budget=175, limit=256, probes=(16, 32)) == 7 and 32 not in asked
    assert fit.search(lambda n: 100 + 10 * n, budget=10 ** 6, limit=24, probes=(16, 32)) == 24


# ----------------------------------------------------------------------------------- the editor

@pytest.fixture(scope="module")
def editor():
    return smoke.editor(with_lpips=False)


@pytest.fixture(scope="module")
def auto(editor):
    return editor.options(batch_size="auto")


@pytest.fixture
def compiles(monkeypatch):
    """The batches fit.compile_programs is asked to compile, in order."""
    asked = []
    real = fit.compile_programs

    def counting(sampler, params, size, embed_dim, batch, mesh, which=fit.PROGRAMS):
        asked.append(batch)
        return real(sampler, params, size, embed_dim, batch, mesh, which)

    monkeypatch.setattr(fit, "compile_programs", counting)
    return asked


@pytest.fixture(scope="module")
def footprints(editor, auto):
    """The sampler's bytes per device at per-device batches 1 to 4, compiled here."""
    run, devices = editor.sampler(auto, True), editor.mesh.devices.size
    return {n: fit.footprint(run, editor.params, editor.image_size, editor.models.clip.embed_dim, n * devices,
                             editor.mesh) for n in range(1, 5)}


def fake_accelerator(monkeypatch, limit: int):
    monkeypatch.setattr(fit, "accelerator", lambda device: True)
    monkeypatch.setattr(fit, "memory_limit", lambda device: limit)


def limit_for(budget: int) -> int:
    """The memory limit whose usable share (less fit.MARGIN) is `budget` bytes."""
    return math.ceil(budget / (1 - fit.MARGIN))


def test_auto_on_a_cpu_keeps_the_default_batch_and_compiles_nothing(editor, auto, compiles):
    assert EditOptions().batch_size == 4 and auto.nominal_batch == 4
    choice = editor.batch_choice(auto, True, 32)
    assert (choice.rows, choice.auto, choice.per_device) == (4, True, None) and "CPU" in choice.note
    assert editor.batch_choice(auto, True, 3).rows == 3  # never more rows than samples
    assert editor.batch_choice(editor.options(batch_size=8), True, 32).rows == 8
    assert compiles == []
    assert choice.report() == {"batch_rows": 4, "batch_size_auto": {
        "rows": 4, "per_device": None, "bytes": None, "limit_bytes": None, "margin": None, "cached": False,
        "compiles": 0, "note": choice.note}}


def test_auto_on_an_accelerator_picks_the_largest_batch_that_fits_and_keeps_the_decision(
        editor, auto, footprints, compiles, monkeypatch, tmp_path):
    assert footprints[1] < footprints[2] < footprints[3] < footprints[4], footprints
    limit = limit_for((footprints[3] + footprints[4]) // 2)  # 3 per device fits with the margin, 4 does not
    fake_accelerator(monkeypatch, limit)
    editor_dir = editor.fit_cache_dir
    try:
        editor.fit_cache_dir = str(tmp_path)
        devices = editor.mesh.devices.size
        choice = editor.batch_choice(auto, True, 32 * devices)
        assert (choice.per_device, choice.rows, choice.bytes) == (3, 3 * devices, footprints[3])
        assert choice.limit_bytes == limit and choice.margin == fit.MARGIN and not choice.cached
        assert 0 < len(compiles) == choice.compiles <= 4 and max(compiles) <= 4 * devices
        assert choice.describe().startswith(f"batch {3 * devices} per run (auto: ")
        assert choice.report()["batch_size_auto"]["per_device"] == 3

        # Decided: later edits, of any size, compile nothing; never more rows than samples.
        done = len(compiles)
        assert editor.batch_choice(auto, True, 32 * devices).rows == 3 * devices
        assert editor.batch_choice(auto, True, 2).rows == 2
        assert len(compiles) == done

        # The file keeps it for the next process: read back, nothing compiled, said to be cached.
        with open(tmp_path / fit.CACHE_FILE, encoding="utf-8") as f:
            saved = json.load(f)
        [entry] = saved["decisions"].values()
        assert entry["per_device"] == 3 and entry["configuration"]["limit_bytes"] == limit
        fit.forget()
        again = editor.batch_choice(auto, True, 32 * devices)
        assert (again.per_device, again.cached, len(compiles)) == (3, True, done)
        assert again.describe().endswith("; cached)")

        # A corrupt file is ignored and rewritten (an edit of one sample compiles one candidate).
        (tmp_path / fit.CACHE_FILE).write_text("{not json", encoding="utf-8")
        fit.forget()
        assert editor.batch_choice(auto, True, 1).rows == 1 and compiles[done:] == [devices]
        with open(tmp_path / fit.CACHE_FILE, encoding="utf-8") as f:
            assert len(json.load(f)["decisions"]) == 1

        # Another configuration is another decision: searched afresh.
        other = editor.options(batch_size="auto", aug_num=auto.aug_num + 1)
        device = fit.local_device(editor.mesh)

        def key(options):
            return fit.config_key(editor.configuration(options, True), device, devices, limit)[0]

        assert key(other) != key(auto) and key(auto) == key(editor.options(batch_size="auto", rank_by="combined",
                                                                           rank_background_weight=0))
        done = len(compiles)
        assert editor.batch_choice(other, True, 1).rows == 1 and len(compiles) == done + 1
    finally:
        editor.fit_cache_dir = editor_dir


def test_auto_refuses_when_not_even_one_sample_per_device_fits(editor, auto, footprints, compiles, monkeypatch):
    fake_accelerator(monkeypatch, limit_for(footprints[1] - 1))
    with pytest.raises(OptionError, match=r"^batch_size=auto: not even one sample per device fits: .*--remat=blocks"):
        editor.batch_choice(auto, True, 8)
    assert len(compiles) == 1


def test_an_unknown_memory_limit_keeps_the_default_and_says_so(editor, auto, compiles, monkeypatch):
    monkeypatch.setattr(fit, "accelerator", lambda device: True)
    monkeypatch.setattr(fit, "memory_limit", lambda device: None)
    choice = editor.batch_choice(auto, True, 32)
    assert choice.rows == 4 and compiles == []
    assert choice.describe() == "batch 4 per run (auto: the memory of a cpu is not known: the default 4)"
    assert choice.report()["batch_size_auto"]["note"] == "the memory of a cpu is not known: the default 4"


def test_a_sample_does_not_depend_on_the_rows_auto_chose(editor, compiles, monkeypatch):
    """With the L2 background loss on (whose divisor is the batch: 4 with auto), auto's rows (1
    here, the most the faked memory holds) give the samples batch_size=4 gives."""
    options = dict(skip_timesteps=22, local_clip_guided_diffusion=True, background_preservation_loss=True,
                   lpips_sim_lambda=0.0)
    auto = editor.options(batch_size="auto", **options)
    run, devices = editor.sampler(auto, True), editor.mesh.devices.size
    one, two = (fit.footprint(run, editor.params, editor.image_size, editor.models.clip.embed_dim, n * devices,
                              editor.mesh) for n in (1, 2))
    fake_accelerator(monkeypatch, limit_for((one + two) // 2))
    photo = np.random.RandomState(3).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    stream = editor.edit_batches(photo, mask, "a red ball", num_samples=3, seed=5, progress=False,
                                 batch_size="auto", **options)
    assert editor.batch_choice(stream.options, True, 3).rows == devices
    chosen = list(stream)
    fixed = list(editor.edit_batches(photo, mask, "a red ball", num_samples=3, seed=5, progress=False, batch_size=4,
                                     **options))
    assert len(chosen) == -(-3 // devices) and len(fixed) == 1

    def images(batches):
        return np.concatenate([b.images for b in batches])[np.argsort(np.concatenate([b.sample_ids for b in batches]))]

    np.testing.assert_array_equal(images(chosen), images(fixed))


def test_memory_limit_reads_the_runtime_then_the_chip_table():
    class Device:
        def __init__(self, kind, stats):
            self.device_kind, self.stats, self.platform = kind, stats, "gpu"

        def memory_stats(self):
            return self.stats

    assert fit.memory_limit(Device("NVIDIA H200", {"bytes_limit": 123})) == 123
    assert fit.memory_limit(Device("NVIDIA H200", None)) == 150754820096
    assert fit.memory_limit(Device("TPU v5 lite", {})) == 16 * fit.GIB
    assert fit.memory_limit(Device("TPU v5", None)) == 95 * fit.GIB
    assert fit.memory_limit(Device("NVIDIA H100 PCIe", None)) == 80 * fit.GIB
    assert fit.memory_limit(Device("Some Chip", None)) is None
    assert fit.hbm_bytes("NVIDIA H100 80GB HBM3") == 80 * fit.GIB and fit.hbm_bytes("NVIDIA H200") == 150754820096


def test_results_do_not_depend_on_auto_rows():
    """The L2 background loss's divisor and the reference's numbering use 4 with auto."""
    assert EditOptions(batch_size="auto").nominal_batch == EditOptions().nominal_batch == 4
    assert EditOptions(batch_size=6).nominal_batch == 6
    assert hash(EditOptions(batch_size="auto").sampling) == hash(EditOptions(batch_size="auto").sampling)


AGREEING = """
import json, pathlib, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]),
                           heartbeat_timeout_seconds=30)
from bdjax import fit, parallel
me, cache = jax.process_index(), sys.argv[3]
fit.accelerator = lambda device: True  # a fake accelerator of 10,000 bytes: 9,000 usable
fit.memory_limit = lambda device: 10_000
mesh = parallel.make_mesh(jax.devices())
per_sample = {0: 300, 1: 400}[me]  # alone, process 0 would choose 26 per device and process 1 20
asked = []

def measure(n):
    asked.append(n)
    return 1000 + per_sample * n

first = fit.choose({"net": "x"}, measure, mesh, 256, cache_dir=cache)
compiled_first = len(asked)
again = fit.choose({"net": "x"}, measure, mesh, 256, cache_dir=cache)  # in memory: no compile, no collective
again_compiled = len(asked)
# Each process keeps its own cache file: process 0 decided 20 and reads it back without compiling,
# while process 1, without a file here and with a footprint now larger, decides 16 on its own.
fit.forget()
if me == 1:
    assert not (pathlib.Path(cache) / fit.CACHE_FILE).exists()  # only process 0 writes
per_sample = {0: 300, 1: 500}[me]
asked.clear()
later = fit.choose({"net": "x"}, measure, mesh, 256, cache_dir=cache)
print("CHOICE " + json.dumps({"first": [first.rows, first.per_device, compiled_first],
                              "again": [again.rows, again_compiled == compiled_first],
                              "later": [later.rows, later.per_device, later.cached, len(asked)]}), flush=True)
"""


def test_processes_agree_on_the_smallest_decision(tmp_path):
    """Two processes (jax.distributed on 127.0.0.1, one CPU device each, a faked accelerator) whose
    footprints differ: both run the smaller per-device batch, also when one of them reads an
    earlier decision from its own cache file and the other searches again."""
    caches = [tmp_path / f"cache{i}" for i in range(2)]
    for cache in caches:
        cache.mkdir()
    outs = in_two_processes(AGREEING, lambda pid: caches[pid], env={"XLA_FLAGS": ""})
    seen = [json.loads(next(line for line in out.splitlines() if line.startswith("CHOICE "))[7:]) for out in outs]
    for i, choice in enumerate(seen):
        assert choice["first"][:2] == [40, 20] and choice["first"][2] > 0  # 20 per device x 2 devices
        assert choice["again"] == [40, True]
        assert choice["later"][:2] == [32, 16], (i, choice)  # process 0 read 20 from its file, runs 16
    assert seen[0]["later"][2:] == [True, 0] and seen[1]["later"][3] > 0
    written = json.loads((caches[0] / fit.CACHE_FILE).read_text())["decisions"]
    assert [d["per_device"] for d in written.values()] == [20]  # the agreed decision, written by process 0
