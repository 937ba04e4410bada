"""Every command of the README's Recipes, and of examples/README.md, runs as written at the smoke
config.

The commands are read from README.md (its "## Recipes" section, before the deployment notes that
start at "### GPUs"), so the README and this test cannot drift apart. Each gets what the README
says to add to check a command without weights (read from the same section): the smoke config, 2
samples and 5 steps for the edits and the extrapolation, the smoke config and 5 steps for the
batch manifest (which sets its own sample counts).
Commands run from a directory holding the repository's examples/, so their relative output
folders stay inside the test's temporary directory.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from PIL import Image

from bdjax import smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipes() -> str:
    """The README's Recipes section, up to its deployment notes."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return text[text.index("\n## Recipes\n"):text.index("\n### GPUs\n")]


def examples_readme() -> str:
    with open(os.path.join(ROOT, "examples", "README.md"), encoding="utf-8") as f:
        return f.read()


def recipe_commands(section: str | None = None) -> list[list[str]]:
    """The `python -m launch.*` commands of `section` (default: the README's Recipes), as
    argument lists."""
    section = recipes() if section is None else section
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] and words[:2] == ["python", "-m"] and words[2].startswith("launch."):
                commands.append(words[2:])
    return commands


def smoke_flags(program: str, section: str | None = None) -> list[str]:
    """What `section` (default: the README's Recipes) says to add ("Add `FLAGS` to any of them
    (only `FLAGS` to the batch"); added last, so it wins over the command's own values."""
    section = recipes() if section is None else section
    said = re.search(r"Add `([^`]+)` to any of them \(only `([^`]+)` to the batch", " ".join(section.split()))
    assert said, "the section no longer says what to add for a smoke check"
    return shlex.split(said.group(2) if program == "launch.batch_edit" else said.group(1))


def test_the_smoke_check_is_quick_and_labelled():
    """What the README says to add runs the smoke networks, 2 samples, 5 steps."""
    assert smoke_flags("launch.edit") == ["--config=smoke", "--num_samples=2", "--skip_timesteps=20"]
    assert smoke_flags("launch.batch_edit") == ["--config=smoke", "--skip_timesteps=20"]


def test_the_readme_has_the_recipes_it_describes():
    programs = [command[0] for command in recipe_commands()]
    assert programs.count("launch.edit") == 5 and programs.count("launch.extrapolate") == 1
    assert programs.count("launch.batch_edit") == 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the examples, and a weights cache whose compiled programs are
    the test run's own (BDJAX_CACHE/xla_cache), so recipes share what they compile."""
    directory = tmp_path_factory.mktemp("recipes")
    os.symlink(os.path.join(ROOT, "examples"), directory / "examples")
    cache = directory / "bdjax_cache"
    cache.mkdir()
    from jax import config

    os.symlink(config.jax_compilation_cache_dir, cache / "xla_cache")
    return directory


def output_dir(args: list[str]) -> str:
    return [arg.split("=", 1)[1] for arg in args if arg.startswith("--output_dir=")][-1]


def test_examples_say_what_the_readme_says_to_add_for_a_smoke_check():
    """examples/README.md's advice for trying its commands without weights is the README's, which
    the tests run; its commands are the README's recipes (run below) or run on their own."""
    for program in ("launch.edit", "launch.extrapolate", "launch.batch_edit"):
        assert smoke_flags(program, examples_readme()) == smoke_flags(program)
    assert len(recipe_commands(examples_readme())) == 6


def examples_only() -> list[list[str]]:
    """examples/README.md's commands that are not among the README's recipes."""
    return [c for c in recipe_commands(examples_readme()) if c not in recipe_commands()]


@pytest.mark.parametrize("command", recipe_commands() + examples_only(), ids=lambda c: output_dir(c))
def test_recipe_runs_as_written_at_the_smoke_config(command, workdir):
    program, args = command[0], command[1:]
    env = {**os.environ, "PYTHONPATH": ROOT, "BDJAX_CACHE": str(workdir / "bdjax_cache"), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", program, *args, *smoke_flags(program)], cwd=workdir,
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert smoke.LABEL in proc.stdout  # every smoke run says what its images are
    out = workdir / output_dir(args)
    given = dict(a[2:].split("=", 1) for a in args if "=" in a)
    if "init_image" in given:
        with Image.open(workdir / given["init_image"]) as image:
            photo_size = image.size
    if program == "launch.edit":
        ranked = sorted(os.listdir(out / "ranked"))
        assert len(ranked) == 2 and (out / "grid.png").is_file()
        with Image.open(out / "ranked" / ranked[0]) as image:
            assert image.size == photo_size  # window mode: the photo comes back at its own size
        options = json.loads((out / "report.json").read_text())["options"]
        assert options["timestep_respacing"] == smoke.OPTIONS["timestep_respacing"] and options["skip_timesteps"] == 20
    elif program == "launch.extrapolate":
        width, height = photo_size
        repeats = int(given["repeats"])
        strip = int(given.get("strip", height // 4))  # the default strip: a quarter of the photo's height
        with Image.open(out / "extrapolated.png") as image:
            assert image.size == (width + 2 * strip * repeats, height)
    else:
        report = json.loads((out / "report.json").read_text())
        with open(os.path.join(ROOT, "examples", "jobs.jsonl"), encoding="utf-8") as f:
            jobs = [json.loads(line) for line in f if line.strip()]
        assert report["jobs"] == {"valid": len(jobs), "skipped_lines": []} and report["items"]["failed"] == 0
        for job in jobs:
            summary = json.loads((out / job["name"] / "ranked.json").read_text())
            assert len(summary["samples"]) == job["num_samples"] and (out / job["name"] / "grid.png").is_file()
