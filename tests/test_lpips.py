"""LPIPS parity: bdjax.models.lpips against lpips.LPIPS(net="vgg", version="0.1") (lpips 0.1.4).

The VGG16 trunk is torchvision's vgg16() with its default random initialisation (seed 0), saved
with torch.save like vgg16-397923af.pth and converted by checkpoints_convert.lpips; the linear
heads are the real v0.1 weights shipped in the lpips package. The reference gets the same trunk
weights loaded into lpips.LPIPS(pnet_rand=True), which builds an untrained trunk but still loads
the v0.1 heads.

Tolerances: float32 distances 1e-5 relative. Gradients with respect to the first image, as the
L2 norm of the difference over the L2 norm of the reference per image: 1e-10 in float64 (both
sides run the same network in float64; the issue asks for 1e-4). In float32 the gradient of this ReLU/max-pool network is
only defined to about 1e-3: a pre-activation or pooling near-tie within float32 rounding flips a
gradient path, and torch itself moves by 3e-4 between batch sizes 1 and 6 on the random pair at
64x64 (1e-3 to 4e-3 against bdjax at 256x256); so float32 gradients are held to 1e-2 and the
float64 run is the exact check.
"""

import copy
import os
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import lpips as lpips_torch
from bdjax import checkpoint
from bdjax.models import lpips
from checkpoints_convert import lpips as convert_lpips
from checkpoints_convert.common import ConversionError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIST_RTOL = 1e-5
GRAD_RTOL = 1e-10  # float64; measured 2e-14
GRAD_RTOL_F32 = 1e-2  # see the module docstring; measured 6e-6 to 3.3e-4
BF16_RTOL = 1e-2  # bfloat16 trunk activations vs float32, per distance; measured 1e-4 to 1e-3
BF16_GRAD_RTOL = 0.3  # the same for gradients (L2, per image); measured 0.13 to 0.17
PAIRS = ("random", "shifted", "blurred", "noised", "random swapped", "identical")


@pytest.fixture(scope="module")
def vgg_path(tmp_path_factory):
    """A random torchvision VGG16 state dict with the real key set (classifier included)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("torch") / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(vgg_path):
    model = lpips_torch.LPIPS(net="vgg", version="0.1", pnet_rand=True, verbose=False)
    features = {k: v for k, v in torch.load(vgg_path, weights_only=True).items()
                if k.startswith("features.")}
    # lpips keeps torchvision's indices inside its slices: features.N -> net.sliceK.N.
    slice_of = {i: k + 1 for k, indices in enumerate(lpips.VGG16_SLICES) for i in indices}
    model.net.load_state_dict({f"slice{slice_of[int(k.split('.')[1])]}.{k[len('features.'):]}": v
                               for k, v in features.items()})  # strict: every trunk key is set
    return model


@pytest.fixture(scope="module")
def converted(vgg_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    convert_lpips.convert(str(vgg_path), str(out))  # --lin defaults to lpips' own v0.1 vgg.pth
    return out


@pytest.fixture(scope="module")
def loaded(converted):
    return lpips.load(str(converted))


def structured_image(size, rng):
    """Smooth colour gradients plus hard edges (a disc and a bar), in [-1, 1], HWC."""
    y, x = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    img = np.zeros((size, size, 3))
    for c in range(3):
        for _ in range(3):
            fy, fx = rng.uniform(0.5, 4, 2)
            img[..., c] += rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * (fy * y + fx * x) + rng.uniform(0, 6.3))
    img[(y - 0.4) ** 2 + (x - 0.6) ** 2 < 0.05] += rng.uniform(-1, 1, 3)
    img[(np.abs(y - 0.75) < 0.06) & (x > 0.2)] -= rng.uniform(0, 1, 3)
    return np.tanh(img)


def box_blur(img, width):
    pad = width // 2
    for axis in (0, 1):
        padded = np.pad(img, [(pad, pad) if a == axis else (0, 0) for a in range(3)], mode="edge")
        img = sum(np.take(padded, np.arange(i, i + img.shape[axis]), axis=axis) for i in range(width)) / width
    return img


def image_pairs(size, seed, n_pairs=len(PAIRS)):
    """(in0, in1), NHWC float32 in [-1, 1], one row per name in PAIRS (the first n_pairs)."""
    rng = np.random.default_rng(seed)
    noise_a, noise_b = rng.uniform(-1, 1, (2, size, size, 3))
    scenes = [structured_image(size, rng) for _ in range(3)]
    in0 = [noise_a, scenes[0], scenes[1], scenes[2], noise_b, scenes[0]]
    in1 = [noise_b,
           np.roll(scenes[0], (size // 32, size // 16), axis=(0, 1)),
           box_blur(scenes[1], width=size // 8 + 1),
           np.clip(scenes[2] + 0.2 * rng.standard_normal(scenes[2].shape), -1, 1),
           noise_a,
           scenes[0]]
    return np.stack(in0[:n_pairs]).astype(np.float32), np.stack(in1[:n_pairs]).astype(np.float32)


def torch_value_and_grad(model, in0, in1):
    t0 = torch.from_numpy(in0).permute(0, 3, 1, 2).requires_grad_(True)
    t1 = torch.from_numpy(in1).permute(0, 3, 1, 2)
    dist = model(t0, t1).reshape(-1)
    dist.sum().backward()  # pairs are independent: row b of the gradient is d dist_b / d in0_b
    return dist.detach().numpy(), t0.grad.permute(0, 2, 3, 1).numpy()


@partial(jax.jit, static_argnums=0)
def jax_value_and_grad(module, params, in0, in1):
    dist, vjp = jax.vjp(lambda a: module.apply({"params": params}, a, in1), in0)
    return dist, vjp(jnp.ones_like(dist))[0]


def relative_errors(got, want):
    """Per image: |got - want|_2 / |want|_2."""
    axes = tuple(range(1, got.ndim))
    return np.sqrt(np.sum((got - want) ** 2, axes) / np.sum(want ** 2, axes))


@pytest.fixture(scope="module")
def float32_64(reference, loaded):
    """All six pairs at 64x64, float32, distances and gradients."""
    module, params = loaded
    in0, in1 = image_pairs(64, seed=64)
    want, want_grad = torch_value_and_grad(reference, in0, in1)
    got, got_grad = jax.device_get(jax_value_and_grad(module, params, in0, in1))
    return dict(in0=in0, in1=in1, want=want, want_grad=want_grad, got=got, got_grad=got_grad)


@pytest.fixture(scope="module")
def float32_256(reference, loaded):
    """The four distinct pairs at 256x256, float32 distances (gradients: see float64_256)."""
    module, params = loaded
    in0, in1 = image_pairs(256, seed=256, n_pairs=4)
    with torch.no_grad():
        want = reference(*(torch.from_numpy(x).permute(0, 3, 1, 2) for x in (in0, in1))).reshape(-1)
    got = jax.device_get(jax.jit(module.apply)({"params": params}, in0, in1))
    return dict(want=want.numpy(), got=got)


def float64_run(reference, converted, size, n_pairs):
    in0, in1 = (x.astype(np.float64) for x in image_pairs(size, seed=size, n_pairs=n_pairs))
    want, want_grad = torch_value_and_grad(copy.deepcopy(reference).double(), in0, in1)
    with jax.enable_x64(True):
        module, params = lpips.load(str(converted), dtype=jnp.float64, param_dtype=jnp.float64)
        got, got_grad = jax.device_get(jax_value_and_grad(module, params, in0, in1))
    assert got.dtype == got_grad.dtype == np.float64
    return dict(want=want, want_grad=want_grad, got=got, got_grad=got_grad)


@pytest.fixture(scope="module")
def float64_64(reference, converted):
    return float64_run(reference, converted, 64, n_pairs=4)


@pytest.fixture(scope="module")
def float64_256(reference, converted):
    return float64_run(reference, converted, 256, n_pairs=2)  # random and shifted: float64 is slow


def test_reference_is_meaningful(reference):
    """The random trunk neither vanishes nor explodes, and the heads are lpips' v0.1 weights."""
    _, in1 = image_pairs(64, seed=1)
    with torch.no_grad():
        taps = reference.net(reference.scaling_layer(torch.from_numpy(in1).permute(0, 3, 1, 2)))
    rms = [float(t.square().mean().sqrt()) for t in taps]
    assert all(0.03 < r < 30 for r in rms), rms
    heads = torch.load(convert_lpips.default_lin_path(), weights_only=True, map_location="cpu")
    np.testing.assert_array_equal(reference.lin0.model[1].weight.detach(), heads["lin0.model.1.weight"])


@pytest.mark.parametrize("run", ["float32_64", "float32_256"])
def test_distance_matches_lpips(run, request):
    result = request.getfixturevalue(run)
    want, got = result["want"][:4], result["got"][:4]
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=DIST_RTOL, atol=0)
    # Far enough apart to mean something, on the scale of real LPIPS values.
    assert np.all((want > 0.01) & (want < 10)), dict(zip(PAIRS, want))


@pytest.mark.parametrize("run", ["float64_64", "float64_256"])
def test_gradient_matches_lpips_float64(run, request):
    result = request.getfixturevalue(run)
    np.testing.assert_allclose(result["got"], result["want"], rtol=1e-12)
    errors = relative_errors(result["got_grad"], result["want_grad"])
    assert np.all(errors < GRAD_RTOL), dict(zip(PAIRS, errors))


def test_gradient_matches_lpips_float32(float32_64):
    errors = relative_errors(float32_64["got_grad"][:5], float32_64["want_grad"][:5])
    assert np.all(errors < GRAD_RTOL_F32), dict(zip(PAIRS, errors))


def test_identical_is_zero_and_symmetric(float32_64):
    """lpips gives exactly 0 for identical images; XLA may round the channel norms of the two
    images differently in the last bit, which leaves about 1e-16 (distances here are >= 0.01)."""
    got, grad = float32_64["got"], float32_64["got_grad"]
    assert float32_64["want"][5] == 0.0
    assert abs(got[5]) < 1e-12, got[5]
    assert np.abs(grad[5]).max() < 1e-6 * np.abs(grad[0]).max()
    np.testing.assert_allclose(got[4], got[0], rtol=1e-6)  # d(b, a) vs d(a, b)


def test_bfloat16_activations(loaded, float32_64):
    _, params = loaded
    module = lpips.LPIPS(dtype=jnp.bfloat16)
    got, grad = jax.device_get(jax_value_and_grad(module, params, float32_64["in0"], float32_64["in1"]))
    assert got.dtype == grad.dtype == np.float32
    np.testing.assert_allclose(got[:5], float32_64["got"][:5], rtol=BF16_RTOL)
    assert abs(got[5]) < 1e-12
    errors = relative_errors(grad[:5], float32_64["got_grad"][:5])
    assert np.all(errors < BF16_GRAD_RTOL), dict(zip(PAIRS, errors))


def test_converted_files(converted):
    config, flat = checkpoint.read(str(converted), "lpips", model="lpips")
    assert config == {"net": "vgg16", "version": "0.1"}
    assert len(flat) == 13 * 2 + 5  # 13 convs with bias, 5 heads; classifier keys dropped
    assert flat["net/features_0/kernel"].shape == (3, 3, 3, 64)
    assert flat["lin4/kernel"].shape == (1, 1, 512, 1)


def test_wrong_checkpoint_names_missing_keys(tmp_path):
    torch.manual_seed(0)
    wrong = tmp_path / "squeezenet.pth"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), wrong)
    out = tmp_path / "out"
    with pytest.raises(checkpoint.CheckpointMismatchError) as e:
        convert_lpips.convert(str(wrong), str(out))
    assert "net/features_28/kernel" in e.value.missing
    assert "features.3.squeeze.weight" in e.value.unexpected
    assert "missing key(s): net/features_10/bias" in str(e.value)  # the message names them
    assert not out.exists() or not os.listdir(out)


def test_lin_default_needs_lpips(monkeypatch):
    monkeypatch.setattr(convert_lpips.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConversionError, match="lpips package is not installed.*--lin"):
        convert_lpips.default_lin_path()


def test_existing_output_refused(vgg_path, converted):
    before = {p: os.path.getmtime(p) for p in checkpoint.paths(str(converted), "lpips")}
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_lpips.convert(str(vgg_path), str(converted))
    assert before == {p: os.path.getmtime(p) for p in before}
    convert_lpips.convert(str(vgg_path), str(converted), overwrite=True)
    assert all(os.path.getmtime(p) >= t for p, t in before.items())
    lpips.load(str(converted))


def test_cli_truncated_file_one_line_error(vgg_path, tmp_path):
    truncated = tmp_path / "vgg16-truncated.pth"
    with open(vgg_path, "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "checkpoints_convert.lpips", f"--vgg={truncated}", f"--output={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(truncated) in lines[0], proc.stderr
    assert not out.exists()
