"""Scores where results are shown (launch.edit's report, PNGs and grid; --rank_by) and
`python -m launch.evaluate` on a folder launch.edit wrote and on a JSONL of foreign images."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from bdjax import outputs, scores
from launch_helpers import run_module, run_program, strict_json

SMOKE = ["--config=smoke", "--skip_timesteps=20"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (80, 100, 3), dtype=np.uint8)).save(root / "img.png")
    mask = np.zeros((80, 100), np.uint8)
    mask[20:60, 30:70] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


@pytest.fixture(scope="module")
def edited(inputs, tmp_path_factory):
    """launch.edit's smoke run (3 samples), then launch.evaluate on its folder."""
    out = tmp_path_factory.mktemp("edit") / "out"
    cache = tmp_path_factory.mktemp("xla")
    proc = run_module("launch.edit", *SMOKE, "--prompt=a red ball", f"--init_image={inputs / 'img.png'}",
                      f"--mask={inputs / 'mask.png'}", f"--output_dir={out}", "--num_samples=3", "--batch_size=2",
                      f"--compilation_cache_dir={cache}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_module("launch.evaluate", "--config=smoke", f"--results={out}", f"--compilation_cache_dir={cache}",
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, cache, proc


def test_the_report_png_and_grid_of_an_edit_carry_every_score(edited):
    out, _, _ = edited
    report = strict_json(out / "report.json")
    assert report["rank_by"] == "clip_masked"
    for s in report["samples"]:
        assert set(s["scores"]) == set(scores.NAMES) and s["scores"]["clip_masked"] == s["distance"] == s["rank_value"]
        assert s["scores"]["background_psnr"] == scores.PSNR_CAP and s["scores"]["background_lpips"] == 0
        about = outputs.read_provenance(str(out / s["file"]))
        assert about["scores"] == s["scores"]
        entry = strict_json(out / "samples" / f"sample_{s['sample_id']}.json")
        assert entry["scores"] == s["scores"]
    assert report["diversity"] > 0  # three different results (random networks, different seeds per sample)
    assert report["aggregates"]["clip_masked"]["best"] == report["samples"][0]["distance"]
    assert report["aggregates"]["clip_whole"]["n"] == 3
    tiles = outputs.read_provenance(str(out / "grid.png"))["tiles"]
    assert [t["scores"] for t in tiles] == [s["scores"] for s in report["samples"]]


def test_evaluate_on_an_edit_s_folder_reproduces_its_report(edited):
    """clip_masked within 1e-3 (the report's comes from the unrounded result, the evaluation's
    from the 8-bit crop); the other scores, computed from 8-bit images both times, to 1e-5."""
    out, _, proc = edited
    report = strict_json(out / "report.json")
    found = strict_json(out / "scores.json")
    assert "3 results scored" in proc.stdout and "SMOKE TEST" in proc.stdout
    assert [r["sample_id"] for r in found["results"]] == [s["sample_id"] for s in report["samples"]]
    for want, got in zip(report["samples"], found["results"]):
        assert got["clip_masked"] == pytest.approx(want["scores"]["clip_masked"], abs=1e-3)
        for name in ("clip_whole", "background_psnr", "background_lpips", "seam"):
            assert got[name] == pytest.approx(want["scores"][name], rel=1e-5, abs=1e-6), name
        assert got["file"] == f"crops/sample_{want['sample_id']}.png" and got["resized"] is False
    [edit] = found["edits"]
    assert edit["diversity"] == pytest.approx(report["diversity"], rel=1e-5)
    assert edit["best_of_n"]["clip_masked"] == found["results"][0]["clip_masked"]
    assert found["aggregates"]["best_of_n"]["clip_masked"]["n"] == 1
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["sample_id"]) for r in rows] == [r["sample_id"] for r in found["results"]]
    assert float(rows[0]["seam"]) == pytest.approx(found["results"][0]["seam"])


def test_evaluate_scores_a_jsonl_of_foreign_images_and_writes_every_field(edited, inputs, tmp_path):
    _, cache, _ = edited
    rng = np.random.RandomState(2)
    source = np.asarray(Image.open(inputs / "img.png"))
    kept = source.copy()
    kept[25:55, 35:65] = rng.randint(0, 256, (30, 30, 3))  # changed inside the mask only
    Image.fromarray(kept).save(tmp_path / "kept.png")
    Image.fromarray(rng.randint(0, 256, (40, 50, 3), dtype=np.uint8)).save(tmp_path / "small.png")  # another size
    lines = [{"id": "cup", "source": str(inputs / "img.png"), "mask": str(inputs / "mask.png"), "prompt": "a cat",
              "results": ["kept.png", "small.png"]},
             {"source": str(inputs / "img.png"), "mask": str(inputs / "mask.png"), "prompt": "a dog",
              "result": "kept.png"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    proc = run_module("launch.evaluate", "--config=smoke", f"--jsonl={tmp_path / 'edits.jsonl'}",
                      f"--output_dir={tmp_path / 'scores'}", f"--compilation_cache_dir={cache}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = strict_json(tmp_path / "scores" / "scores.json")
    assert [e["edit"] for e in found["edits"]] == ["cup", "line 2"] and [e["results"] for e in found["edits"]] == [2, 1]
    by_file = {(r["edit"], os.path.basename(r["file"])): r for r in found["results"]}
    for row in found["results"]:
        assert set(row) == {"edit", "file", "rank", "sample_id", "rank_value", "resized", *scores.NAMES}
    assert by_file[("cup", "kept.png")]["background_psnr"] == scores.PSNR_CAP  # its background is the source's
    assert by_file[("cup", "kept.png")]["background_lpips"] == 0
    assert by_file[("cup", "small.png")]["background_psnr"] < 30 and by_file[("cup", "small.png")]["resized"] is True
    assert found["edits"][0]["diversity"] > 0 and found["edits"][1]["diversity"] is None  # one result: no pairs
    assert set(found["aggregates"]) == {"all_results", "best_of_n"}
    assert found["aggregates"]["all_results"]["clip_whole"]["n"] == 3
    with open(tmp_path / "scores" / "scores.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["edit", "file", "rank", "sample_id", *scores.NAMES, "rank_value", "resized"]


@pytest.mark.parametrize("args,expected", [
    ([], "give one of --results=DIR"),
    (["--results=.", "--jsonl=x.jsonl"], "give one of --results=DIR"),
    (["--results=no/such/folder"], "is not a folder"),
    (["--results=docs"], "report.json not found: --results must be a folder bdjax wrote"),
    (["--jsonl=no_such.jsonl"], "--jsonl=no_such.jsonl: no such file"),
    (["--jsonl=EMPTY"], "holds no job (it is empty or only blank and '#' lines)"),
    (["--jsonl=NOTIMAGE"], "line 1: result {}/notes.txt is not a readable image"),
    (["--jsonl=BAD"], "line 1 is not JSON"),
    (["--jsonl=MISSING"], "line 2 lacks 'mask', 'results'"),
    (["--jsonl=NORESULT"], "result {}/gone.png not found"),
    (["--jsonl=BAD", "--rank_by=best"], "rank_by='best' must be one of clip_masked, clip_whole, combined"),
])
def test_evaluate_bad_inputs_are_one_line_errors_before_any_network(args, expected, inputs, tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    good = {"source": str(inputs / "img.png"), "mask": str(inputs / "mask.png"), "prompt": "p", "result": "gone.png"}
    present = {**good, "result": str(inputs / "img.png")}
    (tmp_path / "missing.jsonl").write_text(json.dumps(present) + "\n" + json.dumps({"source": "a", "prompt": "p"})
                                            + "\n")
    (tmp_path / "noresult.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "empty.jsonl").write_text("# nothing\n\n")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "notimage.jsonl").write_text(json.dumps({**good, "result": "notes.txt"}) + "\n")
    names = {"BAD": "bad.jsonl", "MISSING": "missing.jsonl", "NORESULT": "noresult.jsonl", "EMPTY": "empty.jsonl",
             "NOTIMAGE": "notimage.jsonl"}
    args = [a.split("=")[0] + "=" + str(tmp_path / names[a.split("=")[1]]) if a.split("=")[-1] in names else a
            for a in args]
    proc = run_module("launch.evaluate", "--config=smoke", *args, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert expected.format(tmp_path) in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "scores.json").exists()


def test_evaluate_keeps_earlier_scores_unless_overwrite(edited, tmp_path):
    out, _, _ = edited
    before = (out / "scores.json").read_bytes()
    proc = run_module("launch.evaluate", "--config=smoke", f"--results={out}", timeout=300)
    assert proc.returncode == 2 and "scores.json already exists: pass --overwrite" in proc.stderr
    assert (out / "scores.json").read_bytes() == before


def test_rank_by_reorders_an_edit_s_results_and_the_default_keeps_the_reference_order(program_flags, monkeypatch,
                                                                                      image_file, tmp_path, capsys):
    """FakeRun: sample k's distance is 1 / (k + 1) (later samples first) and its clip_whole 1 + k / 100
    (earlier samples first)."""
    common = ["--prompt=a cat", f"--init_image={image_file}", "--num_samples=3", "--batch_size=2"]
    assert run_program(program_flags, monkeypatch, "edit", [*common, f"--output_dir={tmp_path / 'a'}"]) == 0
    assert run_program(program_flags, monkeypatch, "edit", [*common, f"--output_dir={tmp_path / 'b'}",
                                                             "--rank_by=clip_whole"]) == 0
    default, whole = strict_json(tmp_path / "a" / "report.json"), strict_json(tmp_path / "b" / "report.json")
    assert [s["sample_id"] for s in default["samples"]] == [2, 1, 0]
    assert sorted(os.listdir(tmp_path / "a" / "ranked")) == ["000_0.3333.png", "001_0.5000.png", "002_1.0000.png"]
    assert [s["sample_id"] for s in whole["samples"]] == [0, 1, 2] and whole["rank_by"] == "clip_whole"
    assert sorted(os.listdir(tmp_path / "b" / "ranked")) == ["000_1.0000.png", "001_1.0100.png", "002_1.0200.png"]
    assert [s["distance"] for s in whole["samples"]] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "best clip_whole values 1.0000, 1.0100, 1.0200" in capsys.readouterr().out
    status = run_program(program_flags, monkeypatch, "edit", [*common, f"--output_dir={tmp_path / 'c'}",
                                                               "--rank_by=whole"])
    err = capsys.readouterr().err
    assert status == 2 and "--rank_by='whole' must be one of clip_masked, clip_whole, combined" in err
    assert not (tmp_path / "c").exists()
