"""Download the official weights and convert them all into one cache directory.

    python -m checkpoints_convert.fetch [--cache_dir=DIR] [--models=adm256,clip,lpips] [--with_512]
        [--force] [--keep_downloads=false]

The cache directory is `--cache_dir`, else $BDJAX_CACHE, else ~/.cache/bdjax; where each
converted model lives in it is bdjax.weights' registry (the 512 model only with --with_512).
Fetching adds

    DIR/downloads/                       the raw PyTorch files, kept unless --keep_downloads=false
    DIR/manifest.json                    URL, size, sha256 and verification status of every file

Downloads go to DIR/downloads/NAME.part, resume with an HTTP Range request after an
interruption (from zero when the server ignores Range), are checked against a sha256 where one
is known and only then renamed to NAME. A transfer that stalls (less than 64 KiB in 60 s) is
resumed; a file not complete within its deadline (10 minutes plus 10 s per MB) is abandoned. No
file may grow past its bound (its recorded size, else a ceiling with a margin; 4 GiB for files
outside the registry): a larger Content-Length is refused before any byte is written, a body
that runs past the bound is cut off and deleted, and the deadline is that of the announced size
(within the bound), or of the bound when none is announced. A file already at DIR/downloads/NAME
(placed there by hand on an offline machine) is verified and converted without any network
access; one with no published hash that fails to convert is moved to NAME.rejected. Models whose
converted files exist are skipped unless --force.

$BDJAX_WEIGHTS_URL, when set, replaces every official location by BDJAX_WEIGHTS_URL/NAME
(a mirror holding the files flat under one URL; the tests point it at a local server).

Launch programs call `ensure_weights()`, which returns the directory at once when the converted
files exist and otherwise fetches them, or explains what to download and the command to run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import posixpath
import re
import shlex
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence

from absl import app, flags

from bdjax.checkpoint import JSONFileError, naming, read_json
from bdjax.files import atomic_write
from bdjax.weights import (CACHE_ENV, DEFAULT_CACHE_DIR, DEFAULT_MODELS, MODELS, cache_dir_from, converted_paths,
                           is_converted, model_dir)
from checkpoints_convert.common import ConversionError, cli

BASE_URL_ENV = "BDJAX_WEIGHTS_URL"
DOWNLOADS = "downloads"
MANIFEST = "manifest.json"
CHUNK = 1 << 20
REJECTED_SUFFIX = ".rejected"

# A download attempt that receives less than STALL_BYTES in `stall_timeout` seconds (headers
# included) is abandoned and resumed, like a dropped connection. A file not complete within its
# deadline (DEADLINE_BASE_S plus its size at DEADLINE_RATE, unless given) is abandoned.
STALL_TIMEOUT_S = 60.0
STALL_BYTES = 64 << 10
DEADLINE_BASE_S = 600.0
DEADLINE_RATE = 100_000           # bytes per second: 10 s per MB
# The most bytes a file outside the registry (or one of unknown size in it) may bring: about twice
# the largest official file.
DOWNLOAD_CEILING = 4 << 30


@dataclasses.dataclass(frozen=True)
class Source:
    """One file to download and what its bytes are checked against."""

    url: str
    sha256: str | None = None         # full hash, only where one is published
    sha256_prefix: str | None = None  # torchvision's file-name convention
    hash_from: str = ""               # where the expected hash is stated
    size: int | None = None           # bytes, where recorded alongside the hash
    max_size: int | None = None       # bytes, a ceiling with a margin where the size is not recorded

    @property
    def filename(self) -> str:
        return posixpath.basename(urllib.parse.urlparse(self.url).path)

    @property
    def limit(self) -> int:
        """The most bytes a download of this file may bring: a server sending more sends something else."""
        return self.size or self.max_size or DOWNLOAD_CEILING


SOURCES: dict[str, Source] = {
    # OpenAI publishes no checksum. This sha256 is the one Disco Diffusion (v5.6 and later,
    # github.com/alembics/disco-diffusion, `diff_model_map["256x256_diffusion_uncond"]["sha"]`)
    # checks this very URL against; other projects record the same value with the file size
    # 2,211,383,297 bytes. (Older Disco versions listed 983e3de6... as `model_256_SHA`: that is
    # the hash of secondary_model_imagenet_2.pth, to which later versions moved it.)
    "adm256": Source("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
                     sha256="a37c32fffd316cd494cf3f35b339936debdc1576dad13fe57c42399a5dbc78b1",
                     hash_from="Disco Diffusion v5.6+ diff_model_map (not published by OpenAI)", size=2_211_383_297),
    # No published hash found: the computed sha256 is only recorded in manifest.json. No size
    # recorded either: the file is about 2.2 GB, like the 256 model.
    "adm512": Source("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/512x512_diffusion.pt",
                     max_size=3 << 30),
    # OpenAI names each CLIP file by its full sha256 (clip/clip.py `_MODELS`, which also checks it).
    # About 350 MB; no size recorded.
    "clip": Source("https://openaipublic.azureedge.net/clip/models/"
                   "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
                   sha256="5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
                   hash_from="the URL (OpenAI clip/clip.py)", max_size=512 << 20),
    # torchvision names its files NAME-<first 8 hex digits of the sha256>.pth and checks that prefix.
    # The size is the Content-Length download.pytorch.org announces (torch.hub's progress bars show it).
    "vgg16": Source("https://download.pytorch.org/models/vgg16-397923af.pth", sha256_prefix="397923af",
                    hash_from="the file name (torchvision convention)", size=553_433_881),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a model of the registry (bdjax.weights.MODELS) is made: the downloads it is converted
    from, and for a UNet the configuration to convert it with."""

    files: tuple[str, ...]           # keys of SOURCES
    unet_config: Mapping | None = None


def _unet_preset(name: str) -> dict:
    from bdjax.models import unet

    return unet.preset(name)


RECIPES: dict[str, Recipe] = {
    "adm256": Recipe(("adm256",), unet_config=_unet_preset("adm256_uncond")),
    "adm512": Recipe(("adm512",), unet_config=_unet_preset("adm512_cond")),
    "clip": Recipe(("clip",)),
    "lpips": Recipe(("vgg16",)),  # the v0.1 linear heads ship inside the lpips package
}


class FetchError(ConversionError):
    """Weights could not be obtained; the message says what to do (one line)."""


class _Unreachable(Exception):
    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class _Interrupted(Exception):
    """The connection ended (or stalled) before the announced length arrived: worth resuming."""


class _Abandoned(Exception):
    """The file's deadline passed: not retried."""


class _BadRange(Exception):
    """The server answered a request for the whole file with a range of it."""


class _TooLarge(Exception):
    """The server announced or sent more bytes than the file can have: not retried."""


# ---- locations ------------------------------------------------------------------------------

def source_url(source: Source) -> str:
    base = os.environ.get(BASE_URL_ENV)
    return f"{base.rstrip('/')}/{source.filename}" if base else source.url


def fetch_command(cache_dir: str, models: Iterable[str]) -> str:
    return (f"python -m checkpoints_convert.fetch --cache_dir={shlex.quote(cache_dir)} "
            f"--models={','.join(models)}")


def parse_models(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))  # ordered, no duplicates
    if not names:
        raise FetchError(f"no model named; choose from {', '.join(MODELS)}")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise FetchError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    return names


# ---- hashing --------------------------------------------------------------------------------

def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with naming(path), open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expected_hash(source: Source) -> str | None:
    """What the sha256 must equal (full) or start with (prefix); None when nothing is known."""
    return source.sha256 or source.sha256_prefix


def verification(source: Source) -> str:
    if source.sha256:
        return f"sha256 verified against {source.hash_from}"
    if source.sha256_prefix:
        return f"sha256 prefix {source.sha256_prefix} verified against {source.hash_from}"
    return "not verified: no published sha256; the computed one is recorded here"


def hash_matches(source: Source, actual: str) -> bool:
    want = expected_hash(source)
    return want is None or actual.startswith(want.lower())


# ---- downloading ----------------------------------------------------------------------------

def _content_range(header: str | None) -> tuple[int | None, int | None, int | None]:
    """`bytes 100-199/1000` -> (100, 199, 1000); `bytes */1000` -> (None, None, 1000)."""
    match = re.fullmatch(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)", (header or "").strip())
    if not match:
        return None, None, None
    start, end, total = match.groups()
    return (int(start) if start else None), (int(end) if end else None), (int(total) if total != "*" else None)


def default_deadline(size: int) -> float:
    """Seconds a file of `size` bytes may take in all: DEADLINE_BASE_S plus its size at DEADLINE_RATE."""
    return DEADLINE_BASE_S + size / DEADLINE_RATE


class _Watchdog:
    """Abandons a slow transfer from a thread of its own: when the deadline passes, or fewer than
    STALL_BYTES arrive in `stall_timeout` seconds, it shuts the connection's socket, so a read
    blocked on a server that trickles bytes (or headers) returns at once. The reading side adds
    to `received` and, on any failure, asks `failure()` whether the watchdog caused it."""

    def __init__(self, stall_timeout: float, started: float, deadline: float):
        self.stall_timeout, self.started, self.deadline = stall_timeout, started, deadline
        self.received = 0
        self._failure: Exception | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fetch-watchdog", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self._failure is not None:
                self._shut(sock)

    def failure(self) -> Exception | None:
        return self._failure

    def _watch(self) -> None:
        poll = min(0.5, self.stall_timeout / 4)
        window_start, window_received = time.monotonic(), 0
        while not self._stop.wait(poll):
            now = time.monotonic()
            if now > self.started + self.deadline:
                limit = f"{self.deadline:.0f}" if self.deadline >= 10 else f"{self.deadline:g}"
                self._abandon(_Abandoned(f"not complete within the per-file deadline of {limit} s"))
                return
            if now - window_start >= self.stall_timeout:
                got = self.received - window_received
                if got < STALL_BYTES:
                    self._abandon(_Interrupted(f"stalled: {got} bytes in {now - window_start:.0f} s, "
                                               f"under {STALL_BYTES >> 10} KiB"))
                    return
                window_start, window_received = now, self.received

    def _abandon(self, failure: Exception) -> None:
        with self._lock:
            self._failure = failure
            for sock in self._sockets:
                self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's opener, whose HTTP(S) connections report their sockets to `watchdog`."""
    def watched(base):
        class Connection(base):
            def connect(self):
                super().connect()
                watchdog.attach(self.sock)
        return Connection

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _open(opener, url: str, offset: int, timeout: float):
    headers = {"User-Agent": "bdjax-fetch"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return e  # the caller decides whether the .part is already whole
        raise _Unreachable(url, f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Unreachable(url, str(getattr(e, "reason", e))) from None


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.exists(path) else 0


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _transfer(url: str, part: str, progress: bool, timeout: float, stall_timeout: float, started: float,
              deadline: float | None, limit: int) -> str:
    """Bring `part` up to the whole file, appending when the server honours Range.

    Returns the sha256 of the whole `part`. Raises _Interrupted when the stream ends early or
    stalls (what is there stays, for the next attempt to resume from), _Abandoned when the
    deadline (seconds since `started`; None: `default_deadline` of the announced size, or of
    `limit` while none is known) passes, _BadRange when the server sends part of the file
    unasked, and _TooLarge when it announces or sends more than `limit` bytes in all.
    """
    offset = _size(part)
    with _Watchdog(stall_timeout, started, default_deadline(limit) if deadline is None else deadline) as watchdog:
        try:
            return _receive(url, part, offset, progress, timeout, deadline, limit, watchdog)
        except (_Interrupted, _Unreachable):
            if watchdog.failure() is not None:  # the watchdog shut the connection
                raise watchdog.failure() from None
            raise


def _receive(url, part, offset, progress, timeout, deadline, limit, watchdog) -> str:
    opener = _opener(watchdog)
    response = _open(opener, url, offset, timeout)
    if isinstance(response, urllib.error.HTTPError):  # 416: nothing left after `offset`
        _, _, total = _content_range(response.headers.get("Content-Range"))
        response.close()
        if offset and total == offset:
            return sha256_file(part)
        _remove(part)  # the .part is longer than the file: start over
        offset = 0
        response = _open(opener, url, 0, timeout)
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.isdigit() else None
        resumed = False
        if response.status == 206:
            header = response.headers.get("Content-Range")
            start, end, size = _content_range(header)
            consistent = (start is not None and (size is None or end == size - 1)
                          and (length is None or length == end - start + 1))
            if consistent and start == offset:
                resumed = offset > 0  # from 0: the whole file, only labelled a range
            else:
                _remove(part)
                asked = f"bytes={offset}-" if offset else "the whole file (no Range)"
                what = f"the server answered a request for {asked} with HTTP 206 Content-Range {header!r}"
                if offset:
                    raise _Interrupted(f"{what}; starting again from zero")
                raise _BadRange(what)
        if not resumed:
            offset = 0  # the server ignored Range (200): the body is the whole file
        total = offset + length if length is not None else None
        if total is not None and total > limit:
            raise _TooLarge(f"the server announces {total:,} bytes, more than the {limit:,} this file can have")
        if deadline is None:
            watchdog.deadline = default_deadline(limit if total is None else total)
        digest = hashlib.sha256()
        if resumed:
            with naming(part), open(part, "rb") as f:
                while chunk := f.read(CHUNK):
                    digest.update(chunk)
        received = offset
        with naming(part), open(part, "ab" if resumed else "wb") as f, \
                _progress_bar(url, total, offset, progress) as bar:
            while True:
                try:
                    chunk = response.read1(CHUNK)  # what has arrived, so the watchdog sees progress
                except (http.client.HTTPException, OSError, ValueError) as e:
                    raise _Interrupted(f"{type(e).__name__}: {e}") from None
                if not chunk or received + len(chunk) > limit:
                    break
                f.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                watchdog.received += len(chunk)
                bar.update(len(chunk))
    if received + len(chunk) > limit:  # a body without a length that does not end where the file must
        _remove(part)
        raise _TooLarge(f"the server sent more than the {limit:,} bytes this file can have")
    if watchdog.failure() is not None and (total is None or received < total):
        raise watchdog.failure()
    # http.client returns b"" instead of raising when the peer closes early: compare lengths.
    if total is not None and received < total:
        raise _Interrupted(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _progress_bar(url: str, total: int | None, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=posixpath.basename(urllib.parse.urlparse(url).path), disable=not enabled,
                file=sys.stderr, dynamic_ncols=True)


def download(url: str, dest: str, source: Source | None = None, *, retries: int = 3,
             progress: bool = True, timeout: float = 60.0, stall_timeout: float = STALL_TIMEOUT_S,
             deadline: float | None = None) -> str:
    """Download `url` to `dest` through `dest.part`; returns the file's sha256.

    An interrupted or stalled transfer (less than STALL_BYTES in `stall_timeout` seconds) is
    resumed up to `retries` times, and by the next call after that. The whole file, retries
    included, must arrive within `deadline` seconds (None: `default_deadline` of its size). It
    may not be larger than `source.limit` (DOWNLOAD_CEILING without a source): a larger announced
    size is refused before any byte arrives, and a body that runs past it is cut off and deleted.
    The file is renamed to `dest` only once complete and matching `source`'s hash; on a
    mismatch the .part is deleted. Raises _Unreachable when no connection can be made.
    """
    part = dest + ".part"
    limit = source.limit if source is not None else DOWNLOAD_CEILING
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    started = time.monotonic()

    def kept() -> str:
        size = _size(part)
        return f"{size} bytes kept in {part}" if size else "nothing kept"

    for attempt in range(retries + 1):
        try:
            actual = _transfer(url, part, progress, timeout, stall_timeout, started, deadline, limit)
            break
        except _Interrupted as e:
            if attempt == retries:
                raise FetchError(f"download of {url} interrupted ({e}); {kept()}: run the same command again "
                                 "to resume") from None
        except _Abandoned as e:
            raise FetchError(f"download of {url} abandoned: {e}; {kept()}: run the same command again to "
                             f"resume, on a faster connection or from a mirror (${BASE_URL_ENV})") from None
        except _BadRange as e:
            raise FetchError(f"cannot download {url}: {e}, not the file; nothing kept: try again later, or "
                             f"from a mirror (${BASE_URL_ENV})") from None
        except _TooLarge as e:
            raise FetchError(f"download of {url} refused: {e}; {kept()}: the server does not send the file, try "
                             f"again later, or from a mirror (${BASE_URL_ENV})") from None
    if source is not None and not hash_matches(source, actual):
        os.remove(part)
        raise FetchError(f"{os.path.basename(dest)} from {url} has sha256 {actual}, expected "
                         f"{expected_hash(source)}{'...' if not source.sha256 else ''}; "
                         f"the download was deleted, run again (or check the mirror)")
    os.replace(part, dest)
    return actual


# ---- the whole job --------------------------------------------------------------------------

def _read_manifest(cache_dir: str) -> dict:
    """DIR/manifest.json; a lost, damaged, oversized or too deeply nested one, or one of another
    shape, is rebuilt (it is a record, not an input), so nothing in it can stop a fetch."""
    try:
        manifest = read_json(os.path.join(cache_dir, MANIFEST))
    except (OSError, JSONFileError):
        return {}
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(k, {}), dict) for k in ("files", "models")):
        return {}
    return manifest


def _write_manifest(cache_dir: str, manifest: dict) -> None:
    path = os.path.join(cache_dir, MANIFEST)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
    with naming(path):
        atomic_write(path, write)


@contextlib.contextmanager
def _lock(cache_dir: str):
    """Serialise fetches into one cache (two launch programs starting together, say)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(os.path.join(cache_dir, ".fetch.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _obtain(key: str, cache_dir: str, wanted: Sequence[str], manifest: dict, progress: bool,
            log: Callable[[str], None], **limits) -> str:
    """The verified raw file for SOURCES[key]: one placed by hand, or downloaded now."""
    source = SOURCES[key]
    dest = os.path.join(cache_dir, DOWNLOADS, source.filename)
    url = source_url(source)
    if os.path.isfile(dest):
        log(f"verifying {dest}")
        actual, origin = sha256_file(dest), "found in downloads/"
        if not hash_matches(source, actual):
            raise FetchError(f"{dest} has sha256 {actual}, expected {expected_hash(source)}"
                             f"{'...' if not source.sha256 else ''}: delete it and run again")
    else:
        log(f"downloading {url}")
        actual = download(url, dest, source, progress=progress, **limits)  # _Unreachable: see fetch
        origin = url
    manifest.setdefault("files", {})[source.filename] = dict(
        url=source.url, origin=origin, size=os.path.getsize(dest), sha256=actual,
        verification=verification(source))
    return dest


def _missing_downloads(cache_dir: str, names: Sequence[str]) -> list[str]:
    """Keys of SOURCES that `names` need and DIR/downloads/ does not hold."""
    keys = dict.fromkeys(k for name in names for k in RECIPES[name].files)
    return [k for k in keys if not os.path.isfile(os.path.join(cache_dir, DOWNLOADS, SOURCES[k].filename))]


def _placement(cache_dir: str, names: Sequence[str], wanted: Sequence[str]) -> str:
    """How to place every missing raw file of `names` by hand, in one sentence: where each goes,
    where it comes from, its size and hash where known, then the command that converts them."""
    described = []
    for key in _missing_downloads(cache_dir, names):
        source = SOURCES[key]
        facts = [f"{source.size:,} bytes"] if source.size else []
        if source.sha256:
            facts.append(f"sha256 {source.sha256}")
        elif source.sha256_prefix:
            facts.append(f"sha256 starting {source.sha256_prefix}")
        else:
            facts.append("no published sha256")
        described.append(f"{os.path.join(cache_dir, DOWNLOADS, source.filename)} from {source_url(source)} "
                         f"({', '.join(facts)})")
    return (f"place these {len(described)} file(s): {'; '.join(described)}; then run "
            f"`{fetch_command(cache_dir, wanted)}`, which converts them without downloading")


def _convert(name: str, paths: Sequence[str], out_dir: str, overwrite: bool, manifest: dict) -> None:
    checkpoint = MODELS[name].checkpoint
    try:
        # Imported here: a cache that is already converted needs neither torch nor the converters.
        if checkpoint == "unet":
            from checkpoints_convert import unet

            unet.convert(paths[0], out_dir, dict(RECIPES[name].unet_config), overwrite=overwrite)
        elif checkpoint == "clip":
            from checkpoints_convert import clip

            clip.convert(paths[0], out_dir, overwrite=overwrite)
        else:
            from checkpoints_convert import lpips

            lpips.convert(paths[0], out_dir, overwrite=overwrite)
    except ImportError as e:
        raise FetchError(f"converting {name} needs {e.name or 'torch'}: pip install -e '.[convert]' "
                         "(torch; lpips for the LPIPS heads)") from None
    except (ConversionError, ValueError) as e:
        rejected = _reject(RECIPES[name], paths, manifest)
        raise FetchError(f"converting {', '.join(paths)} for {name} failed: {e}{rejected}") from None


def _reject(recipe: Recipe, paths: Sequence[str], manifest: dict) -> str:
    """Move the raw files that no published hash vouches for out of the way (NAME.rejected), so
    the next run downloads them afresh instead of failing on them again; returns what to tell."""
    moved = []
    for key, path in zip(recipe.files, paths):
        if expected_hash(SOURCES[key]) is None and os.path.isfile(path):
            os.replace(path, path + REJECTED_SUFFIX)
            manifest.get("files", {}).pop(os.path.basename(path), None)
            moved.append(path)
    if not moved:
        return ""
    return (f"; {', '.join(moved)} (no published hash to check it against) was moved to "
            f"{', '.join(p + REJECTED_SUFFIX for p in moved)}: run the same command again to download it afresh")


def fetch(cache_dir: str | None = None, models: Sequence[str] = DEFAULT_MODELS, *, force: bool = False,
          keep_downloads: bool = True, download: bool = True, progress: bool = True,
          stall_timeout: float = STALL_TIMEOUT_S, deadline: float | None = None) -> str:
    """Make every model in `models` converted under the cache directory; returns the directory.

    Converted models are skipped unless `force`, which reconverts (overwriting) and re-verifies.
    With `download=False` nothing is fetched: files already in DIR/downloads/ are converted, and
    the error for the rest names them and the command to run. `stall_timeout` and `deadline`
    bound each download (see `download`). A file with no published hash that fails to convert
    is moved to NAME.rejected in DIR/downloads/, so the next run fetches it again.
    """
    cache_dir = cache_dir_from(cache_dir)
    models = parse_models(models)
    # Messages on stdout, the progress bar on stderr: stderr stays the one-line error on failure.
    log = (lambda message: print(message, flush=True)) if progress else (lambda message: None)
    os.makedirs(os.path.join(cache_dir, DOWNLOADS), exist_ok=True)
    with _lock(cache_dir):
        todo = []
        for name in models:
            present = [p for p in converted_paths(cache_dir, name) if os.path.isfile(p)]
            if len(present) == 2 and not force:
                log(f"{name}: already converted in {model_dir(cache_dir, name)}")
            elif len(present) == 1 and not force:
                raise FetchError(f"{present[0]} exists without its pair; pass --force to reconvert {name}")
            else:
                todo.append(name)
        if not download and _missing_downloads(cache_dir, todo):
            absent = [p for name in todo for p in converted_paths(cache_dir, name)]
            raise FetchError(f"weights missing: {', '.join(absent)}; run `{fetch_command(cache_dir, models)}`, or "
                             f"offline {_placement(cache_dir, todo, models)}")
        manifest = _read_manifest(cache_dir)
        for position, name in enumerate(todo):
            try:
                paths = [_obtain(k, cache_dir, models, manifest, progress, log, stall_timeout=stall_timeout,
                                 deadline=deadline) for k in RECIPES[name].files]
            except _Unreachable as e:  # name every file still missing at once, not one per rerun
                raise FetchError(f"cannot download {e.url} ({e.reason}); offline? "
                                 f"{_placement(cache_dir, todo[position:], models)}") from None
            _write_manifest(cache_dir, manifest)
            log(f"{name}: converting {', '.join(os.path.basename(p) for p in paths)}")
            try:
                _convert(name, paths, model_dir(cache_dir, name), force, manifest)
            finally:
                _write_manifest(cache_dir, manifest)
            manifest.setdefault("models", {})[name] = dict(
                directory=MODELS[name].subdir or ".", from_files=[os.path.basename(p) for p in paths],
                files=[os.path.relpath(p, cache_dir) for p in converted_paths(cache_dir, name)])
            if not keep_downloads:
                for p in paths:
                    os.remove(p)
                    manifest["files"][os.path.basename(p)]["deleted_after_conversion"] = True
            _write_manifest(cache_dir, manifest)
    return cache_dir


def ensure_weights(cache_dir: str | None = None, models: Sequence[str] = DEFAULT_MODELS,
                   download: bool = True, *, progress: bool = True) -> str:
    """The cache directory holding converted `models`, fetching them first if needed.

    Returns at once (no lock, no torch import) when every model is converted. Otherwise calls
    `fetch`; with `download=False`, or when offline, raises FetchError naming the missing files
    and the command to run.
    """
    directory = cache_dir_from(cache_dir)
    models = parse_models(models)
    if all(is_converted(directory, name) for name in models):
        return directory
    return fetch(directory, models, download=download, progress=progress)


# ---- command line ---------------------------------------------------------------------------

FLAGS = flags.FLAGS


def define_flags() -> None:
    # Only when run as a program, like the converters: importing this module defines no flags.
    flags.DEFINE_string("cache_dir", None, f"Cache directory; default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR}.")
    flags.DEFINE_list("models", list(DEFAULT_MODELS), f"Models to fetch, from {', '.join(MODELS)}.")
    flags.DEFINE_bool("with_512", False, "Also fetch the ADM 512x512 class-conditional model (into DIR/adm512/).")
    flags.DEFINE_bool("force", False, "Re-verify and reconvert models that are already converted (overwrites them).")
    flags.DEFINE_bool("keep_downloads", True, "Keep the raw PyTorch files in DIR/downloads/ after conversion.")


@cli
def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    models = list(FLAGS.models) + (["adm512"] if FLAGS.with_512 else [])
    directory = fetch(FLAGS.cache_dir, models, force=FLAGS.force, keep_downloads=FLAGS.keep_downloads)
    print(f"converted weights in {directory}")


if __name__ == "__main__":
    from checkpoints_convert.common import run_program

    run_program(define_flags, main)
