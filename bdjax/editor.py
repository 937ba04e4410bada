"""The Python API: `BlendedDiffusion.from_pretrained(dir).edit(image, mask, prompt)`.

Samples run in batches of `batch_size` through one jit-compiled sampler per configuration;
the last batch is padded to full size (so nothing recompiles) and the padding discarded.
Results come back ranked best first by the reference's CLIP distance.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from bdjax import image_io, parallel, tokenizer
from bdjax.blended import EditOptions, Models, Sampler, check_request, make_sampler, steps_per_call
from bdjax.models import clip as clip_lib
from bdjax.models import lpips as lpips_lib
from bdjax.models import unet as unet_lib

OPTION_NAMES = EditOptions.names()


@dataclasses.dataclass
class EditResult:
    """Edited images ranked best first (lowest CLIP distance)."""
    images: np.ndarray        # [N, H, W, 3] uint8
    distances: np.ndarray     # [N] float, the reference's ranking distance
    sample_ids: np.ndarray    # [N] int: sample k of `seed` (reproduce it with the same seed and k)
    seed: int
    source: np.ndarray        # [H, W, 3] uint8, the resized input
    mask: np.ndarray          # [H, W] uint8 {0, 255}, after invert_mask
    prompt: str
    options: EditOptions

    def pil_images(self) -> list[Image.Image]:
        return [Image.fromarray(im) for im in self.images]


class BlendedDiffusion:
    """Holds the three networks and their params; compiles a sampler per configuration."""

    def __init__(self, unet: tuple[Any, dict], clip: tuple[Any, dict], lpips: tuple[Any, dict] | None = None,
                 mesh=None):
        """Each network as (module, params). Samples are split over `mesh` (default: every device)."""
        self.models = Models(unet=unet[0], clip=clip[0], lpips=None if lpips is None else lpips[0])
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        params = {"unet": unet[1], "clip": clip[1]}
        if lpips is not None:
            params["lpips"] = lpips[1]
        self.params = parallel.put_replicated(params, self.mesh)
        self.image_size = self.models.unet.image_size
        self._samplers: dict = {}
        self._encode_text = jax.jit(lambda p, tokens: self.models.clip.apply({"params": p}, tokens,
                                                                             method="encode_text"))

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str, dtype=jnp.float32, param_dtype=None,
                        unet_dir: str | None = None, remat: str = "none") -> "BlendedDiffusion":
        """Load converted weights: unet.*, clip.* and (if present) lpips.* in `checkpoint_dir`.

        `unet_dir` picks another directory for the UNet (e.g. the 512 model); `remat` is the
        rematerialisation policy of the UNet's and CLIP's blocks in the guidance gradient
        ("none", "dots", "blocks"; see bdjax/models/remat.py).
        """
        checkpoint_dir = os.path.expanduser(checkpoint_dir)
        unet_dir = os.path.expanduser(unet_dir or checkpoint_dir)
        unet = unet_lib.load(unet_dir, dtype=dtype, param_dtype=param_dtype, remat=remat)
        clip = clip_lib.load(checkpoint_dir, dtype=dtype, param_dtype=param_dtype, remat=remat)
        lpips = None
        if os.path.exists(os.path.join(checkpoint_dir, f"{lpips_lib.CHECKPOINT_NAME}.json")):
            lpips = lpips_lib.load(checkpoint_dir, dtype=dtype, param_dtype=param_dtype)
        return cls(unet, clip, lpips)

    def encode_prompt(self, prompt: str) -> jax.Array:
        tokens = tokenizer.tokenize(prompt, context_length=self.models.clip.context_length)
        return self._encode_text(self.params["clip"], tokens)[0].astype(jnp.float32)

    def sampler(self, options: EditOptions, guided: bool) -> "CompiledSampler":
        """The jit-compiled sampler for a configuration (compiled once, then cached)."""
        key = (options, guided)
        if key not in self._samplers:
            self._samplers[key] = CompiledSampler(make_sampler(self.models, options, guided=guided), self.mesh)
        return self._samplers[key]

    def prepare(self, image, mask=None, invert_mask: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(init [1,S,S,3] in [-1,1], mask [1,S,S,1] in {0,1}) as the reference prepares them."""
        pil = image_io.to_pil(image, "image")
        init = image_io.load_image(pil, self.image_size)
        m = image_io.load_mask(mask, self.image_size, image_size=pil.size, invert_mask=invert_mask)
        return init[None], m[None]

    def edit(self, image, mask=None, prompt: str = "", *, num_samples: int = 32, seed: int = 404,
             invert_mask: bool = False, progress: bool = True, **options) -> EditResult:
        """Edit the masked region of `image` to match `prompt`; returns results ranked best first.

        Samples are spread over every device; on several hosts each process gets back the
        samples its devices produced.

        options: the reference's flags (see EditOptions): skip_timesteps, timestep_respacing, ddim,
        clip_guidance_lambda, range_lambda, aug_num, local_clip_guided_diffusion,
        background_preservation_loss, lpips_sim_lambda, l2_sim_lambda, enforce_background,
        batch_size, randomize_class, symmetric_translation.
        """
        opts = self.options(**options)
        check_request(num_samples, seed)
        init, m = self.prepare(image, mask, invert_mask)
        text_embed = self.encode_prompt(prompt)
        rows = lambda a: np.broadcast_to(a, (num_samples, *np.shape(a)[1:]))  # noqa: E731
        out = self.sample(opts, prompt != "", rows(init), rows(m), rows(np.asarray(text_embed)[None]),
                          np.arange(num_samples), np.full(num_samples, seed), progress=progress)
        order = np.argsort(out["distances"], kind="stable")
        return EditResult(
            images=np.round(out["images"][order] * 255).astype(np.uint8), distances=out["distances"][order],
            sample_ids=out["rows"][order], seed=seed,
            source=np.round((init[0] + 1) * 127.5).astype(np.uint8),
            mask=(m[0, ..., 0] * 255).astype(np.uint8), prompt=prompt, options=opts)

    def options(self, **options) -> EditOptions:
        """EditOptions from the reference's flag names, checked against these networks."""
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {', '.join(OPTION_NAMES)}")
        opts = EditOptions(**options)
        opts.validate()
        if opts.background_preservation_loss and opts.lpips_sim_lambda and self.models.lpips is None:
            raise ValueError("background_preservation_loss needs LPIPS weights: convert them with "
                             "python -m checkpoints_convert.lpips, or set lpips_sim_lambda=0")
        return opts

    def sample(self, options: EditOptions, guided: bool, init, mask, text_embed, sample_ids, seeds,
               progress: bool = False) -> dict:
        """Run N independent samples, each with its own inputs, `options.batch_size` at a time.

        init [N, S, S, 3] in [-1, 1], mask [N, S, S, 1], text_embed [N, D], sample_ids [N], seeds [N].
        Returns {"rows", "images" [n, S, S, 3] in [0, 1], "distances" [n]} for the n rows this
        process computed (all N on one host); "rows" are their indices into the inputs.
        """
        run = self.sampler(options, guided)
        n = len(sample_ids)
        global_batch = parallel.padded_batch(options.batch_size, self.mesh.devices.size)
        mine = parallel.process_slice(global_batch, self.mesh)
        bar = None
        if progress and jax.process_index() == 0:  # one bar on multi-host runs
            chunks = -(-n // options.batch_size)
            bar = tqdm(total=run.num_steps * chunks * (mine.stop - mine.start),
                       desc="blended diffusion", unit="sample-step")
        inputs = (init, mask, text_embed, np.asarray(sample_ids, np.int32), np.asarray(seeds, np.int32))
        rows, images, distances = [], [], []
        try:
            for start in range(0, n, options.batch_size):
                layout, valid = parallel.spread(np.arange(start, min(start + options.batch_size, n)), global_batch)
                local, keep = layout[mine], valid[mine]
                on_steps = None if bar is None else (lambda steps: bar.update(steps * (mine.stop - mine.start)))
                out = run(self.params, *(parallel.put_batch(np.asarray(a)[local], self.mesh, global_batch)
                                         for a in inputs), on_steps=on_steps)
                images.append(parallel.local_rows(out["images"])[keep])
                distances.append(parallel.local_rows(out["distances"])[keep])
                rows.append(local[keep])
        finally:
            if bar is not None:
                bar.close()
        return {"rows": np.concatenate(rows), "images": np.concatenate(images),
                "distances": np.concatenate(distances)}


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

    def __call__(self, params, init, mask, text_embed, sample_ids, seeds, on_steps=None) -> dict:
        """Run every step; `on_steps(k)` is called on the host as each chunk of k steps finishes.
        Chunks are queued ahead, so the device never waits for the host."""
        state = self.begin(params, init, mask, text_embed, sample_ids, seeds)
        previous = None
        for chunk in self.chunks:
            state = self.advance(params, state, chunk)
            if on_steps is not None:
                if previous is not None:
                    jax.block_until_ready(previous["x"])
                    on_steps(len(chunk))
                previous = state
        out = self.end(params, state)
        if on_steps is not None:
            jax.block_until_ready(out)
            on_steps(len(self.chunks[-1]))
        return out
