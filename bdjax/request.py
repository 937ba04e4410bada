"""One edit, checked and prepared once: counts, options and prompt checked, image and mask decoded.

`prepare` is where an edit's inputs are decoded (through bdjax/image_io.py) and framed (in window
mode, the default, a square around the mask of the full-size photo: bdjax/window.py; with
fit="stretch", the reference's whole image stretched to the model size), and its counts, options
and prompt checked; the editor runs the `Request` it returns as it is. The launch programs
prepare theirs before any network is built, batch jobs share the prepared `Inputs` of each
distinct image and mask, and every extrapolation round prepares its window.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from bdjax import image_io, tokenizer
from bdjax import window as window_lib
from bdjax.options import EditOptions, OptionError, check_request

FITS = ("window", "stretch")
FRAMING = ("fit", "context", "feather")  # how an edit maps onto the photo (`prepare_inputs`)
# Above this many photo pixels per model pixel, the upscaled edit looks soft: a warning says so.
MAX_UPSCALE = 4.0
# Prompts are refused above this many characters before tokenizing (CLIP reads 77 tokens, about
# 300 characters of English), so that a huge prompt costs no time.
MAX_PROMPT_CHARS = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class Inputs:
    """An image and its mask as the model sees them, kept as uint8 (a quarter of the float
    arrays' memory); `init` and `region` give back exactly what image_io returns.

    In window mode (`fit="window"`) they are the model-size crop of a square `window` around
    the mask of the full-resolution `photo`, and `compose` pastes edits back into the photo; with
    `fit="stretch"` (the reference's way) they are the whole image stretched to the model size,
    `photo` is None and results stay at the model size."""
    source: np.ndarray        # [S, S, 3] uint8: the image (or its window) at the model size
    mask: np.ndarray          # [S, S] uint8 {0, 255}: 255 where the image is edited (after invert_mask)
    invert_mask: bool = False
    # What decoding warned about (an animated file, a mask of another size), held to be shown once.
    warnings: tuple[warnings.WarningMessage, ...] = ()
    photo: window_lib.Photo | None = None     # window mode: the decoded photo at full resolution
    window: window_lib.Window | None = None   # window mode: the square the model edits
    context: float = window_lib.DEFAULT_CONTEXT
    feather: int = window_lib.DEFAULT_FEATHER

    @property
    def size(self) -> int:
        return self.source.shape[0]

    @property
    def fit(self) -> str:
        return "stretch" if self.photo is None else "window"

    @property
    def nbytes(self) -> int:
        """Host memory held (for caches that bound it)."""
        held = self.source.nbytes + self.mask.nbytes
        if self.photo is not None:
            held += self.photo.rgb.nbytes + self.photo.mask.nbytes
            held += 0 if self.photo.alpha is None else self.photo.alpha.nbytes
        return held

    @property
    def full_source(self) -> np.ndarray:
        """What the results replace: the photo at full size (RGB) in window mode, else `source`."""
        return self.source if self.photo is None else self.photo.rgb

    @property
    def full_mask(self) -> np.ndarray:
        """The mask over `full_source` ({0, 255} uint8)."""
        return self.mask if self.photo is None else self.photo.mask.astype(np.uint8) * 255

    def compose(self, edits: np.ndarray) -> np.ndarray:
        """Results the user gets from the model's edits [n, S, S, 3] uint8: in window mode each
        pasted into the photo ([n, H, W, 3], or 4 channels with the input's alpha; every pixel
        farther than `feather` from the mask is the input's); with fit="stretch" the edits."""
        if self.photo is None:
            return edits
        height, width = self.photo.rgb.shape[:2]
        out = np.empty((len(edits), height, width, 3 if self.photo.alpha is None else 4), np.uint8)
        for i, edit in enumerate(edits):  # one pasted photo alive at a time besides the output
            out[i] = window_lib.paste(self.photo, self.window, edit, feather=self.feather)
        return out

    def framing(self) -> dict:
        """How the edit maps onto the photo, for reports and provenance ({} with fit="stretch",
        whose files read as before)."""
        if self.photo is None:
            return {}
        return {"fit": "window", "window": self.window.as_dict(), "scale": round(self.window.scale(self.size), 4),
                "context": self.context, "feather": self.feather, "note": self.photo.note or None}

    def framing_line(self) -> str:
        """One line saying where the model edits the photo and at what scale."""
        if self.photo is None:
            return f"the whole image stretched to {self.size}x{self.size} (fit=stretch)"
        (width, height), w = self.photo.size, self.window
        scale = w.scale(self.size)
        if scale > 1:
            how = f"upscaled {scale:.1f}x"
        elif scale < 1:
            how = f"downscaled {1 / scale:.1f}x"
        else:
            how = "at its own scale"
        return (f"editing a {w.side}x{w.side} window at ({w.left}, {w.top}) of the {width}x{height} photo at "
                f"{self.size} px, {how} back (context {self.context:g}, feather {self.feather})")

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


def check_framing(fit: str, context: float, feather: int) -> None:
    """OptionError for a framing an edit cannot use."""
    if fit not in FITS:
        raise OptionError("fit", f"fit={fit!r} must be one of {', '.join(FITS)}")
    if isinstance(context, bool) or not isinstance(context, (int, float)) or not np.isfinite(context) \
            or not 0 <= context <= 10:
        raise OptionError("context", f"context={context!r} must be a number in [0, 10] (the margin around the "
                          "mask, as a fraction of its long side)")
    if isinstance(feather, bool) or not isinstance(feather, (int, np.integer)) \
            or not 0 <= feather <= window_lib.MAX_FEATHER:
        raise OptionError("feather", f"feather={feather!r} must be an integer in [0, {window_lib.MAX_FEATHER}] "
                          "(photo pixels of soft edge; 0 pastes hard)")


def prepare_inputs(image, mask=None, *, invert_mask: bool = False, image_size: int, fit: str = "window",
                   context: float = window_lib.DEFAULT_CONTEXT,
                   feather: int = window_lib.DEFAULT_FEATHER) -> Inputs:
    """`image` and `mask` (paths, PIL images or arrays; no mask edits everything) decoded once, as
    `fit` says: "window" (the default) decodes the photo at full resolution and cuts the square
    window around the mask (`context`: the margin on each side as a fraction of the mask's long
    side) at `image_size`, to be pasted back with a soft edge of `feather` photo pixels;
    "stretch" resizes the whole image to `image_size` as the reference does. Their warnings are
    held, not shown. image_io.InputError (a ValueError) says what is wrong with either."""
    check_framing(fit, context, feather)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if fit == "stretch":
            pil = image_io.to_pil(image, "image")
            init = image_io.load_image(pil, image_size)
            region = image_io.load_mask(mask, image_size, image_size=pil.size, invert_mask=invert_mask)
            return Inputs(source=np.round((init + 1) * 127.5).astype(np.uint8),
                          mask=(region[..., 0] * 255).astype(np.uint8), invert_mask=invert_mask,
                          warnings=tuple(caught), context=context, feather=feather)
        photo = window_lib.decode(image, mask, invert_mask=invert_mask)
        window = window_lib.choose(photo.mask, context=context, model_size=image_size)
        source, region = window_lib.crop(photo, window, image_size)
        if photo.note:
            warnings.warn(f"image: {photo.note}")
        scale = window.scale(image_size)
        if scale > MAX_UPSCALE:
            warnings.warn(f"the edit window spans {window.side} px: the edit is made at {image_size} px and upscaled "
                          f"{scale:.1f}x; mask a smaller region, or use model_output_size=512")
    return Inputs(source=source, mask=region, invert_mask=invert_mask, warnings=tuple(caught), photo=photo,
                  window=window, context=float(context), feather=int(feather))


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
    def full_source(self) -> np.ndarray:
        """The image the results replace, at the size they come back (`Inputs.full_source`)."""
        return self.inputs.full_source

    @property
    def full_mask(self) -> np.ndarray:
        return self.inputs.full_mask

    @property
    def size(self) -> int:
        return self.inputs.size

    def with_prompt(self, prompt: str) -> "Request":
        """The same edit with another prompt (checked and tokenized here; nothing else is checked
        again)."""
        check_prompt(prompt)
        other = dataclasses.replace(self, prompt=prompt,
                                    tokens=tokenizer.tokenize(prompt, context_length=self.tokens.shape[-1]))
        return other._mark_checked() if self._checked else other

    # Set (outside the fields, so that dataclasses.replace does not copy it) on the requests that
    # `prepare` and `with_prompt` made: checked once, they are not checked again.
    _checked = False

    def _mark_checked(self) -> "Request":
        object.__setattr__(self, "_checked", True)
        return self

    def checked(self, context_length: int) -> "Request":
        """This request, checked as `prepare` checks it (counts, options, prompt, and its tokens
        those of its prompt for a CLIP reading `context_length`) unless `prepare` made it: a
        Request changed with dataclasses.replace runs only if it is one `prepare` could have made."""
        if self._checked:
            return self
        tokens = check(self.prompt, num_samples=self.num_samples, seed=self.seed, options=self.options,
                       context_length=context_length)
        if not np.array_equal(np.asarray(self.tokens), tokens):
            raise ValueError("the request's tokens are not those of its prompt: change a prepared request's prompt "
                             "with request.with_prompt(prompt), not dataclasses.replace")
        return self._mark_checked()


def check_prompt(prompt) -> None:
    """OptionError unless `prompt` is text of at most MAX_PROMPT_CHARS characters ("" runs
    unguided)."""
    if not isinstance(prompt, str):
        raise OptionError("prompt", f"prompt={prompt!r:.60} should be text (a str; '' runs unguided), not "
                          f"{type(prompt).__name__}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise OptionError("prompt", f"the prompt is {len(prompt):,} characters long, more than the "
                          f"{MAX_PROMPT_CHARS:,} allowed (CLIP reads 77 tokens, about 300 characters): shorten it")


def check(prompt: str, *, num_samples: int, seed: int, options: EditOptions,
          context_length: int = tokenizer.CONTEXT_LENGTH) -> np.ndarray:
    """The checks that need no pixels: the counts, the options, the prompt (its type and length,
    in characters before tokenizing, then in tokens). Returns the prompt's tokens
    [1, context_length]; ValueError names the first problem."""
    check_request(num_samples, seed)
    if not isinstance(options, EditOptions):
        raise OptionError("options", f"options should be an EditOptions, not {type(options).__name__}")
    options.validate()
    check_prompt(prompt)
    return tokenizer.tokenize(prompt, context_length=context_length)


def prepare(image, mask=None, prompt: str = "", *, num_samples: int, seed: int, invert_mask: bool = False,
            options: EditOptions, image_size: int, context_length: int = tokenizer.CONTEXT_LENGTH,
            fit: str = "window", context: float = window_lib.DEFAULT_CONTEXT,
            feather: int = window_lib.DEFAULT_FEATHER) -> Request:
    """The edit of `image` (a path, a PIL image or an array) in `mask` (likewise; None edits the
    whole image, `invert_mask` the zero pixels) towards `prompt`: checked (`check`), decoded and
    framed as `fit`, `context` and `feather` say (`prepare_inputs`). The decoder's warnings are
    shown once everything has passed, and kept in `request.inputs.warnings`."""
    tokens = check(prompt, num_samples=num_samples, seed=seed, options=options, context_length=context_length)
    inputs = prepare_inputs(image, mask, invert_mask=invert_mask, image_size=image_size, fit=fit, context=context,
                            feather=feather)
    inputs.show_warnings()
    return Request(inputs=inputs, prompt=prompt, tokens=tokens, num_samples=num_samples, seed=seed,
                   options=options)._mark_checked()
