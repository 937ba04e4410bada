"""Converted weights are checked when loaded: the digest recorded at conversion (flipped bytes),
NaN or infinite values, the stored config (damaged JSON, wrong types) and the size the run asks
for; each problem is one line naming the file and the fix, exit status 2 in the launch programs.
The checkpoints are the smoke preset's tiny random networks, converted with `checkpoint.save`."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from absl.testing import flagsaver
from PIL import Image
from safetensors.numpy import save_file

from bdjax import checkpoint, smoke
from bdjax.editor import BlendedDiffusion
from bdjax.models import clip as clip_lib
from bdjax.models import lpips as lpips_lib
from bdjax.models import unet as unet_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = "python -m checkpoints_convert.fetch --force"
SIZE = 256  # the UNet's config says 256, so the launch programs' default size accepts it


@pytest.fixture(scope="module")
def nets():
    return smoke.networks(image_size=SIZE)


@pytest.fixture(scope="module")
def base(nets, tmp_path_factory):
    """A directory of converted unet, clip and lpips checkpoints (never modified: tests copy it)."""
    directory = str(tmp_path_factory.mktemp("weights") / "w")
    checkpoint.save(directory, "unet", checkpoint.flatten(nets["unet"][1]),
                    unet_lib.config_to_json(smoke.unet_config(SIZE)), model="unet")
    checkpoint.save(directory, "clip", checkpoint.flatten(nets["clip"][1]), smoke.CLIP_CONFIG, model="clip")
    checkpoint.save(directory, "lpips", checkpoint.flatten(nets["lpips"][1]), lpips_lib.CONFIG, model="lpips")
    return directory


def copy(base, tmp_path) -> str:
    return shutil.copytree(base, str(tmp_path / "w"))


def flip_last_mantissa_bit(path: str) -> None:
    """Flip the lowest bit of the last float32 in the file: a finite value changes by one ulp."""
    data = bytearray(open(path, "rb").read())
    data[-4] ^= 1
    open(path, "wb").write(bytes(data))


def edit_json(path: str, change) -> None:
    with open(path) as f:
        meta = json.load(f)
    with open(path, "w") as f:
        json.dump(change(meta), f)


def assert_one_line(error: Exception, path: str, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message and path in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_digest_is_recorded_and_identifies_the_editors_weights(base, nets):
    config, flat = checkpoint.read(base, "unet", model="unet")
    meta = json.loads(open(os.path.join(base, "unet.json")).read())
    assert meta[checkpoint.DIGEST_KEY] == checkpoint.digest(flat)
    assert checkpoint.digest(flat) == checkpoint.digest(checkpoint.flatten(nets["unet"][1]))
    changed = {**flat, "out_2/bias": flat["out_2/bias"] + 1}
    assert checkpoint.digest(changed) != checkpoint.digest(flat)

    loaded = BlendedDiffusion.from_pretrained(base)  # LPIPS is present, so loaded
    direct = BlendedDiffusion(nets["unet"], nets["clip"], nets["lpips"])  # digest computed from the arrays
    assert len(loaded.weights_digest) == 16 and int(loaded.weights_digest, 16) >= 0
    assert loaded.weights_digest == direct.weights_digest
    without = BlendedDiffusion.from_pretrained(base, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, with_lpips=False)
    assert without.models.lpips is None
    # The recorded digests identify the weights whatever precision they are loaded at.
    assert without.weights_digest == BlendedDiffusion(nets["unet"], nets["clip"]).weights_digest
    assert without.weights_digest != loaded.weights_digest


def test_flipped_byte_is_detected_and_verify_false_skips_the_check(base, tmp_path):
    directory = copy(base, tmp_path)
    weights = os.path.join(directory, "clip.safetensors")
    flip_last_mantissa_bit(weights)
    with pytest.raises(checkpoint.CheckpointError) as error:
        clip_lib.load(directory)
    assert_one_line(error.value, weights, "do not match the digest recorded in", "clip.json", FIX,
                    "python -m checkpoints_convert.clip")
    _, flipped = clip_lib.load(directory, verify=False)
    _, original = clip_lib.load(base)
    diff = [k for k, v in checkpoint.flatten(flipped).items()
            if not np.array_equal(v, checkpoint.flatten(original)[k])]
    assert len(diff) == 1


@pytest.fixture
def launch_flags():
    """The launch programs' flags (defined once per process), parsed, restored afterwards."""
    from launch import extrapolate

    if "strip" not in flags.FLAGS:  # extrapolate's flags include edit's and the shared ones
        extrapolate.define_flags()
    parsed = flags.FLAGS.is_parsed()
    if not parsed:
        flags.FLAGS(["test"])
    with flagsaver.flagsaver(allow_cpu=True):  # the real-config loaders run on this CPU
        yield flags.FLAGS
    if not parsed:
        flags.FLAGS.unparse_flags()


def test_verify_weights_flag_and_requested_size_reach_the_loaders(base, tmp_path, launch_flags):
    """--verify_weights and --model_output_size go through runtime.build_editor to the loaders;
    LPIPS, damaged here, is not read by a run that does not need it."""
    from launch import runtime

    directory = copy(base, tmp_path)
    flip_last_mantissa_bit(os.path.join(directory, "clip.safetensors"))
    lpips_weights = os.path.join(directory, "lpips.safetensors")
    open(lpips_weights, "r+b").truncate(1000)
    launch_flags.checkpoint_dir = directory
    with pytest.raises(checkpoint.CheckpointError, match="do not match the digest"):
        runtime.build_editor(need_lpips=False)
    launch_flags.verify_weights = False
    editor = runtime.build_editor(need_lpips=False)
    assert editor.models.lpips is None and editor.image_size == SIZE
    with pytest.raises(checkpoint.CheckpointError) as error:
        runtime.build_editor(need_lpips=True)
    assert_one_line(error.value, lpips_weights, "not a readable safetensors file", FIX)

    launch_flags.model_output_size = "512"
    with pytest.raises(checkpoint.CheckpointError) as error:
        runtime.build_editor(need_lpips=False)
    assert_one_line(error.value, os.path.join(directory, "unet.json"), "holds a UNet for 256x256 images",
                    "asks for 512x512 (--model_output_size=512)", "--preset=adm512_cond")


def test_checkpoint_without_digest_loads_with_one_warning(base, tmp_path):
    directory = copy(base, tmp_path)
    for name in ("unet", "clip"):
        edit_json(os.path.join(directory, f"{name}.json"), lambda m: {k: v for k, v in m.items()
                                                                      if k != checkpoint.DIGEST_KEY})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        editor = BlendedDiffusion.from_pretrained(directory, with_lpips=False)
        BlendedDiffusion.from_pretrained(directory, with_lpips=False)  # warned once per file only
    unverified = [str(w.message) for w in caught if issubclass(w.category, checkpoint.UnverifiedCheckpointWarning)]
    assert len(unverified) == 2, unverified
    for name, message in zip(("unet", "clip"), unverified):
        assert os.path.join(directory, f"{name}.safetensors") in message and "unverified" in message
        assert f"python -m checkpoints_convert.{name}" in message and FIX in message
    # Its identity is the digest of its float32 tensors, as a reconversion would record it.
    recorded = {name: checkpoint.recorded_digest(base, name, model=name) for name in ("unet", "clip")}
    assert editor.weights_digest == checkpoint.weights_digest(recorded)


def test_non_finite_weights_are_refused(base, tmp_path):
    config, flat = checkpoint.read(base, "clip", model="clip")
    bad = {**flat, "logit_scale": np.float32(np.nan) * flat["logit_scale"]}
    with pytest.raises(ValueError, match=r"refusing to write .*clip.safetensors: 1 tensor\(s\) hold NaN"):
        checkpoint.save(str(tmp_path / "refused"), "clip", bad, config, model="clip")
    assert not (tmp_path / "refused").exists()

    # Written some other way, with a matching digest: loading still refuses them.
    directory = copy(base, tmp_path)
    key = "visual/conv1/kernel"
    kernel = flat[key].copy()
    kernel[0, 0, 0, 0] = np.inf
    bad = {**flat, key: kernel}
    save_file(bad, os.path.join(directory, "clip.safetensors"))
    edit_json(os.path.join(directory, "clip.json"), lambda m: {**m, checkpoint.DIGEST_KEY: checkpoint.digest(bad)})
    for verify in (True, False):
        with pytest.raises(checkpoint.CheckpointError) as error:
            clip_lib.load(directory, verify=verify)
        assert_one_line(error.value, os.path.join(directory, "clip.safetensors"),
                        f"1 tensor(s) hold NaN or infinite values ({key})", FIX)


@pytest.mark.parametrize("dtype", ["int8", "float16", "bfloat16", "complex64"])
def test_tensor_of_another_dtype_is_refused(base, tmp_path, dtype):
    """Right keys and shapes and a matching digest, but a dtype the converters never write (they
    write float32): refused, naming the tensor, not cast into a network that differs."""
    directory = copy(base, tmp_path)
    weights = os.path.join(directory, "clip.safetensors")
    _, flat = checkpoint.read(base, "clip", model="clip")
    key = "visual/conv1/kernel"
    bad = {**flat, key: flat[key].astype(jnp.dtype(dtype))}
    save_file(bad, weights)
    edit_json(os.path.join(directory, "clip.json"), lambda m: {**m, checkpoint.DIGEST_KEY: checkpoint.digest(bad)})
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        clip_lib.load(directory)
    assert_one_line(error.value, weights, f"{key} {dtype} (expected float32)", FIX)


def truncate(path):
    open(path, "r+b").truncate(os.path.getsize(path) // 2)


def garbage_header(path):
    data = bytearray(open(path, "rb").read())
    data[:8] = b"\x13\x37" * 4
    open(path, "wb").write(bytes(data))


def pickle_in_place(path):
    with open(path, "wb") as f:
        pickle.dump({"w": np.zeros(3, np.float32)}, f)


def directory_in_place(path):
    os.remove(path)
    os.makedirs(os.path.join(path, "inside"))


def write(text: str | bytes):
    def damage(path):
        open(path, "wb").write(text.encode() if isinstance(text, str) else text)
    return damage


def meta(change):
    return lambda path: edit_json(path, change)


def config(change):
    return meta(lambda m: {**m, "config": change(dict(m["config"]))})


DAMAGE = {  # id: (file, damage, what the message says)
    "truncated": ("clip.safetensors", truncate, "not a readable safetensors file, truncated or damaged"),
    "empty": ("clip.safetensors", write(b""), "not a readable safetensors file"),
    "garbage_header": ("unet.safetensors", garbage_header, "not a readable safetensors file"),
    "pickle_renamed": ("unet.safetensors", pickle_in_place, "not a readable safetensors file"),
    "directory_weights": ("clip.safetensors", directory_in_place, "is a directory, not a file"),
    "directory_json": ("unet.json", directory_in_place, "is a directory, not a file"),
    "invalid_json": ("unet.json", write('{"format": "bdjax-converted'), "is not valid JSON"),
    "deep_json": ("unet.json", write("[" * 100_000), "nested more than 64 levels deep"),
    "large_json": ("clip.json", meta(lambda m: {**m, "source": " " * checkpoint.MAX_JSON_BYTES}),
                   f"is larger than the {checkpoint.MAX_JSON_BYTES:,} bytes"),
    "binary_json": ("clip.json", write(b"\xff\xfe\x00\x81"), "is not valid JSON"),
    "json_list": ("unet.json", write("[1, 2]"), "holds a JSON list, not an object"),
    "no_config": ("clip.json", meta(lambda m: {k: v for k, v in m.items() if k != "config"}), "has no `config`"),
    "config_not_object": ("unet.json", meta(lambda m: {**m, "config": "adm256"}), "has a str as `config`"),
    "wrong_model": ("unet.json", meta(lambda m: {**m, "model": "clip"}), "is not a converted unet checkpoint"),
    "malformed_digest": ("clip.json", meta(lambda m: {**m, checkpoint.DIGEST_KEY: 42}), "malformed `tensors_sha256`"),
    "field_type": ("unet.json", config(lambda c: {**c, "image_size": "256"}),
                   "field image_size='256' is not of type int"),
    "field_bool": ("clip.json", config(lambda c: {**c, "vision_layers": True}),
                   "vision_layers=True is not of type int"),
    "unknown_field": ("unet.json", config(lambda c: {**c, "colour": 3}), "unknown UNetModel field(s) ['colour']"),
    "missing_field": ("clip.json", config(lambda c: {k: v for k, v in c.items() if k != "embed_dim"}),
                      "differ from the module's"),
    "impossible_value": ("unet.json", config(lambda c: {**c, "num_head_channels": 7}), "not describe a valid unet"),
    "lpips_config": ("lpips.json", config(lambda c: {**c, "net": "alex"}), "expected LPIPS config"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_checkpoint_is_one_line_error(base, tmp_path, case):
    name, damage, fragment = DAMAGE[case]
    directory = copy(base, tmp_path)
    path = os.path.join(directory, name)
    damage(path)
    with pytest.raises(checkpoint.CheckpointError) as error:
        BlendedDiffusion.from_pretrained(directory, with_lpips=name.startswith("lpips"))
    model = name.split(".")[0]
    assert_one_line(error.value, path, fragment, FIX, f"python -m checkpoints_convert.{model}")


def test_damaged_lpips_does_not_stop_a_run_without_the_lpips_loss(base, tmp_path):
    directory = copy(base, tmp_path)
    truncate(os.path.join(directory, "lpips.safetensors"))
    editor = BlendedDiffusion.from_pretrained(directory, with_lpips=False)
    assert editor.models.lpips is None
    editor.options(background_preservation_loss=True, lpips_sim_lambda=0)  # L2 only: fine
    with pytest.raises(ValueError, match=r"needs the LPIPS weights.*with_lpips=True.*lpips_sim_lambda=0"):
        editor.options(background_preservation_loss=True)
    with pytest.raises(checkpoint.CheckpointError, match="lpips.safetensors: is not a readable safetensors"):
        BlendedDiffusion.from_pretrained(directory, with_lpips=True)


def run(module: str, *args):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def listing(directory) -> dict:
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))}


def test_launch_program_exits_2_with_one_line_and_leaves_the_output_dir(base, tmp_path):
    Image.fromarray(np.full((40, 60, 3), 120, np.uint8)).save(tmp_path / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's file")
    for name, damage, fragment in (("clip.safetensors", truncate, "not a readable safetensors file"),
                                   ("unet.json", write("[]"), "holds a JSON list, not an object")):
        directory = str(tmp_path / name)
        shutil.copytree(base, directory)
        damage(os.path.join(directory, name))
        before = listing(out)
        proc = run("launch.edit", f"--checkpoint_dir={directory}", "--prompt=x", f"--init_image={tmp_path / 'img.png'}",
                   f"--output_dir={out}", "--nocompilation_cache", "--allow_cpu")
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {os.path.join(directory, name)}: "), proc.stderr
        assert fragment in lines[0] and FIX in lines[0]
        assert listing(out) == before


def test_converter_output_under_a_file_is_one_line_error(tmp_path):
    (tmp_path / "somefile").write_text("keep me")
    target = tmp_path / "somefile" / "dir"
    with pytest.raises(NotADirectoryError, match="is a file, not a directory; choose another output directory"):
        checkpoint.ensure_writable(str(target), "unet", overwrite=False)
    proc = run("checkpoints_convert.unet", f"--input={tmp_path / 'model.pt'}", f"--output={target}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot write to") and "is a file" in lines[0], proc.stderr
    assert (tmp_path / "somefile").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["somefile"]
