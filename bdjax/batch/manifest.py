"""A batch's manifest: its JSON-lines parsed into checked, prepared `Job`s.

Reading the manifest prepares each job as an edit is prepared (bdjax/request.py): its prompt
tokenized, its options, counts and framing (`fit`, `context`, `feather`: see
request.prepare_inputs) checked, and each distinct image and mask decoded once and kept for the run
and the summaries (`InputCache`, bounded in bytes). A job's identity (`Job.spec`) is the content of
its image and mask, its prompt, seed and options, its framing in window mode, and the run's part
(`run_identity`, `with_run`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import unicodedata
import warnings
from collections import OrderedDict

import numpy as np

from bdjax import outputs
from bdjax import request as request_lib
from bdjax import window as window_lib
from bdjax.options import RANKING, EditOptions, check_type

OPTION_NAMES = EditOptions.names()
JOB_FIELDS = ("image", "mask", "prompt", "num_samples", "seed", "name", "invert_mask") + request_lib.FRAMING
REQUIRED = ("image", "prompt", "num_samples", "seed")
# The run's framing for every job unless a job's own fields say otherwise (launch.batch_edit: --fit,
# --context, --feather).
DEFAULT_FRAMING = {"fit": "window", "context": window_lib.DEFAULT_CONTEXT, "feather": window_lib.DEFAULT_FEATHER}
RESERVED_NAMES = (outputs.REPORT,)  # the run's own report lives beside the job directories
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # JSON strings may hold U+2028 etc.: only these end a line
# What a manifest may hold, far beyond real batches (100,000 jobs take days to compute), so that
# reading one takes bounded memory and time whatever the file is (a runaway generator, an endless
# pipe): over them the manifest, or the line, is refused.
MAX_MANIFEST_BYTES = 64 << 20
MAX_MANIFEST_LINES = 100_000
MAX_LINE_BYTES = 1 << 20
_READ_CHUNK = 1 << 20
# Unicode categories no job name may hold: controls (C0, DEL, C1 such as U+0085) and the line and
# paragraph separators (U+2028, U+2029), which would break the name's line in messages and listings.
_NOT_IN_NAMES = ("Cc", "Zl", "Zp")


class ManifestError(ValueError):
    """A manifest line that cannot be run; `line` is 1-based."""

    def __init__(self, line: int, message: str):
        super().__init__(f"manifest line {line}: {message}")
        self.line = line
        self.reason = message


@dataclasses.dataclass(frozen=True)
class Job:
    line: int
    name: str
    image: str               # absolute path
    mask: str | None         # absolute path; None edits the whole image
    prompt: str
    num_samples: int
    seed: int
    invert_mask: bool
    options: EditOptions
    image_sha256: str = ""
    mask_sha256: str | None = None
    # How the edit maps onto the photo (request.prepare_inputs): "window" pastes the model-size
    # edit back into the photo at its own size; "stretch" is the reference's model-size result.
    fit: str = "window"
    context: float = window_lib.DEFAULT_CONTEXT
    feather: int = window_lib.DEFAULT_FEATHER
    run: tuple = ()          # the run's identity as sorted (key, value) pairs: see `with_run`
    # The prompt's CLIP tokens [1, context_length], and where the prepared image and mask are kept.
    tokens: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    cache: "InputCache | None" = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def windowed(self) -> bool:
        """Whether the job's results are the photo at its own size (with a crops/ folder)."""
        return self.fit == "window"

    def framing(self) -> dict:
        """The job's framing as request.prepare_inputs takes it."""
        return {"fit": self.fit, "context": self.context, "feather": self.feather}

    def inputs(self, image_size: int) -> request_lib.Inputs:
        """The job's image and mask prepared at `image_size` with its framing (bdjax/request.py),
        from the manifest's cache: decoded once while the cache holds them."""
        cache = InputCache() if self.cache is None else self.cache
        return cache.get(self.image, self.mask, self.invert_mask, image_size, **self.framing())

    def framing_of(self, image_size: int) -> dict:
        """Where the edit lies in the photo (`Inputs.framing`: fit, window, scale, context, feather;
        {} with fit="stretch"), for reports; known without decoding the photo again."""
        if not self.windowed:
            return {}
        cache = InputCache() if self.cache is None else self.cache
        return cache.framing(self.image, self.mask, self.invert_mask, image_size, **self.framing())

    def spec(self) -> dict:
        """Everything a sample's pixels depend on, stored with each item so a rerun with a changed
        job is caught instead of mixing two jobs' samples in one directory. The image and mask
        count by content, so moving the files (or the whole project) keeps finished samples. The
        framing counts in window mode only: a fit="stretch" job's identity is what it always was.
        The ranking options are not part of it: they change no pixel, and a rerun ranks the
        finished samples again from their stored scores."""
        options = {name: value for name, value in dataclasses.asdict(self.options).items() if name not in RANKING}
        spec = {"image_sha256": self.image_sha256, "mask_sha256": self.mask_sha256, "prompt": self.prompt,
                "seed": self.seed, "invert_mask": self.invert_mask, "options": options}
        if self.windowed:
            spec.update(self.framing())
        spec["run"] = dict(self.run)
        return spec


def run_identity(precision: str, config: str, image_size: int, weights_digest: str) -> dict:
    """What a run contributes to every job's identity: samples made at another precision, with
    other networks or at another size are other samples."""
    return {"precision": precision, "config": config, "image_size": int(image_size), "weights": weights_digest}


def with_run(jobs: list[Job], identity: dict) -> list[Job]:
    """`jobs` as run with `identity` (from `run_identity`; known once the networks are loaded)."""
    run = tuple(sorted(identity.items()))
    return [dataclasses.replace(job, run=run) for job in jobs]


# Prepared inputs kept per manifest: 1 GiB holds 4096 distinct images and masks at 256 pixels with
# fit="stretch", 1024 at 512; in window mode each also holds its photo at full size (4 bytes a
# pixel, 5 with alpha), e.g. about 20 photos of 12 megapixels.
INPUT_CACHE_BYTES = 1 << 30


def _framing_key(fit: str, context: float, feather: int) -> tuple:
    """The framing's part of a cache key: a stretched image does not depend on context or feather."""
    return (fit, None, None) if fit == "stretch" else (fit, float(context), int(feather))


class InputCache:
    """Each distinct (image, mask, invert_mask, size, framing) of a manifest, prepared once for
    the model and kept (`Inputs`: uint8 arrays, in window mode with the full-size photo) up to
    `max_bytes` in all (`Inputs.nbytes`). Beyond that the least recently used are dropped and
    prepared again when next needed, so a manifest of many thousands of images holds at most
    `max_bytes` of them (and the batch being computed). Where each window lies (`framing`, a
    small dict) is remembered for every input prepared, so reports need no decoding again."""

    def __init__(self, max_bytes: int = INPUT_CACHE_BYTES):
        self.max_bytes = max_bytes
        self._kept: OrderedDict[tuple, request_lib.Inputs] = OrderedDict()
        self._framing: dict[tuple, dict] = {}
        self._bytes = 0

    def get(self, image: str, mask: str | None, invert_mask: bool, image_size: int, fit: str = "window",
            context: float = window_lib.DEFAULT_CONTEXT,
            feather: int = window_lib.DEFAULT_FEATHER) -> request_lib.Inputs:
        key = (image, mask, invert_mask, image_size) + _framing_key(fit, context, feather)
        if key in self._kept:
            self._kept.move_to_end(key)
            return self._kept[key]
        inputs = request_lib.prepare_inputs(image, mask, invert_mask=invert_mask, image_size=image_size, fit=fit,
                                            context=context, feather=feather)
        self._kept[key] = inputs
        self._framing[key] = inputs.framing()
        self._bytes += inputs.nbytes
        while self._bytes > self.max_bytes and len(self._kept) > 1:
            _, dropped = self._kept.popitem(last=False)
            self._bytes -= dropped.nbytes
        return inputs

    def framing(self, image: str, mask: str | None, invert_mask: bool, image_size: int, fit: str = "window",
                context: float = window_lib.DEFAULT_CONTEXT, feather: int = window_lib.DEFAULT_FEATHER) -> dict:
        """`Inputs.framing()` of those inputs, prepared only if they never were."""
        key = (image, mask, invert_mask, image_size) + _framing_key(fit, context, feather)
        if key not in self._framing:
            self.get(image, mask, invert_mask, image_size, fit, context, feather)
        return self._framing[key]

    @property
    def nbytes(self) -> int:
        """The bytes held by the kept inputs."""
        return self._bytes


def check_name(name, output_dir_label: str = "the output directory") -> str:
    """A job name is one directory inside the output directory, never a path out of it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name {name!r} must be a non-empty string")
    if not name.strip():
        raise ValueError(f"name {name!r} is only blanks; choose a name with visible characters")
    if os.path.isabs(name) or "/" in name or "\\" in name or os.sep in name:
        raise ValueError(f"name {name!r} is a path; it must be a single directory name (no separators), "
                         f"since outputs must stay inside {output_dir_label}")
    if set(name) == {"."}:
        raise ValueError(f"name {name!r} is made only of dots: '.' and '..' are the output directory itself and "
                         "its parent, not a directory of the job's own; choose a name with other characters")
    if name.startswith("."):
        raise ValueError(f"name {name!r} starts with '.': hidden names are reserved for bdjax's temporary and "
                         "lock files; choose a name without the leading '.'")
    bad = next((c for c in name if unicodedata.category(c) in _NOT_IN_NAMES), None)
    if bad is not None:
        raise ValueError(f"name {name!r} contains control characters or line separators (U+{ord(bad):04X}); use "
                         "printable characters only")
    if len(name.encode()) > 200:
        raise ValueError(f"name {name[:40]!r}... is {len(name.encode())} bytes long; the limit is 200 bytes")
    if name in RESERVED_NAMES:
        raise ValueError(f"name {name!r} is reserved for the run's report; choose another name")
    return name


def file_sha256(path: str, cache: dict | None = None) -> str:
    """Hex SHA-256 of a file's bytes; `cache` ({path: digest}) hashes each file once per run."""
    if cache is not None and path in cache:
        return cache[path]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if cache is not None:
        cache[path] = digest.hexdigest()
    return digest.hexdigest()


def parse_job(line: int, text: str, base_dir: str, image_size: int, base_options: EditOptions,
              context_length: int = 77, cache: dict | None = None,
              output_dir_label: str = "the output directory", framing: dict | None = None) -> Job:
    """One manifest line as a Job, checked and prepared as far as possible without running
    anything (bdjax/request.py): fields and types, options, framing, prompt length (tokenized
    here), readable image, non-empty mask. `framing` ({fit, context, feather}, default
    DEFAULT_FRAMING: window mode) is the run's, which the line's own fields override. `cache` (one
    dict per manifest) keeps what was learnt of each input file, so a file shared by many jobs is
    read, decoded and hashed once; the prepared image and mask stay there (see InputCache) for the
    run. `output_dir_label` names the output directory in messages. A line nested too deeply for
    Python to decode, or to show its values, is a bad line like any other."""
    try:
        return _parse_job(line, text, base_dir, image_size, base_options, context_length,
                          {} if cache is None else cache, output_dir_label,
                          DEFAULT_FRAMING if framing is None else framing)
    except ManifestError:
        raise
    except RecursionError:  # json.loads, or the repr of a value in a message, of e.g. [[[[...]]]]
        raise ManifestError(line, "nested too deeply: a job is one JSON object of plain values (strings, numbers, "
                            "booleans)") from None
    except ValueError as e:  # includes image_io.InputError and json.JSONDecodeError
        raise ManifestError(line, str(e)) from None
    except OSError as e:  # an input that vanished or turned unreadable between the checks
        raise ManifestError(line, f"cannot read {e.filename} ({e.strerror})") from None


class _DuplicateField(Exception):
    pass


def _unique_fields(pairs) -> dict:
    """A JSON object whose keys are all different (json.loads would keep the last silently)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _DuplicateField(repr(key))
        seen.add(key)
    return dict(pairs)


def _parse_job(line, text, base_dir, image_size, base_options, context_length, cache, output_dir_label,
               base_framing) -> Job:
    size = len(text.encode("utf-8"))
    if size > MAX_LINE_BYTES:  # decoding it would cost time and memory for no job
        raise ManifestError(line, f"the line is {size:,} bytes long, more than the limit of "
                            f"{MAX_LINE_BYTES >> 20} MiB: a job is one short JSON object")
    try:
        entry = json.loads(text, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as e:
        raise ManifestError(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except _DuplicateField as e:
        raise ManifestError(line, f"field {e} is given twice; keep one") from None
    if not isinstance(entry, dict):
        raise ManifestError(line, f"expected a JSON object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if k not in entry]
    if missing:
        raise ManifestError(line, f"missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED)})")
    unknown = sorted(set(entry) - set(JOB_FIELDS) - set(OPTION_NAMES))
    if unknown:
        raise ManifestError(line, f"unknown field(s) {', '.join(unknown)}; known: "
                            f"{', '.join(JOB_FIELDS + OPTION_NAMES)}")
    name = check_name(entry.get("name", f"line_{line:04d}"), output_dir_label)
    prompt = check_type("prompt", entry["prompt"], "str")
    num_samples = check_type("num_samples", entry["num_samples"], "int")
    seed = check_type("seed", entry["seed"], "int")
    invert_mask = check_type("invert_mask", entry.get("invert_mask", False), "bool")
    options = EditOptions.from_fields({k: v for k, v in entry.items() if k in OPTION_NAMES}, base_options)
    framing = {**DEFAULT_FRAMING, **base_framing, **{k: entry[k] for k in request_lib.FRAMING if k in entry}}
    request_lib.check_framing(**framing)  # "context=-1 must be ...", naming the field
    framing = {"fit": framing["fit"], "context": float(framing["context"]), "feather": int(framing["feather"])}
    tokens = request_lib.check(prompt, num_samples=num_samples, seed=seed, options=options,
                               context_length=context_length)
    resolve = lambda p: os.path.abspath(os.path.join(base_dir, os.path.expanduser(p)))  # noqa: E731
    image = resolve(check_type("image", entry["image"], "str"))
    mask = entry.get("mask")
    mask = None if mask is None else resolve(check_type("mask", mask, "str"))
    inputs = cache.setdefault("inputs", InputCache())
    checked = cache.setdefault("checked", {})
    key = (image, mask, invert_mask, image_size) + _framing_key(**framing)
    if key not in checked:  # decoded here once; kept in `inputs` for the run
        checked[key] = [str(w.message) for w in inputs.get(image, mask, invert_mask, image_size, **framing).warnings]
    for message in checked[key]:  # said for every line that uses the file, with its line number
        warnings.warn(f"manifest line {line}: {message}", stacklevel=3)
    digests = cache.setdefault("sha256", {})
    return Job(line=line, name=name, image=image, mask=mask, prompt=prompt, num_samples=num_samples, seed=seed,
               invert_mask=invert_mask, options=options, image_sha256=file_sha256(image, digests),
               mask_sha256=None if mask is None else file_sha256(mask, digests), **framing, tokens=tokens,
               cache=inputs)


def _read_text(path: str, label: str) -> str:
    """The manifest's text, read a chunk at a time so that memory is bounded by MAX_MANIFEST_BYTES
    whatever the file is (an endless pipe, /dev/zero, whose first NUL byte ends the reading);
    ValueError when it is bigger, not UTF-8 or binary."""
    data, binary = bytearray(), False
    with open(path, "rb") as f:
        while not binary and (chunk := f.read(_READ_CHUNK)):
            nul = chunk.find(b"\x00")
            binary = nul >= 0
            data += chunk[:nul + 1] if binary else chunk
            if len(data) > MAX_MANIFEST_BYTES:
                raise ValueError(f"{label} is bigger than {MAX_MANIFEST_BYTES >> 20} MiB, the most one manifest may "
                                 "hold: split its jobs into several manifests")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{label} is not UTF-8 text (undecodable byte at offset {e.start}): a manifest is a "
                         "JSON-lines text file, one job per line") from None
    if binary:
        raise ValueError(f"{label} is a binary file (it holds NUL bytes): a manifest is a JSON-lines text file, one "
                         "job per line")
    return text


def manifest_lines(path: str, label: str | None = None) -> list[str]:
    """The manifest's lines (a UTF-8 byte-order mark is dropped); ValueError naming the file (as
    `label`, by default "manifest PATH") when it is missing, unreadable, a directory, not UTF-8
    text, over MAX_MANIFEST_BYTES or MAX_MANIFEST_LINES, or holds no job."""
    label = f"manifest {path}" if label is None else label
    try:
        text = _read_text(path, label)
    except FileNotFoundError:
        raise FileNotFoundError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{label} is a directory; pass a JSON-lines file, one job per line") from None
    except OSError as e:
        raise ValueError(f"{label} cannot be read ({e.strerror or e}); check its permissions") from None
    count = text.count("\n") + text.count("\r") - text.count("\r\n") + (not text.endswith(("\n", "\r")))
    if count > MAX_MANIFEST_LINES:  # counted, not split: 64 MiB of line breaks would be as many strings
        raise ValueError(f"{label} has {count:,} lines, more than the limit of {MAX_MANIFEST_LINES:,}: split its jobs "
                         "into several manifests")
    lines = _LINE_BREAK.split(text)
    if not any(t.strip() and not t.lstrip().startswith("#") for t in lines):
        raise ValueError(f"{label} holds no job (it is empty or only blank and '#' lines); "
                         "write one JSON object per line")
    return lines


def read_manifest(path: str, image_size: int, base_options: EditOptions, context_length: int = 77, *,
                  label: str | None = None, output_dir_label: str = "the output directory",
                  framing: dict | None = None) -> tuple[list[Job], list[ManifestError]]:
    """The manifest's valid jobs and its bad lines. Blank lines and lines starting with '#' are
    skipped. Two jobs with the same name are an error for the whole manifest: their outputs would
    collide. The jobs' identity lacks the run's part until `with_run`. `framing` ({fit, context,
    feather}, any of them; default window mode, DEFAULT_FRAMING) is every job's unless its line
    says otherwise; a bad one raises OptionError (a ValueError naming it) before any line is read.
    `label` names the manifest in messages (see manifest_lines), `output_dir_label` the output
    directory."""
    framing = {**DEFAULT_FRAMING, **(framing or {})}
    unknown = sorted(set(framing) - set(request_lib.FRAMING))
    if unknown:
        raise ValueError(f"framing has unknown key(s) {', '.join(unknown)}; known: {', '.join(request_lib.FRAMING)}")
    request_lib.check_framing(**framing)
    base_dir = os.path.dirname(os.path.abspath(path))
    jobs, errors, cache = [], [], {}
    for number, text in enumerate(manifest_lines(path, label), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            jobs.append(parse_job(number, text, base_dir, image_size, base_options, context_length, cache,
                                  output_dir_label, framing))
        except ManifestError as e:
            errors.append(e)
    seen = {}
    for job in jobs:
        if job.name in seen:
            raise ValueError(f"manifest lines {seen[job.name]} and {job.line} both name the job {job.name!r}; "
                             "job names (default line_NNNN) must be unique")
        seen[job.name] = job.line
    return jobs, errors
