"""One edit, checked and prepared once: counts, options and prompt checked, image and mask decoded.

`prepare` is where an edit's inputs are decoded (through bdjax/image_io.py) and its counts,
options and prompt checked; the editor runs the `Request` it returns as it is. The launch programs
prepare theirs before any network is built, batch jobs share the prepared `Inputs` of each
distinct image and mask, and every extrapolation round prepares its window.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from bdjax import image_io, tokenizer
from bdjax.options import EditOptions, check_request


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """An image and its mask as the model sees them, kept as uint8 (a quarter of the float
    arrays' memory); `init` and `region` give back exactly what image_io returns."""
    source: np.ndarray        # [S, S, 3] uint8: the image at the model size
    mask: np.ndarray          # [S, S] uint8 {0, 255}: 255 where the image is edited (after invert_mask)
    invert_mask: bool = False
    # What decoding warned about (an animated file, a mask of another size), held to be shown once.
    warnings: tuple[warnings.WarningMessage, ...] = ()

    @property
    def size(self) -> int:
        return self.source.shape[0]

    @property
    def init(self) -> np.ndarray:
        """[S, S, 3] float32 in [-1, 1], bit for bit what image_io.load_image returns."""
        return np.asarray(self.source, np.float32) / 255.0 * 2 - 1

    @property
    def region(self) -> np.ndarray:
        """[S, S, 1] float32 in {0, 1}, 1 where the image is edited: what image_io.load_mask returns."""
        return (self.mask[..., None] > 0).astype(np.float32)

    def show_warnings(self) -> None:
        """Show the held warnings, each as raised where it was raised."""
        for w in self.warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def prepare_inputs(image, mask=None, *, invert_mask: bool = False, image_size: int) -> Inputs:
    """`image` and `mask` (paths, PIL images or arrays; no mask edits everything) decoded once and
    resized to `image_size` as the reference prepares them; their warnings are held, not shown.
    image_io.InputError (a ValueError) says what is wrong with either."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pil = image_io.to_pil(image, "image")
        init = image_io.load_image(pil, image_size)
        region = image_io.load_mask(mask, image_size, image_size=pil.size, invert_mask=invert_mask)
    return Inputs(source=np.round((init + 1) * 127.5).astype(np.uint8), mask=(region[..., 0] * 255).astype(np.uint8),
                  invert_mask=invert_mask, warnings=tuple(caught))


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One edit, checked and prepared: what `BlendedDiffusion.edit` and `edit_batches` run."""
    inputs: Inputs
    prompt: str
    tokens: np.ndarray        # [1, context_length] int32: the prompt's CLIP tokens
    num_samples: int
    seed: int
    options: EditOptions

    @property
    def init(self) -> np.ndarray:
        """[1, S, S, 3] float32 in [-1, 1]: the image as the sampler takes it."""
        return self.inputs.init[None]

    @property
    def region(self) -> np.ndarray:
        """[1, S, S, 1] float32 in {0, 1}: the mask as the sampler takes it."""
        return self.inputs.region[None]

    @property
    def source(self) -> np.ndarray:
        """[S, S, 3] uint8: the image at the model size."""
        return self.inputs.source

    @property
    def mask(self) -> np.ndarray:
        """[S, S] uint8 {0, 255}: the mask at the model size, after invert_mask."""
        return self.inputs.mask

    @property
    def invert_mask(self) -> bool:
        return self.inputs.invert_mask

    @property
    def size(self) -> int:
        return self.inputs.size

    def with_prompt(self, prompt: str) -> "Request":
        """The same edit with another prompt (tokenized here; nothing else is checked again)."""
        return dataclasses.replace(self, prompt=prompt,
                                   tokens=tokenizer.tokenize(prompt, context_length=self.tokens.shape[-1]))


def check(prompt: str, *, num_samples: int, seed: int, options: EditOptions,
          context_length: int = tokenizer.CONTEXT_LENGTH) -> np.ndarray:
    """The checks that need no pixels: the counts, the options, the prompt's length. Returns the
    prompt's tokens [1, context_length]; ValueError names the first problem."""
    check_request(num_samples, seed)
    options.validate()
    return tokenizer.tokenize(prompt, context_length=context_length)


def prepare(image, mask=None, prompt: str = "", *, num_samples: int, seed: int, invert_mask: bool = False,
            options: EditOptions, image_size: int, context_length: int = tokenizer.CONTEXT_LENGTH) -> Request:
    """The edit of `image` (a path, a PIL image or an array) in `mask` (likewise; None edits the
    whole image, `invert_mask` the zero pixels) towards `prompt`: checked (`check`), decoded and
    resized to `image_size`. The decoder's warnings are shown once everything has passed, and kept
    in `request.inputs.warnings`."""
    tokens = check(prompt, num_samples=num_samples, seed=seed, options=options, context_length=context_length)
    inputs = prepare_inputs(image, mask, invert_mask=invert_mask, image_size=image_size)
    inputs.show_warnings()
    return Request(inputs=inputs, prompt=prompt, tokens=tokens, num_samples=num_samples, seed=seed,
                   options=options)
