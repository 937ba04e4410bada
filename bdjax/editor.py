"""The Python API: `BlendedDiffusion.from_pretrained(dir).edit(image, mask, prompt)`.

Samples run in batches of `batch_size` (with "auto", the largest that fits the device's memory:
bdjax/fit.py) through one jit-compiled sampler per configuration;
the last batch is padded to full size (so nothing recompiles) and the padding discarded.
Results come back ranked best first, by the reference's CLIP distance unless the options' `rank_by`
says otherwise, each with its quality scores (bdjax/scores.py); `edit_batches` yields them batch by
batch instead, as they finish. Samples that turn NaN or infinite are flagged, never ranked.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bdjax import checkpoint, fit, guidance, parallel, tokenizer
from bdjax import scores as scores_lib
from bdjax import request as request_lib
from bdjax.blended import Models, Sampler, make_sampler, result_images, steps_per_call
from bdjax.options import AUTO, MAX_NUM_SAMPLES, EditOptions
from bdjax.models import clip as clip_lib
from bdjax.models import lpips as lpips_lib
from bdjax.models import unet as unet_lib
from bdjax.request import Request

PROGRESS = "blended diffusion"  # the progress bar's description


@dataclasses.dataclass
class EditResult:
    """Edited images ranked best first: lowest `options.rank_by` value (`rank_values`; by default
    the reference's CLIP distance, `distances`).

    In window mode (the default) `images` are the photo at its own size with the edit pasted
    in, and `crops` the model-size edits CLIP ranked; with fit="stretch" both are the model-size
    edits of the stretched image, as the reference returns them."""
    images: np.ndarray        # [N, H, W, 3 or 4] uint8: the results (4 channels: the input's alpha kept)
    distances: np.ndarray     # [N] float, the reference's ranking distance
    sample_ids: np.ndarray    # [N] int: sample k of `seed` (reproduce it with the same seed and k)
    seed: int
    source: np.ndarray        # [H, W, 3] uint8: the input the results replace (full size, or stretched)
    mask: np.ndarray          # [H, W] uint8 {0, 255}, after invert_mask
    prompt: str
    options: EditOptions
    # Sample ids whose image or distance came out NaN or infinite: left out of the above.
    failed: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    crops: np.ndarray | None = None  # [N, S, S, 3] uint8: the model-size edits (None: the same as images)
    framing: dict = dataclasses.field(default_factory=dict)  # the window (Inputs.framing); {} with stretch
    # What every saved result records (outputs.edit_provenance: prompt, options, the networks, ...).
    provenance: dict = dataclasses.field(default_factory=dict)
    # Every result's quality scores, in the order above: {name: [N] float} (bdjax/scores.py; NaN
    # where a score does not apply), and the run's diversity (None: fewer than 2 results, or no LPIPS).
    scores: dict = dataclasses.field(default_factory=dict)
    diversity: float | None = None

    @property
    def rank_values(self) -> np.ndarray:
        """The values the results are ranked by ([N], ascending): `options.rank_by`'s."""
        return scores_lib.rank_values(self.scores, self.options) if self.scores else np.asarray(self.distances)

    def pil_images(self) -> list[Image.Image]:
        """The results as PIL images, best first (their pixels only: `save` also writes where each
        came from)."""
        return [Image.fromarray(im) for im in self.images]

    def save(self, directory: str, *, overwrite: bool = False) -> list[str]:
        """Write the results into `directory` best first as NNN_<distance>.png, the launch programs'
        ranked names, each PNG carrying the same provenance as theirs (prompt, options, seed, sample
        id, distance, the window, the networks' digest; outputs.read_provenance reads it back).
        Files already there under those names are replaced only with `overwrite`. Returns the
        paths."""
        from bdjax import outputs

        paths = [os.path.join(directory, outputs.ranked_name(rank, v)) for rank, v in enumerate(self.rank_values)]
        there = [p for p in paths if os.path.lexists(p)]
        if there and not overwrite:
            raise FileExistsError(f"{there[0]} already exists ({len(there)} of the {len(paths)} files): save into "
                                  "another directory or pass overwrite=True")
        os.makedirs(directory, exist_ok=True)
        about = {**self.provenance, "seed": int(self.seed)}
        for i, (path, image, k, distance) in enumerate(zip(paths, self.images, self.sample_ids, self.distances)):
            scores = scores_lib.row(self.scores, i) if self.scores else None
            outputs.save_png(path, image, outputs.sample_provenance(about, k, distance, scores=scores))
        return paths


@dataclasses.dataclass
class EditBatch:
    """One finished batch of an edit, in sample order (on several hosts: this process's share)."""
    sample_ids: np.ndarray    # [n] int
    images: np.ndarray        # [n, H, W, 3 or 4] uint8: the results (Inputs.compose); black edits where not finite
    distances: np.ndarray     # [n] float
    finite: np.ndarray        # [n] bool: False where the image or the distance is NaN or infinite
    crops: np.ndarray | None = None  # [n, S, S, 3] uint8: the model-size edits (None: the same as images)
    scores: dict = dataclasses.field(default_factory=dict)  # {name: [n] float}: bdjax/scores.py's NAMES


@dataclasses.dataclass
class EditStream:
    """An edit that runs as it is iterated, yielding each `EditBatch` as soon as it is computed.

    The request is checked and prepared before the stream is made (`edit_batches`), so a bad
    request fails before any sampling; iterating computes the batches in order, once. The
    request's fields (`source`, `mask`, `prompt`, `seed`, `num_samples`, `options`) read through.
    """
    request: Request
    batches: Iterator[EditBatch]

    def __iter__(self) -> Iterator[EditBatch]:
        return self.batches

    def __getattr__(self, name: str):
        """The request's fields read through: source, mask, prompt, seed, num_samples, options."""
        if name in ("request", "batches"):  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.request, name)


@dataclasses.dataclass(frozen=True)
class StepPreview:
    """What `edit_batches(..., on_step=fn)` hands `fn` between chunks of steps, on the host: the
    steps done of the batch's `num_steps`, its samples' ids, and their current predictions of the
    clean image at the model size: `images` uint8 [b, H, W, 3] as the result would be if sampling
    stopped here (the background pasted where the result has it pasted; after the last step,
    exactly the result the model size gives, EditBatch.crops in window mode), and `raw` float32
    [b, H, W, 3] in [-1, 1], the prediction itself."""
    step: int
    num_steps: int
    sample_ids: np.ndarray
    images: np.ndarray
    raw: np.ndarray


# The result a prediction would give (blended.result_images), compiled once per configuration
# and batch shape, as the sampler's `end` computes it.
_result_images = jax.jit(result_images, static_argnums=0)


def previewer(options: EditOptions, request: Request, on_step: Callable) -> Callable:
    """The `on_chunk` of `sample_batches` that hands `on_step` a StepPreview of `request`."""
    def on_chunk(sample_ids, step, num_steps, pred):
        raw = np.asarray(pred, np.float32)
        images = to_uint8(np.asarray(_result_images(options, raw, request.init, request.region)),
                          np.isfinite(raw).all(axis=(1, 2, 3)))
        on_step(StepPreview(step=step, num_steps=num_steps, sample_ids=sample_ids, images=images, raw=raw))

    return on_chunk


def to_uint8(images: np.ndarray, finite: np.ndarray) -> np.ndarray:
    """Images in [0, 1] as uint8; rows that are not `finite` become black instead of garbage."""
    images = np.where(finite[:, None, None, None], images, 0)
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


class BlendedDiffusion:
    """Holds the three networks and their params; compiles a sampler per configuration."""

    # A context manager entered around each compile of a sampler's programs, made anew each time
    # (None: nothing is said): the launch programs print where compiled programs are cached and
    # pause their own progress bars, whose clocks should count sampling only.
    on_compile: Callable[[], contextlib.AbstractContextManager] | None = None
    # The compiled samplers kept (one per configuration: options and guided or not); beyond this
    # many, the least recently used is dropped with its programs, so that a server asked for ever
    # new options (a float nudged each time) holds a bounded number of compiled programs. A
    # dropped configuration asked for again compiles again, or loads from the compilation cache.
    max_samplers: int = 8
    # Where batch_size="auto" keeps its decisions on disk (bdjax/fit.py; the launch programs give
    # their compilation cache directory), None: in memory only; and who hears what its search
    # does (a function taking a line; None: nothing is said).
    fit_cache_dir: str | None = None
    on_fit: Callable[[str], None] | None = None

    def __init__(self, unet: tuple[Any, dict], clip: tuple[Any, dict], lpips: tuple[Any, dict] | None = None,
                 mesh=None, *, weights_digest: str | None = None, defaults: dict | None = None, label: str = ""):
        """Each network as (module, params). Samples are split over `mesh` (default: every device).
        `label` is said on every result's provenance (the smoke networks': their images are noise).

        `defaults` replace the reference's option values for this editor's edits (the smoke
        preset's shorter schedule, say); options passed to `edit` override them.

        `weights_digest` identifies all the networks' weights (`from_pretrained` passes the one
        built from the checkpoints' recorded digests); by default it is computed from the params.
        """
        self.models = Models(unet=unet[0], clip=clip[0], lpips=None if lpips is None else lpips[0])
        if weights_digest is None:
            nets = {"unet": unet, "clip": clip, **({"lpips": lpips} if lpips is not None else {})}
            weights_digest = checkpoint.weights_digest(
                {name: checkpoint.digest(checkpoint.flatten(net[1])) for name, net in nets.items()})
        self.weights_digest: str = weights_digest
        self.label = label
        self.param_dtype = str(jax.tree_util.tree_leaves(unet[1])[0].dtype)
        EditOptions.from_fields(defaults or {})  # unknown names and wrong types fail here
        self.defaults: dict = dict(defaults or {})
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        params = {"unet": unet[1], "clip": clip[1]}
        if lpips is not None:
            params["lpips"] = lpips[1]
        self.params = parallel.put_replicated(params, self.mesh)
        self.image_size = self.models.unet.image_size
        self._samplers: collections.OrderedDict = collections.OrderedDict()  # least recently used first
        self._diversity = self._score = self._local_params = None  # made on first use
        self._encode_text = jax.jit(lambda p, tokens: self.models.clip.apply({"params": p}, tokens,
                                                                             method="encode_text"))

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, dtype=jnp.float32, param_dtype=None,
                        unet_dir: str | None = None, remat: str = "none", *, with_lpips: bool | None = None,
                        image_size: int | None = None, verify_weights: bool = True,
                        mesh=None) -> "BlendedDiffusion":
        """Load converted weights: unet.* and clip.* in `checkpoint_dir`, and lpips.* there when
        `with_lpips` (None: when present; a run without the LPIPS loss does not need it).

        `unet_dir` picks another directory for the UNet (e.g. the 512 model); `remat` is the
        rematerialisation policy of the UNet's and CLIP's blocks in the guidance gradient
        ("none", "dots", "blocks"; see bdjax/models/remat.py). `image_size` refuses a UNet made
        for another size; `verify_weights=False` skips checking the tensors against the digests
        recorded at conversion (bdjax/checkpoint.py). `weights_digest` is built from those digests.
        `mesh`: the devices the samples are split over (default: every device).
        """
        checkpoint_dir = os.path.expanduser(checkpoint_dir)
        unet_dir = os.path.expanduser(unet_dir or checkpoint_dir)
        if with_lpips is None:
            with_lpips = os.path.exists(os.path.join(checkpoint_dir, f"{lpips_lib.CHECKPOINT_NAME}.json"))
        common = dict(dtype=dtype, param_dtype=param_dtype, verify=verify_weights)
        nets = {"unet": (unet_dir, lambda: unet_lib.load(unet_dir, remat=remat, image_size=image_size, **common)),
                "clip": (checkpoint_dir, lambda: clip_lib.load(checkpoint_dir, remat=remat, **common))}
        if with_lpips:
            nets["lpips"] = (checkpoint_dir, lambda: lpips_lib.load(checkpoint_dir, **common))
        loaded, digests = {}, {}
        for name, (directory, load) in nets.items():
            loaded[name] = load()
            # Checkpoints converted before digests were recorded: the digest of the params as loaded.
            digests[name] = (checkpoint.recorded_digest(directory, name, model=name)
                             or checkpoint.digest(checkpoint.flatten(loaded[name][1])))
        return cls(loaded["unet"], loaded["clip"], loaded.get("lpips"), mesh,
                   weights_digest=checkpoint.weights_digest(digests))

    def encode_prompt(self, prompt: str) -> jax.Array:
        """The CLIP text embedding [D] of `prompt`."""
        return self.encode_tokens(tokenizer.tokenize(prompt, context_length=self.models.clip.context_length))

    def encode_tokens(self, tokens: np.ndarray) -> jax.Array:
        """The CLIP text embedding [D] of one prompt's tokens [1, context_length] (`Request.tokens`)."""
        return self._encode_text(self.params["clip"], tokens)[0].astype(jnp.float32)

    def sampler(self, options: EditOptions, guided: bool) -> "CompiledSampler":
        """The jit-compiled sampler for a configuration (compiled once, then kept among the
        `max_samplers` most recently used)."""
        key = (options.sampling, guided)  # the ranking options do not change the sampler
        if key in self._samplers:
            self._samplers.move_to_end(key)
        else:
            self._samplers[key] = CompiledSampler(make_sampler(self.models, key[0], guided=guided), self.mesh)
            while len(self._samplers) > self.max_samplers:
                self._samplers.popitem(last=False)
        return self._samplers[key]

    def batch_choice(self, options: EditOptions, guided: bool, num_samples: int) -> fit.Choice:
        """How many rows of an edit of `num_samples` samples run together (`.rows`), and how that
        was decided: `options.batch_size` (never more rows than samples), or with batch_size="auto"
        the largest batch whose compiled sampler fits the device's memory (bdjax/fit.py: on a
        GPU or TPU, the first time for a configuration, a few candidate batches are compiled for
        XLA's memory analysis; on a CPU the default 4)."""
        if options.batch_size != AUTO:
            return fit.fixed(options.batch_size, num_samples)
        devices = self.mesh.devices.size

        def measure(per_device: int) -> int:
            return fit.footprint(self.sampler(options, guided), self.params, self.image_size,
                                 self.models.clip.embed_dim, per_device * devices, self.mesh)

        return fit.choose(self.configuration(options, guided), measure, self.mesh, num_samples,
                          cache_dir=self.fit_cache_dir, say=self.on_fit)

    def configuration(self, options: EditOptions, guided: bool) -> dict:
        """What the compiled sampler of (options, guided) depends on, batch_size apart: the
        networks' configurations (dtype and remat among them), the parameter dtype, the image
        size, the sampling options and guided or not (bdjax/fit.py keys its decisions by it)."""
        sampling = {k: v for k, v in dataclasses.asdict(options.sampling).items() if k != "batch_size"}
        modules = {"unet": self.models.unet, "clip": self.models.clip, "lpips": self.models.lpips}
        networks = {name: None if module is None else fit.module_fields(module) for name, module in modules.items()}
        return {"networks": networks, "param_dtype": self.param_dtype, "image_size": self.image_size,
                "options": sampling, "guided": guided}

    def prepare(self, image, mask=None, prompt: str = "", *, num_samples: int = 32, seed: int = 404,
                invert_mask: bool = False, **options) -> Request:
        """The edit `edit` runs, checked and prepared once (bdjax/request.py): the image and mask
        decoded and framed for this UNet's size, the prompt tokenized for this CLIP, `options` over
        this editor's defaults. Pass it to `edit` or `edit_batches` to run it (as often as wanted).

        Besides EditOptions' fields, `options` may hold the framing (request.prepare_inputs):
        `fit` ("window", the default: edit a window around the mask and paste it back into the
        photo at full size; "stretch": the reference's whole image at the model size), `context`
        and `feather`."""
        framing = {name: options.pop(name) for name in request_lib.FRAMING if name in options}
        return request_lib.prepare(image, mask, prompt, num_samples=num_samples, seed=seed, invert_mask=invert_mask,
                                   options=self.options(**options), image_size=self.image_size,
                                   context_length=self.models.clip.context_length, **framing)

    def edit(self, image, mask=None, prompt: str = "", *, num_samples: int = 32, seed: int = 404,
             invert_mask: bool = False, progress: bool = True, **options) -> EditResult:
        """Edit the masked region of `image` to match `prompt`; returns results ranked best first.

        `image` is a path, a PIL image or an array, or a `Request` from `prepare` (which carries
        the mask, prompt, counts and options: pass nothing else then). `options` are EditOptions'
        fields by name (bdjax/options.py), over this editor's defaults.

        Samples are spread over every device; on several hosts each process gets back the
        samples its devices produced. A sample that turns NaN or infinite is left out of the
        ranking and listed in `failed`. To handle results batch by batch as they finish (without
        holding them all in memory), iterate `edit_batches` instead.
        """
        stream = self.edit_batches(image, mask, prompt, num_samples=num_samples, seed=seed,
                                   invert_mask=invert_mask, progress=progress, **options)
        batches = list(stream)
        ids, images, distances, finite = (np.concatenate([getattr(b, key) for b in batches])
                                          for key in ("sample_ids", "images", "distances", "finite"))
        scores = {name: np.concatenate([b.scores[name] for b in batches])[finite] for name in scores_lib.NAMES}
        order = np.argsort(scores_lib.rank_values(scores, stream.options), kind="stable")
        crops = None
        if stream.inputs.photo is not None:
            crops = np.concatenate([b.crops for b in batches])[finite][order]
        framing = stream.inputs.framing()
        ranked_edits = images[finite][order] if crops is None else crops
        return EditResult(images=images[finite][order], distances=distances[finite][order],
                          sample_ids=ids[finite][order], seed=stream.seed, source=stream.full_source,
                          mask=stream.full_mask, prompt=stream.prompt, options=stream.options,
                          failed=np.sort(ids[~finite]), crops=crops, framing=framing,
                          provenance=self.provenance(stream.options, prompt=stream.prompt, **framing),
                          scores={name: values[order] for name, values in scores.items()},
                          diversity=self.diversity(ranked_edits[:scores_lib.DIVERSITY_MAX], stream.request.region))

    def provenance(self, options: EditOptions, **fields) -> dict:
        """What a result of this editor records (outputs.edit_provenance): `fields` (the prompt, the
        window), the options as run, the networks (image size, parameter dtype, weights digest)
        and this editor's label."""
        from bdjax import outputs

        run = {"image_size": self.image_size, "param_dtype": self.param_dtype, "weights": self.weights_digest}
        return outputs.edit_provenance(options, self.label, run, **fields)

    def edit_batches(self, image, mask=None, prompt: str = "", *, num_samples: int = 32, seed: int = 404,
                     invert_mask: bool = False, progress: bool = True, on_step=None, every_step: bool = False,
                     **options) -> EditStream:
        """`edit` as a stream: checks and prepares the request now (unless `image` is a prepared
        `Request`), then computes one batch per step of the iteration (see EditStream). Memory
        stays that of one batch whatever `num_samples` is: every sample shares one copy of the
        inputs.

        `on_step(preview)` (a `StepPreview`), if given, is called on the host after each chunk of
        a batch's steps (about ten per batch), or after every step with `every_step` (a video of
        the diffusion: more, shorter device calls). Fetching the predictions makes the host wait
        for each chunk; the samples are the same with or without it, and no host callback enters
        the compiled programs (they stay in the compilation cache)."""
        if isinstance(image, Request):
            request = image
            if mask is not None or prompt != "" or options or (num_samples, seed, invert_mask) != (32, 404, False):
                raise TypeError("a prepared Request carries its own mask, prompt, counts and options; pass only "
                                "progress, on_step and every_step with it")
            self._check_prepared(request)
        else:
            request = self.prepare(image, mask, prompt, num_samples=num_samples, seed=seed, invert_mask=invert_mask,
                                   **options)
        opts, n = request.options, request.num_samples
        text_embed = np.asarray(self.encode_tokens(request.tokens))[None]
        rows = lambda a: np.broadcast_to(a, (n, *np.shape(a)[1:]))  # noqa: E731  views, not copies

        on_chunk = None if on_step is None else previewer(opts, request, on_step)
        # A batch never holds more rows than there are samples (the loss weights still use
        # batch_size, or 4 with "auto", as the reference's do, so a sample's pixels do not depend
        # on this). With "auto" the rows are decided now, before the stream is handed back.
        batch_rows = self.batch_choice(opts, request.prompt != "", n).rows

        def batches():
            for out in self.sample_batches(opts, request.prompt != "", rows(request.init), rows(request.region),
                                           rows(text_embed), range(n), rows(np.int32(request.seed)[None]),
                                           progress=progress, batch_rows=batch_rows,
                                           on_chunk=on_chunk, every_step=every_step):
                edits = to_uint8(out["images"], out["finite"])
                crops = None if request.inputs.photo is None else edits
                yield EditBatch(sample_ids=out["rows"], images=request.inputs.compose(edits),
                                distances=out["distances"], finite=out["finite"], crops=crops, scores=out["scores"])

        return EditStream(request=request, batches=batches())

    def _check_prepared(self, request: Request) -> None:
        """Refuse a request prepared for other networks (another image size or text length), one
        changed since (with dataclasses.replace) into one `prepare` would refuse, or one whose
        options need a network this editor lacks."""
        if not isinstance(request.inputs, request_lib.Inputs):
            raise ValueError("the request's inputs are not prepared Inputs: make the request with editor.prepare")
        if request.size != self.image_size:
            raise ValueError(f"the request was prepared at {request.size}x{request.size} pixels; this editor's UNet "
                             f"works at {self.image_size}x{self.image_size}")
        if request.tokens.shape[-1] != self.models.clip.context_length:
            raise ValueError(f"the request's prompt was tokenized to {request.tokens.shape[-1]} tokens; this "
                             f"editor's CLIP reads {self.models.clip.context_length}")
        request.checked(self.models.clip.context_length)
        self.options(**dataclasses.asdict(request.options))

    def options(self, **options) -> EditOptions:
        """EditOptions from `options` (keyword arguments named as EditOptions' fields) over this
        editor's `defaults`, type-checked, and refused when they need a network this editor lacks.
        Their ranges are checked with the rest of the request (bdjax/request.py)."""
        opts = EditOptions.from_fields({**self.defaults, **options})
        if guidance.needs_lpips(opts) and self.models.lpips is None:
            raise ValueError("background_preservation_loss needs the LPIPS weights, which this editor was built "
                             "without: convert them (python -m checkpoints_convert.lpips) and load them with "
                             "from_pretrained(..., with_lpips=True), or set lpips_sim_lambda=0")
        if opts.rank_by == "combined" and opts.rank_background_weight != 0 and self.models.lpips is None:
            raise ValueError("rank_by=combined weighs background_lpips, which needs the LPIPS weights this editor was "
                             "built without: load them (from_pretrained(..., with_lpips=True)) or set "
                             "rank_background_weight=0")
        return opts

    def score(self, images: np.ndarray, init, region, text_embed, rows: int = 8) -> dict:
        """The quality scores (bdjax/scores.py) of finished results: `images` uint8 [n, S, S, 3]
        at this editor's model size (edits as written to crops/, say), scored against `init`
        [S, S, 3] in [-1, 1] (the input as the model saw it), `region` [S, S, 1] (1 = edited) and
        the prompt's `text_embed` [D]. Runs `rows` images at a time (one compiled program, the
        last call padded). Returns {name: [n] float32}; clip_masked is computed from the 8-bit
        images, so it matches the sampler's (from unrounded ones) to about 1e-3."""
        images = np.asarray(images)
        if self._score is None:
            self._score = jax.jit(lambda params, images, init, mask, text: scores_lib.score_images(
                self.models, params, images, init, mask, text))
        one = lambda a: jnp.broadcast_to(jnp.asarray(a, jnp.float32)[None], (rows, *np.shape(a)))  # noqa: E731
        init, region, text_embed = one(init), one(region), one(text_embed)
        out = {name: [] for name in scores_lib.NAMES}
        for start in range(0, len(images), rows):
            chunk = images[start:start + rows].astype(np.float32) / 255
            padded = np.concatenate([chunk, np.zeros((rows - len(chunk), *chunk.shape[1:]), np.float32)])
            got = self._score(self.local_params(), padded, init, region, text_embed)
            for name in scores_lib.NAMES:
                out[name].append(np.asarray(got[name])[:len(chunk)])
        return {name: np.concatenate(v) if v else np.zeros(0, np.float32) for name, v in out.items()}

    def local_params(self):
        """The params on this process's first device alone (each device holds a whole copy): what
        a computation of this process alone runs with, such as a score after sampling, so that it
        never waits for the other processes of a multi-process run."""
        if self._local_params is None:
            self._local_params = jax.tree.map(lambda a: a.addressable_data(0), self.params)
        return self._local_params

    def diversity(self, images: np.ndarray, region) -> float | None:
        """The mean LPIPS between every pair of `images` (uint8 [n, S, S, 3], model-size edits)
        inside `region` (the mask at the model size, [S, S, 1] or [1, S, S, 1]): higher is more
        varied (bdjax/scores.py). None for fewer than 2 images or an editor without LPIPS."""
        images = np.asarray(images)
        if len(images) < 2 or self.models.lpips is None:
            return None
        if self._diversity is None:
            self._diversity = jax.jit(lambda params, images, mask: scores_lib.diversity(self.models, params, images,
                                                                                         mask))
        value = self._diversity(self.local_params(), images.astype(np.float32) / 255, np.asarray(region, np.float32))
        return scores_lib.plain(value)

    def sample(self, options: EditOptions, guided: bool, init, mask, text_embed, sample_ids, seeds,
               progress: bool = False, batch_rows: int | None = None) -> dict:
        """Run N independent samples, each with its own inputs, `batch_rows` (default
        `options.batch_size`; with "auto", `batch_choice`'s rows for N samples) at a time.

        init [N, S, S, 3] in [-1, 1], mask [N, S, S, 1], text_embed [N, D], sample_ids [N] (an array
        or a range), seeds [N]. Returns {"rows", "images" [n, S, S, 3] in [0, 1], "distances" [n],
        "finite" [n] bool, "scores" {name: [n]}} for the n rows this process computed (all N on one
        host); "rows" are their indices into the inputs, "finite" is False where a row's image or
        distance is NaN or infinite, and "scores" are the results' quality scores (bdjax/scores.py).
        """
        out = list(self.sample_batches(options, guided, init, mask, text_embed, sample_ids, seeds, progress,
                                       batch_rows))
        merged = {key: np.concatenate([o[key] for o in out]) for key in ("rows", "images", "distances", "finite")}
        merged["scores"] = {name: np.concatenate([o["scores"][name] for o in out]) for name in scores_lib.NAMES}
        return merged

    def sample_batches(self, options: EditOptions, guided: bool, init, mask, text_embed, sample_ids, seeds,
                       progress: bool = False, batch_rows: int | None = None, on_chunk=None,
                       every_step: bool = False) -> Iterator[dict]:
        """`sample`, one batch at a time: yields each batch's dict as soon as it is computed.
        `batch_rows` samples run together (default `options.batch_size`; with "auto",
        `batch_choice`'s rows for these samples), the last batch padded.
        `on_chunk(sample_ids, steps done, num_steps, pred_xstart [b, H, W, C])` is called on the
        host after each chunk of steps (each step with `every_step`), this process's real rows only.

        Only one batch of inputs is gathered at a time: the inputs may be broadcast views (one
        image for N samples) and are indexed, never copied whole.
        """
        run = self.sampler(options, guided)
        n = len(sample_ids)
        if batch_rows is None:
            auto = options.batch_size == AUTO
            batch_rows = self.batch_choice(options, guided, n).rows if auto else options.batch_size
        global_batch = parallel.padded_batch(batch_rows, self.mesh.devices.size)
        mine = parallel.process_slice(global_batch, self.mesh)
        bar = None
        if progress and jax.process_index() == 0:  # one bar on multi-host runs
            chunks = -(-n // batch_rows)
            bar = tqdm(total=run.num_steps * chunks * (mine.stop - mine.start),
                       desc=PROGRESS, unit="sample-step")
        inputs = (init, mask, text_embed, sample_ids, seeds)
        try:
            for start in range(0, n, batch_rows):
                local, keep, args = self._batch_args(inputs, start, min(start + batch_rows, n), global_batch)
                on_steps = None if bar is None else (lambda steps: bar.update(steps * (mine.stop - mine.start)))
                if not run.compiled(*args):
                    self._compile(run, args, bar)
                previews = {}
                if on_chunk is not None:  # this batch's real rows, after each chunk
                    previews = {"on_chunk": (lambda ids, keep: lambda step, pred: on_chunk(  # noqa: E731
                        ids, step, run.num_steps, parallel.local_rows(pred)[keep]))(local[keep], keep),
                        "chunk_steps": 1 if every_step else None}
                out = run(self.params, *args, on_steps=on_steps, **previews)
                images = parallel.local_rows(out["images"])[keep]
                distances = parallel.local_rows(out["distances"])[keep]
                finite = np.isfinite(distances) & np.isfinite(images).all(axis=tuple(range(1, images.ndim)))
                scores = {name: np.asarray(parallel.local_rows(v)[keep], np.float32)
                          for name, v in out["scores"].items()}
                yield {"rows": local[keep], "images": images, "distances": distances, "finite": finite,
                       "scores": scores}
        finally:
            if bar is not None:
                bar.close()

    def _batch_args(self, inputs: tuple, start: int, stop: int, global_batch: int) -> tuple:
        """Rows start..stop of `inputs` (init, mask, text_embed, sample_ids, seeds), spread over a
        padded batch of `global_batch` rows: (this process's row indices, which of them are real
        rather than padding, the sampler's arguments on the mesh)."""
        layout, valid = parallel.spread(np.arange(start, stop), global_batch)
        mine = parallel.process_slice(global_batch, self.mesh)
        local, keep = layout[mine], valid[mine]
        dtypes = (None, None, None, np.int32, np.int32)
        gather = lambda a, index, dtype: np.asarray(  # noqa: E731  a range stays lazy
            [a[i] for i in index] if isinstance(a, range) else np.asarray(a)[index], dtype)
        return local, keep, tuple(parallel.put_batch(gather(a, local, dtype), self.mesh, global_batch)
                                  for a, dtype in zip(inputs, dtypes))

    def warm_up(self, options: EditOptions | None = None, *, guided: bool = True,
                num_samples: int | None = None) -> None:
        """Compile now what an edit with `options` (default: this editor's defaults) and
        `num_samples` samples (default: a full batch) will run, without sampling: the text encoder
        and the sampler for that batch shape (inside `on_compile`). A server calls it at start-up
        so that its first request starts sampling at once; with the persistent compilation cache
        on, a later start reads the programs from disk. Nothing is compiled twice."""
        opts = self.options(**({} if options is None else dataclasses.asdict(options)))
        # A full batch (with "auto", the most that fits), or the samples asked for if fewer.
        rows = self.batch_choice(opts, guided, num_samples or MAX_NUM_SAMPLES).rows
        self.encode_tokens(np.zeros((1, self.models.clip.context_length), np.int32))
        run = self.sampler(opts, guided)
        size, width = self.image_size, self.models.clip.embed_dim
        one = (np.zeros((1, size, size, 3), np.float32), np.ones((1, size, size, 1), np.float32),
               np.zeros((1, width), np.float32))
        inputs = (*(np.broadcast_to(a, (rows, *a.shape[1:])) for a in one), range(rows), np.zeros(rows, np.int32))
        global_batch = parallel.padded_batch(rows, self.mesh.devices.size)
        _, _, args = self._batch_args(inputs, 0, rows, global_batch)
        if not run.compiled(*args):
            self._compile(run, args, None)

    def _compile(self, run: "CompiledSampler", args: tuple, bar) -> None:
        """Compile `run` for `args` ahead of sampling, inside `on_compile`; the bar says so meanwhile
        and its clock skips the compile, so that its rate and ETA are those of sampling alone."""
        if bar is not None:
            bar.set_description_str(f"{PROGRESS} (preparing)")
        with self.on_compile() if self.on_compile is not None else contextlib.nullcontext():
            run.compile(self.params, *args)
        if bar is not None:
            bar.unpause()  # the time since the bar last moved, the compile, is not sampling time
            bar.set_description_str(PROGRESS)


class CompiledSampler:
    """A `Sampler` jit-compiled over a mesh: begin, advance and end are three programs, each
    compiled once. A run calls advance on equal chunks of `steps_per_call` steps, so progress can
    be reported between chunks without a host callback inside the compiled loop (programs with
    host callbacks cannot enter JAX's persistent compilation cache)."""

    def __init__(self, sampler: Sampler, mesh):
        self.sampler = sampler
        self.begin = parallel.jit_over_samples(sampler.begin, mesh, num_args=6)
        self.advance = parallel.jit_over_samples(sampler.advance, mesh, num_args=3, replicated=(0, 2))
        self.end = parallel.jit_over_samples(sampler.end, mesh, num_args=2)
        self.num_steps = len(sampler.indices)
        self.chunks = np.asarray(sampler.indices).reshape(-1, steps_per_call(self.num_steps))
        self._compiled: set[tuple] = set()

    def compiled(self, *inputs) -> bool:
        """Whether the programs are compiled for these inputs' shapes (init ... seeds, as `__call__`)."""
        return tuple(np.shape(a) for a in inputs) in self._compiled

    def compile(self, params, init, mask, text_embed, sample_ids, seeds) -> None:
        """Compile begin, advance and end for these inputs' shapes ahead of a run, so that compiling
        and sampling can be reported (and timed) apart; the calls that follow reuse the programs."""
        begin = self.begin.lower(params, init, mask, text_embed, sample_ids, seeds).compile()
        state = begin.out_info  # shapes and shardings of the state advance and end take
        self.advance.lower(params, state, self.chunks[0]).compile()
        self.end.lower(params, state).compile()
        self._compiled.add(tuple(np.shape(a) for a in (init, mask, text_embed, sample_ids, seeds)))

    def __call__(self, params, init, mask, text_embed, sample_ids, seeds, on_steps=None, on_chunk=None,
                 chunk_steps: int | None = None) -> dict:
        """Run every step; `on_steps(k)` is called on the host as each chunk of k steps finishes.
        Chunks are queued ahead, so the device never waits for the host, unless `on_chunk(steps
        done, pred_xstart)` is given: it is called after each chunk with the current predictions
        (fetching them waits for the chunk). `chunk_steps` (a divisor of num_steps; 1 for every
        step) replaces the chunking: advance is then compiled for that chunk length too."""
        state = self.begin(params, init, mask, text_embed, sample_ids, seeds)
        previous = None
        chunks = self.chunks if chunk_steps is None else np.asarray(self.sampler.indices).reshape(-1, chunk_steps)
        done = 0
        for chunk in chunks:
            state = self.advance(params, state, chunk)
            done += len(chunk)
            if on_chunk is not None:
                on_chunk(done, state["pred_xstart"])
            if on_steps is not None:
                if previous is not None:
                    jax.block_until_ready(previous["x"])
                    on_steps(len(chunk))
                previous = state
        out = self.end(params, state)
        if on_steps is not None:
            jax.block_until_ready(out)
            on_steps(len(chunks[-1]))
        return out
