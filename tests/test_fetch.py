"""checkpoints_convert.fetch against a local HTTP server on 127.0.0.1 serving fabricated checkpoints.

The files have the official names and the real key sets but tiny shapes where the converters allow
it (a tiny guided-diffusion UNet, whose config is injected into fetch.RECIPES; a tiny clip-anytorch
CLIP as a TorchScript archive like ViT-B-16.pt; VGG16's `features` convolutions at full size,
random, without the 120M-parameter classifier). $BDJAX_WEIGHTS_URL points fetch at the server and
the expected hashes in fetch.SOURCES are replaced by those of the fabricated files.
"""

import dataclasses
import errno
import hashlib
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import stat
import time

import numpy as np
import pytest
import torch

clip_model = pytest.importorskip("clip.model")  # clip-anytorch
from guided_diffusion.unet import UNetModel as TorchUNet  # noqa: E402

from bdjax.models import clip as bdclip  # noqa: E402
from bdjax.models import lpips as bdlpips  # noqa: E402
from bdjax.models import unet as bdunet  # noqa: E402
from bdjax.files import TMP_PREFIX  # noqa: E402
from checkpoints_convert import fetch  # noqa: E402
from checkpoints_convert.common import cli  # noqa: E402
from test_convert_robust import DISK_ERRORS, failing_writes  # noqa: E402

# Tracing the tiny CLIP and reading it back warn about TorchScript; those warnings are torch's.
pytestmark = [pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
              pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNET = dict(image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=1,
            attention_resolutions=(2,), channel_mult=(1, 2), num_classes=None, num_heads=2,
            num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True,
            resblock_updown=True, use_new_attention_order=False)
UNET_512 = dict(UNET, num_classes=10, channel_mult=(0.5, 1, 1), model_channels=64)
CLIP = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
            context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
            transformer_layers=2)
VGG16_FEATURES = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
DROP_AFTER = 4096  # bytes a dropping server sends before closing the connection


# ---- fabricated files -----------------------------------------------------------------------

def vgg16_state_dict(seed: int) -> dict:
    """torchvision vgg16().state_dict() key names and `features` shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    state, index, channels = {}, 0, 3
    for v in VGG16_FEATURES:
        if v == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = 0.05 * torch.randn(v, channels, 3, 3, generator=gen)
        state[f"features.{index}.bias"] = 0.05 * torch.randn(v, generator=gen)
        index, channels = index + 2, v
    state["classifier.6.bias"] = torch.zeros(1000)  # the converter drops classifier.*
    return state


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{official file name: bytes}, plus the torch state dicts to compare against."""
    root = tmp_path_factory.mktemp("fabricated")
    torch.manual_seed(0)
    unet256 = TorchUNet(**UNET).eval().state_dict()
    unet512 = TorchUNet(**UNET_512).eval().state_dict()
    model = clip_model.CLIP(**CLIP).eval()
    vgg = vgg16_state_dict(seed=1)
    torch.save(unet256, root / "256x256_diffusion_uncond.pt")
    torch.save(unet512, root / "512x512_diffusion.pt")
    torch.save(vgg, root / "vgg16-397923af.pth")
    example = (torch.rand(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long))
    with torch.no_grad():  # a TorchScript archive, as OpenAI's ViT-B-16.pt is
        torch.jit.trace(model, example, check_trace=False).save(str(root / "ViT-B-16.pt"))
    data = {p.name: p.read_bytes() for p in root.iterdir()}
    return data, dict(adm256=unet256, adm512=unet512, clip=model.state_dict(), vgg16=vgg)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.ignore_range; with
    server.drop_after set, the first response for each file stops after that many bytes.
    server.pace = (seconds, piece) sends the body `piece` bytes at a time with a pause before
    each (server.trickle_headers: the status line and then a header line of a minute, one byte
    at a time); server.bogus_range answers with HTTP 206 and that Content-Range: for Range
    requests only when it is "range", else always. server.endless sends a body without a
    Content-Length that never ends; server.announce is the Content-Length sent instead of the
    true one."""

    def do_GET(self):
        server = self.server
        name, range_header = self.path.lstrip("/"), self.headers.get("Range")
        server.requests.append((name, range_header))
        if name not in server.files:
            self.send_error(404)
            return
        data, start = server.files[name], 0
        if server.bogus_range and (range_header or server.bogus_range_always):
            self.send_response(206)
            self.send_header("Content-Range", server.bogus_range)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if server.endless:
            self.send_response(200)
            self.end_headers()
            while not server.stopping.is_set():  # until the client hangs up
                self.wfile.write(bytes(64 << 10))
            return
        if server.trickle_headers:
            for byte in b"HTTP/1.1 200 OK\r\nX-Pad: " + b"." * int(60 / server.pace[0]):
                if server.stopping.wait(server.pace[0]):
                    return
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            return
        if range_header and not server.ignore_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", range_header)[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(server.announce or len(body)))
        self.end_headers()
        if server.pace is not None:
            seconds, piece = server.pace
            for i in range(0, len(body), piece):
                if server.stopping.wait(seconds):
                    return
                self.wfile.write(body[i:i + piece])
                self.wfile.flush()
            return
        if server.drop_after is not None and name not in server.dropped:
            server.dropped.add(name)
            self.wfile.write(body[:server.drop_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-file, as a lost connection
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A client that hangs up mid-answer (as fetch does with a trickling server) is expected
        here; anything else is printed as usual."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def server(files, monkeypatch):
    """A running server, $BDJAX_WEIGHTS_URL pointing at it, and hashes of the fabricated files."""
    data, _ = files
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.ignore_range = dict(data), [], False
    httpd.drop_after, httpd.dropped = None, set()
    httpd.pace, httpd.trickle_headers, httpd.bogus_range, httpd.bogus_range_always = None, False, None, False
    httpd.endless, httpd.announce = False, None
    httpd.stopping = threading.Event()  # ends paced responses at teardown
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(fetch.BASE_URL_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.delenv(fetch.CACHE_ENV, raising=False)
    for key, source in fetch.SOURCES.items():
        digest = hashlib.sha256(data[source.filename]).hexdigest()
        replaced = dataclasses.replace(source, sha256=digest if source.sha256 else None,
                                       sha256_prefix=digest[:8] if source.sha256_prefix else None)
        monkeypatch.setitem(fetch.SOURCES, key, replaced)
    monkeypatch.setitem(fetch.RECIPES, "adm256", dataclasses.replace(fetch.RECIPES["adm256"], unet_config=UNET))
    monkeypatch.setitem(fetch.RECIPES, "adm512", dataclasses.replace(fetch.RECIPES["adm512"], unet_config=UNET_512))
    yield httpd
    httpd.stopping.set()
    httpd.shutdown()
    httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- tests ----------------------------------------------------------------------------------

def test_full_fetch_converts_and_loads_everything(server, files, tmp_path):
    data, torch_state = files
    cache = str(tmp_path / "cache")
    assert fetch.fetch(cache, ["adm256", "clip", "lpips", "adm512"], progress=False) == cache

    module, params = bdunet.load(cache)
    assert module.model_channels == 32
    np.testing.assert_array_equal(params["out_2"]["kernel"],
                                  torch_state["adm256"]["out.2.weight"].permute(2, 3, 1, 0).numpy())
    module, params = bdunet.load(os.path.join(cache, "adm512"))  # the 512 model lives apart
    assert module.num_classes == 10
    np.testing.assert_array_equal(params["label_emb"]["embedding"], torch_state["adm512"]["label_emb.weight"].numpy())
    _, params = bdclip.load(cache)
    np.testing.assert_array_equal(params["visual"]["conv1"]["kernel"],
                                  torch_state["clip"]["visual.conv1.weight"].permute(2, 3, 1, 0).numpy())
    _, params = bdlpips.load(cache)
    np.testing.assert_array_equal(params["net"]["features_28"]["kernel"],
                                  torch_state["vgg16"]["features.28.weight"].permute(2, 3, 1, 0).numpy())

    # Raw files kept, each fetched once with no Range, no .part left, all recorded in the manifest.
    assert sorted(os.listdir(os.path.join(cache, "downloads"))) == sorted(data)
    assert sorted(name for name, _ in server.requests) == sorted(data)
    assert all(r is None for _, r in server.requests)
    manifest = json.loads(open(os.path.join(cache, "manifest.json")).read())
    for name, content in data.items():
        entry = manifest["files"][name]
        assert entry["sha256"] == sha(content) and entry["size"] == len(content)
    assert manifest["files"]["512x512_diffusion.pt"]["verification"].startswith("not verified")
    assert manifest["files"]["ViT-B-16.pt"]["verification"].startswith("sha256 verified")
    assert manifest["files"]["vgg16-397923af.pth"]["verification"].startswith("sha256 prefix")
    assert manifest["models"]["adm512"]["files"] == ["adm512/unet.safetensors", "adm512/unet.json"]

    # A second run, and ensure_weights, make no request at all.
    server.requests.clear()
    mtime = os.path.getmtime(os.path.join(cache, "unet.safetensors"))
    assert fetch.fetch(cache, ["adm256", "clip", "lpips", "adm512"], progress=False) == cache
    assert fetch.ensure_weights(cache, ["adm256", "clip", "lpips"], download=False) == cache
    assert server.requests == []
    assert os.path.getmtime(os.path.join(cache, "unet.safetensors")) == mtime

    # --force reconverts from the kept download, still without the network.
    fetch.fetch(cache, ["adm256"], force=True, progress=False)
    assert server.requests == []
    assert os.path.getmtime(os.path.join(cache, "unet.safetensors")) >= mtime


def test_interrupted_download_resumes_with_range(server, files, tmp_path):
    data, _ = files
    source = fetch.SOURCES["adm256"]
    url, dest = fetch.source_url(source), str(tmp_path / source.filename)
    server.drop_after = DROP_AFTER
    with pytest.raises(fetch.FetchError, match="interrupted.*run the same command again to resume"):
        fetch.download(url, dest, source, retries=0, progress=False)
    assert os.path.getsize(dest + ".part") == DROP_AFTER and not os.path.exists(dest)

    assert fetch.download(url, dest, source, progress=False) == sha(data[source.filename])
    assert server.requests == [(source.filename, None), (source.filename, f"bytes={DROP_AFTER}-")]
    assert open(dest, "rb").read() == data[source.filename] and not os.path.exists(dest + ".part")


def test_fetch_retries_a_dropped_connection_by_itself(server, files, tmp_path):
    data, _ = files
    server.drop_after = DROP_AFTER
    cache = fetch.fetch(str(tmp_path), ["clip"], progress=False)
    assert server.requests == [("ViT-B-16.pt", None), ("ViT-B-16.pt", f"bytes={DROP_AFTER}-")]
    assert open(os.path.join(cache, "downloads", "ViT-B-16.pt"), "rb").read() == data["ViT-B-16.pt"]
    assert fetch.is_converted(cache, "clip")


def test_server_ignoring_range_restarts_from_zero(server, files, tmp_path):
    data, _ = files
    source = fetch.SOURCES["adm256"]
    url, dest = fetch.source_url(source), str(tmp_path / source.filename)
    with open(dest + ".part", "wb") as f:
        f.write(b"\xff" * DROP_AFTER)  # not the file's first bytes: appending would corrupt it
    server.ignore_range = True
    assert fetch.download(url, dest, source, progress=False) == sha(data[source.filename])
    assert server.requests == [(source.filename, f"bytes={DROP_AFTER}-")]
    assert open(dest, "rb").read() == data[source.filename]


def test_complete_part_is_not_downloaded_again(server, files, tmp_path):
    data, _ = files
    source = fetch.SOURCES["adm256"]
    dest = str(tmp_path / source.filename)
    with open(dest + ".part", "wb") as f:  # a run that died between the last byte and the rename
        f.write(data[source.filename])
    assert fetch.download(fetch.source_url(source), dest, source, progress=False) == sha(data[source.filename])
    assert server.requests == [(source.filename, f"bytes={len(data[source.filename])}-")]  # answered 416


def test_sha256_mismatch_leaves_nothing(server, files, tmp_path, monkeypatch):
    data, _ = files
    wrong = "0" * 64
    monkeypatch.setitem(fetch.SOURCES, "clip", dataclasses.replace(fetch.SOURCES["clip"], sha256=wrong))
    with pytest.raises(fetch.FetchError) as error:
        fetch.fetch(str(tmp_path), ["clip"], progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert "ViT-B-16.pt" in message and wrong in message and sha(data["ViT-B-16.pt"]) in message
    assert os.listdir(tmp_path / "downloads") == []  # no .part, no file
    assert not os.path.exists(tmp_path / "clip.safetensors")


def test_prefix_mismatch_of_a_placed_file_is_refused(server, tmp_path):
    os.makedirs(tmp_path / "downloads")
    (tmp_path / "downloads" / "vgg16-397923af.pth").write_bytes(b"not vgg16")
    with pytest.raises(fetch.FetchError, match=r"vgg16-397923af.pth has sha256 \w+, expected \w{8}\.\.\.: delete it"):
        fetch.fetch(str(tmp_path), ["lpips"], progress=False)
    assert server.requests == []


def test_offline_names_url_and_manual_placement(server, tmp_path, monkeypatch):
    port = closed_port()
    monkeypatch.setenv(fetch.BASE_URL_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(fetch.FetchError) as error:
        fetch.fetch(str(tmp_path), ["adm256", "clip"], progress=False)
    message = str(error.value)
    assert "\n" not in message
    assert f"http://127.0.0.1:{port}/256x256_diffusion_uncond.pt" in message
    assert os.path.join(str(tmp_path), "downloads", "256x256_diffusion_uncond.pt") in message
    assert f"python -m checkpoints_convert.fetch --cache_dir={tmp_path} --models=adm256,clip" in message
    # Every missing file at once (not one per rerun), each with its source, size and hash where known.
    assert "place these 2 file(s)" in message
    assert (f"{os.path.join(str(tmp_path), 'downloads', 'ViT-B-16.pt')} from http://127.0.0.1:{port}/ViT-B-16.pt "
            f"(sha256 {fetch.SOURCES['clip'].sha256})") in message
    assert f"(2,211,383,297 bytes, sha256 {fetch.SOURCES['adm256'].sha256})" in message


def test_missing_weights_without_download_names_every_file(tmp_path):
    with pytest.raises(fetch.FetchError) as error:
        fetch.ensure_weights(str(tmp_path), ["adm256", "clip", "lpips"], download=False, progress=False)
    message = str(error.value)
    assert "place these 3 file(s)" in message and "\n" not in message
    for key in ("adm256", "clip", "vgg16"):
        assert os.path.join(str(tmp_path), "downloads", fetch.SOURCES[key].filename) in message
    assert "sha256 starting 397923af" in message


def test_manual_placement_converts_without_network(server, files, tmp_path, monkeypatch):
    data, torch_state = files
    monkeypatch.setenv(fetch.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    os.makedirs(tmp_path / "downloads")
    for name in ("256x256_diffusion_uncond.pt", "ViT-B-16.pt"):
        (tmp_path / "downloads" / name).write_bytes(data[name])
    assert fetch.ensure_weights(str(tmp_path), ["adm256", "clip"], download=False, progress=False) == str(tmp_path)
    _, params = bdunet.load(str(tmp_path))
    np.testing.assert_array_equal(params["out_2"]["bias"], torch_state["adm256"]["out.2.bias"].numpy())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["ViT-B-16.pt"]["origin"] == "found in downloads/"
    assert server.requests == []


def test_missing_weights_without_download_name_files_and_command(server, tmp_path):
    with pytest.raises(fetch.FetchError) as error:
        fetch.ensure_weights(str(tmp_path), ["adm256", "clip"], download=False)
    message = str(error.value)
    assert "\n" not in message
    for path in (tmp_path / "unet.safetensors", tmp_path / "clip.json", tmp_path / "downloads" / "ViT-B-16.pt"):
        assert str(path) in message
    assert f"python -m checkpoints_convert.fetch --cache_dir={tmp_path} --models=adm256,clip" in message
    assert server.requests == []


def test_keep_downloads_false_deletes_raw_files(server, tmp_path):
    fetch.fetch(str(tmp_path), ["adm256"], keep_downloads=False, progress=False)
    assert os.listdir(tmp_path / "downloads") == []
    assert fetch.is_converted(str(tmp_path), "adm256")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"]["256x256_diffusion_uncond.pt"]["deleted_after_conversion"] is True


def test_half_converted_model_is_not_overwritten_silently(server, tmp_path):
    (tmp_path / "clip.json").write_text("{}")
    with pytest.raises(fetch.FetchError, match="exists without its pair; pass --force"):
        fetch.fetch(str(tmp_path), ["clip"], progress=False)
    assert (tmp_path / "clip.json").read_text() == "{}" and server.requests == []


def test_cache_dir_flag_env_and_default(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_dir_from() == str(tmp_path / "home" / ".cache" / "bdjax")
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env"))
    assert fetch.cache_dir_from() == str(tmp_path / "env")
    assert fetch.cache_dir_from(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag wins
    assert fetch.ensure_weights(models=["adm256"], progress=False) == str(tmp_path / "env")
    assert fetch.is_converted(str(tmp_path / "env"), "adm256")


def test_unknown_model_is_refused():
    with pytest.raises(fetch.FetchError, match=r"unknown model\(s\) \['sd15'\]"):
        fetch.parse_models(["adm256", "sd15"])
    with pytest.raises(fetch.FetchError, match="no model named; choose from adm256"):
        fetch.parse_models(["", " "])  # --models= with nothing after it


def run_cli(*args, env):
    return subprocess.run([sys.executable, "-m", "checkpoints_convert.fetch", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_offline_one_line_error(tmp_path):
    port = closed_port()
    env = dict(os.environ, **{fetch.BASE_URL_ENV: f"http://127.0.0.1:{port}", fetch.CACHE_ENV: str(tmp_path)})
    proc = run_cli("--models=clip", env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: cannot download http://127.0.0.1:{port}/ViT-B-16.pt")
    assert os.path.join(str(tmp_path), "downloads", "ViT-B-16.pt") in lines[0]

    proc = run_cli(f"--cache_dir={tmp_path}", "--models=adm256,nope", env=env)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: unknown model(s) ['nope']; choose from {', '.join(fetch.MODELS)}"]


# ---- slow, bogus and wrong servers --------------------------------------------------------

@pytest.mark.parametrize("headers", [False, True], ids=["body", "headers"])
def test_trickling_server_is_abandoned_and_resumed(server, tmp_path, headers):
    """A server that sends a byte now and then is dropped once less than 64 KiB arrives in
    `stall_timeout`, resumed (with Range when bytes arrived), and given up on after the retries.
    Each attempt lasts at least one `stall_timeout` (the watchdog's window); the server would go
    on for a minute or more per attempt, so a bound far below that shows the watchdog cut both
    short, however loaded the machine."""
    server.files["slow.bin"] = bytes(range(256)) * 64
    server.pace, server.trickle_headers = (0.2, 1), headers
    url, dest = f"{os.environ[fetch.BASE_URL_ENV]}slow.bin", str(tmp_path / "slow.bin")
    begun = time.monotonic()
    with pytest.raises(fetch.FetchError) as error:
        fetch.download(url, dest, retries=1, progress=False, stall_timeout=1.0)
    elapsed = time.monotonic() - begun
    message = str(error.value)
    assert "\n" not in message and "stalled" in message and "run the same command again" in message, message
    assert 2 * 1.0 <= elapsed < 30.0, elapsed  # two attempts of one stall_timeout each, plus scheduling
    assert [name for name, _ in server.requests] == ["slow.bin", "slow.bin"]
    assert not os.path.exists(dest)
    if headers:
        assert "nothing kept" in message and not os.path.exists(dest + ".part")
    else:
        kept = os.path.getsize(dest + ".part")
        assert 4 <= kept < 64 and server.requests[1][1] is not None  # the retry resumed
        assert open(dest + ".part", "rb").read() == server.files["slow.bin"][:kept]


def test_file_past_its_deadline_is_abandoned_without_retries(server, tmp_path):
    """A steady but slow transfer (well above the stall threshold) ends at the file's deadline;
    what arrived is kept for the next run to resume."""
    server.files["big.bin"] = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    server.pace = (0.05, 256 << 10)  # about 5 MB/s: 1.6 s for the file
    url, dest = f"{os.environ[fetch.BASE_URL_ENV]}big.bin", str(tmp_path / "big.bin")
    begun = time.monotonic()
    with pytest.raises(fetch.FetchError, match=r"abandoned: not complete within the per-file deadline of 0.6 s") as e:
        fetch.download(url, dest, progress=False, stall_timeout=2.0, deadline=0.6)
    assert time.monotonic() - begun >= 0.6  # it ran to its deadline (an upper bound would flake under load:
    assert server.requests == [("big.bin", None)]  # the part kept below shows it stopped early), not retried
    kept = os.path.getsize(dest + ".part")
    assert 0 < kept < len(server.files["big.bin"]) and f"{kept} bytes kept" in str(e.value)
    server.pace = None  # the next run resumes from there
    assert fetch.download(url, dest, progress=False) == sha(server.files["big.bin"])
    assert server.requests[-1] == ("big.bin", f"bytes={kept}-")
    assert fetch.default_deadline(2_211_383_297) == pytest.approx(600 + 22_113.8, abs=1)


def test_bogus_range_answer_restarts_from_zero(server, files, tmp_path):
    """A 206 whose Content-Range is not the range asked for: the .part is discarded and the
    file fetched whole (the server here answers requests without Range normally)."""
    data, _ = files
    source = fetch.SOURCES["adm256"]
    url, dest = fetch.source_url(source), str(tmp_path / source.filename)
    with open(dest + ".part", "wb") as f:
        f.write(data[source.filename][:DROP_AFTER])
    server.bogus_range = f"bytes 0-{len(data[source.filename]) - 1}/{len(data[source.filename])}"
    assert fetch.download(url, dest, source, progress=False) == sha(data[source.filename])
    assert server.requests == [(source.filename, f"bytes={DROP_AFTER}-"), (source.filename, None)]
    assert open(dest, "rb").read() == data[source.filename]


def test_server_answering_only_ranges_is_named(server, files, tmp_path):
    """A server that answers every request with a range it was not asked for: the message says
    so (not a missing file), and nothing is left behind."""
    data, _ = files
    source = fetch.SOURCES["adm256"]
    url, dest = fetch.source_url(source), str(tmp_path / source.filename)
    with open(dest + ".part", "wb") as f:
        f.write(data[source.filename][:DROP_AFTER])
    server.bogus_range, server.bogus_range_always = "bytes 5-9/100", True
    with pytest.raises(fetch.FetchError) as error:
        fetch.download(url, dest, source, progress=False)
    message = str(error.value)
    assert "\n" not in message and "No such file" not in message
    assert "HTTP 206 Content-Range 'bytes 5-9/100'" in message and "nothing kept" in message, message
    assert os.listdir(tmp_path) == []


def html_page() -> bytes:
    return b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Wi-Fi login</body></html>"


def test_unloadable_download_is_moved_aside_and_fetched_again(server, files, tmp_path):
    """512x512_diffusion.pt has no published hash: an HTML page served under its name fails to
    convert, is moved to downloads/NAME.rejected, and the next run downloads the real file."""
    data, torch_state = files
    server.files["512x512_diffusion.pt"] = html_page()
    with pytest.raises(fetch.FetchError) as error:
        fetch.fetch(str(tmp_path), ["adm512"], progress=False)
    message = str(error.value)
    rejected = tmp_path / "downloads" / "512x512_diffusion.pt.rejected"
    assert "\n" not in message and "weights_only" not in message
    assert f"moved to {rejected}" in message and "run the same command again" in message, message
    assert os.listdir(tmp_path / "downloads") == [rejected.name] and rejected.read_bytes() == html_page()
    assert "512x512_diffusion.pt" not in json.loads((tmp_path / "manifest.json").read_text()).get("files", {})

    server.files["512x512_diffusion.pt"] = data["512x512_diffusion.pt"]
    fetch.fetch(str(tmp_path), ["adm512"], progress=False)
    module, params = bdunet.load(os.path.join(tmp_path, "adm512"))
    np.testing.assert_array_equal(params["label_emb"]["embedding"], torch_state["adm512"]["label_emb.weight"].numpy())


class NotATensor:
    pass


def test_placed_pickle_with_code_is_refused_without_unsafe_advice(server, tmp_path, monkeypatch):
    """A placed file whose pickle names a class: refused by the safe loader, quoted without
    torch's advice to load it with weights_only=False or to allowlist the class, moved aside."""
    monkeypatch.setenv(fetch.BASE_URL_ENV, f"http://127.0.0.1:{closed_port()}")
    os.makedirs(tmp_path / "downloads")
    placed = tmp_path / "downloads" / "512x512_diffusion.pt"
    torch.save({"model": NotATensor()}, placed)
    with pytest.raises(fetch.FetchError) as error:
        fetch.fetch(str(tmp_path), ["adm512"], download=False, progress=False)
    message = str(error.value)
    assert "\n" not in message and "Unsupported global" in message, message
    for advice in ("weights_only", "safe_globals", "allowlist", "trust"):
        assert advice not in message, message
    assert not placed.exists() and (tmp_path / "downloads" / "512x512_diffusion.pt.rejected").exists()
    assert server.requests == []


# ---- bounds on what a server may send -----------------------------------------------------

def recorded_deadlines(monkeypatch) -> list:
    """The sizes fetch computes deadlines from, recorded (the deadlines themselves unchanged)."""
    sizes, real = [], fetch.default_deadline
    monkeypatch.setattr(fetch, "default_deadline", lambda size: sizes.append(size) or real(size))
    return sizes


def test_every_official_file_has_a_bound():
    for key, source in fetch.SOURCES.items():
        assert (source.size or 0) <= source.limit <= fetch.DOWNLOAD_CEILING, key
    assert fetch.SOURCES["adm256"].limit == 2_211_383_297  # the recorded size: not a byte more
    assert fetch.Source("http://mirror/other.bin").limit == fetch.DOWNLOAD_CEILING


def test_endless_body_is_cut_off_at_the_files_bound(server, tmp_path, monkeypatch):
    """A body without Content-Length that never ends stops at the file's bound, is deleted (it is
    not the file) and not retried; its deadline is that of the bound."""
    sizes = recorded_deadlines(monkeypatch)
    server.files["endless.bin"], server.endless = b"", True
    source = fetch.Source(f"{os.environ[fetch.BASE_URL_ENV]}endless.bin", max_size=1 << 20)
    with pytest.raises(fetch.FetchError) as error:
        fetch.download(source.url, str(tmp_path / "endless.bin"), source, progress=False)
    message = str(error.value)
    assert "\n" not in message and f"the server sent more than the {1 << 20:,} bytes" in message, message
    assert "nothing kept" in message and os.listdir(tmp_path) == []
    assert server.requests == [("endless.bin", None)]
    assert sizes and set(sizes) == {1 << 20}


def test_absurd_content_length_is_refused_before_any_byte(server, files, tmp_path, monkeypatch):
    """A petabyte announced for ViT-B-16.pt (a deadline of three centuries at 10 s per MB) is
    refused at once, without retries; a .part from before stays for a sane server to resume."""
    data, _ = files
    sizes = recorded_deadlines(monkeypatch)
    source = fetch.SOURCES["clip"]
    url, dest = fetch.source_url(source), str(tmp_path / source.filename)
    server.announce = 10 ** 15
    with pytest.raises(fetch.FetchError) as error:
        fetch.download(url, dest, source, progress=False)
    message = str(error.value)
    assert "\n" not in message and "nothing kept" in message, message
    assert f"the server announces {10 ** 15:,} bytes, more than the {source.limit:,}" in message
    assert server.requests == [(source.filename, None)] and os.listdir(tmp_path) == []
    assert 10 ** 15 not in sizes

    server.announce = None
    open(dest + ".part", "wb").write(data[source.filename][:DROP_AFTER])
    server.ignore_range, server.announce = True, 10 ** 15  # a 200 for the whole file, its size a lie
    with pytest.raises(fetch.FetchError, match=f"{DROP_AFTER} bytes kept in"):
        fetch.download(url, dest, source, progress=False)
    assert os.path.getsize(dest + ".part") == DROP_AFTER


# ---- the disk, the cache directory and the manifest ---------------------------------------

@pytest.mark.parametrize("code", sorted(DISK_ERRORS), ids=errno.errorcode.get)
@pytest.mark.parametrize("target", ["download", "manifest"])
def test_disk_errors_while_fetching_are_one_line(server, tmp_path, monkeypatch, capsys, code, target):
    """A write that fails with only an errno (disk full, read-only, over quota) ends fetch with one
    line naming the file and the fix, exit status 2, as the converters do."""
    if target == "download":
        path = tmp_path / "downloads" / "ViT-B-16.pt.part"
        failing_writes(monkeypatch, fetch, lambda p: p == str(path), code)
    else:
        path = tmp_path / "manifest.json"
        failing_writes(monkeypatch, fetch, lambda p: os.path.basename(p).startswith(TMP_PREFIX), code)
    with pytest.raises(SystemExit) as exited:
        cli(lambda argv: fetch.fetch(str(tmp_path), ["clip"], progress=False))(["fetch"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {os.strerror(code)} ({path}): "), lines
    assert DISK_ERRORS[code] in lines[0]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(TMP_PREFIX)]


def test_cli_symlink_loop_in_the_cache_path_is_one_line(tmp_path):
    os.symlink("loop", tmp_path / "loop")
    cache = tmp_path / "loop" / "cache"
    env = dict(os.environ, **{fetch.BASE_URL_ENV: f"http://127.0.0.1:{closed_port()}"})
    proc = run_cli(f"--cache_dir={cache}", "--models=clip", env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: {os.strerror(errno.ELOOP)} ({cache}): symbolic links on that path form a loop: fix or remove them"]


def test_out_of_memory_while_converting_keeps_the_download(server, tmp_path, monkeypatch):
    """A machine short of memory is not a damaged file: the unverifiable 512 model stays in
    downloads/ instead of being moved aside as NAME.rejected."""
    def exhausted(*args, **kwargs):
        raise MemoryError
    monkeypatch.setattr(torch, "load", exhausted)
    with pytest.raises(MemoryError, match="out of memory loading .*512x512_diffusion.pt"):
        fetch.fetch(str(tmp_path), ["adm512"], progress=False)
    assert os.listdir(tmp_path / "downloads") == ["512x512_diffusion.pt"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600)])
def test_fetched_and_converted_files_follow_the_umask(server, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        fetch.fetch(str(tmp_path), ["clip"], progress=False)
    finally:
        os.umask(old)
    written = [os.path.join(d, n) for d, _, names in os.walk(tmp_path) for n in names]
    assert len(written) == 5  # the download, clip.safetensors, clip.json, the manifest and the lock
    assert {p: oct(stat.S_IMODE(os.stat(p).st_mode)) for p in written} == {p: oct(mode) for p in written}


@pytest.mark.parametrize("damage", ["deep", "parseable_but_deep", "large", "files_not_an_object"])
def test_damaged_manifest_is_rebuilt(server, tmp_path, damage):
    """manifest.json is a record, not an input: nested or sized to crash a JSON reader or writer,
    or of the wrong shape, it is rebuilt."""
    manifest = tmp_path / "manifest.json"
    if damage == "large":
        with open(manifest, "wb") as f:
            f.truncate(64 << 30)  # sparse
    else:
        manifest.write_text({"deep": "[" * 100_000, "parseable_but_deep": '{"note": ' + "[" * 500 + "]" * 500 + "}",
                             "files_not_an_object": '{"files": []}'}[damage])
    fetch.fetch(str(tmp_path), ["clip"], progress=False)
    rebuilt = json.loads(manifest.read_text())
    assert sorted(rebuilt) == ["files", "models"] and list(rebuilt["files"]) == ["ViT-B-16.pt"]
