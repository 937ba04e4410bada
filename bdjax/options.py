"""The edit options, declared once.

`EditOptions` is the one declaration: each field's name, type, default, help and reference name.
Everything else is derived from it: the launch programs' flags (launch/runtime.py), the batch
manifest's fields (`EditOptions.from_fields`), the API's keyword arguments
(`BlendedDiffusion.edit(..., **options)`), validation, and the options written into reports
(`dataclasses.asdict`). The guidance weights are read from it by name (bdjax/guidance.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Union

import numpy as np

from bdjax.errors import OptionError  # also bdjax.options.OptionError, as before

# The values each option type accepts: ints are floats too; bools are nothing else. A BatchSize
# (an int or the one string AUTO) is checked by `check_batch_size`.
_ACCEPTED = {"bool": (bool, np.bool_), "int": (int, np.integer), "float": (int, float, np.integer, np.floating),
             "str": (str,)}

# batch_size="auto": the largest batch that fits the accelerator's memory (bdjax/fit.py).
AUTO = "auto"
BatchSize = Union[int, str]  # a batch_size: a whole number of at least 1, or AUTO

# The most samples one edit (one run, one manifest job) may ask for.
MAX_NUM_SAMPLES = 100_000


def option(default, help: str, reference: str | None = None, flag_default=None) -> Any:
    """A field of EditOptions: its default, one line of help, and the reference's name for it
    (by default the field's own name; "" for an option the reference does not have);
    `flag_default`, where the launch programs' flag defaults to something else (`flag_default`)."""
    metadata = {"help": help, "reference": reference}
    if flag_default is not None:
        metadata["flag_default"] = flag_default
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class EditOptions:
    """Sampling options, named and defaulted as the reference's flags."""
    skip_timesteps: int = option(25, "Diffusion steps skipped at the start.")
    timestep_respacing: str = option("100", "Respacing of the 1000 steps: '100', '10,20,30', 'ddim50'.")
    ddim: bool = option(False, "DDIM sampling with score conditioning instead of ancestral steps.")
    clip_guidance_lambda: float = option(1000.0, "Weight of the CLIP loss.")
    range_lambda: float = option(50.0, "Weight of the loss keeping predictions in [-1, 1].")
    aug_num: int = option(8, "Augmented copies per sample for the CLIP loss.")
    local_clip_guided_diffusion: bool = option(False, "The Algorithm 1 baseline: no blending.")
    background_preservation_loss: bool = option(False, "Algorithm 1: add LPIPS + L2 background losses.")
    lpips_sim_lambda: float = option(1000.0, "Weight of the LPIPS background loss.")
    l2_sim_lambda: float = option(10000.0, "Weight of the L2 background loss.")
    enforce_background: bool = option(True, "Paste the original background into the final result.")
    batch_size: BatchSize = option(4, "Samples per diffusion run (spread over all devices), or 'auto': on a GPU or "
                                   "TPU the largest batch whose compiled sampler fits the device's memory (on a CPU "
                                   "4). Also the divisor of the L2 background loss, as in the reference (with auto: "
                                   "4, so results do not depend on the device).", flag_default=AUTO)
    randomize_class: bool = option(True, "Class-conditional UNet (512): a fresh random class per sample and step, "
                                   "as the reference samples; off: class 0.", reference="")
    symmetric_translation: bool = option(False, "Augmentations translate both ways; off: the reference's "
                                         "vertical-only translation.", reference="")
    # How the results are ranked (bdjax/scores.py); the sampling does not depend on these.
    rank_by: str = option("clip_masked", "Rank the results by clip_masked (the reference's CLIP distance of the "
                          "masked result), clip_whole (of the whole result) or combined (see rank_*_weight).",
                          reference="")
    rank_whole_weight: float = option(1.0, "rank_by=combined: weight of clip_whole.", reference="")
    rank_seam_weight: float = option(0.02, "rank_by=combined: weight of ln(seam).", reference="")
    rank_background_weight: float = option(1.0, "rank_by=combined: weight of background_lpips.", reference="")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def declaration(cls) -> tuple[dataclasses.Field, ...]:
        """Every option's field: .name, .type ("bool", "int", "float", "str", or "BatchSize": an
        int or AUTO), .default, .metadata["help"], and `reference_name(field)`; `flag_default(field)`
        is the launch programs' default."""
        return dataclasses.fields(cls)

    @property
    def sampling(self) -> "EditOptions":
        """These options with the ranking ones (RANKING) at their defaults: what the sampler
        depends on, so that ranking differently reuses the compiled sampler."""
        defaults = EditOptions()
        return dataclasses.replace(self, **{name: getattr(defaults, name) for name in RANKING})

    @property
    def nominal_batch(self) -> int:
        """The batch the results are numbered and weighed by: `batch_size`, or with AUTO the
        default batch (4). The L2 background loss divides by it (bdjax/guidance.py) and the
        reference's file names count iterations of it, so that with AUTO a sample's result does
        not depend on how many rows the device's memory allows."""
        return DEFAULT_BATCH if self.batch_size == AUTO else int(self.batch_size)

    @property
    def sampler(self) -> str:
        """The diffusion sampler by name (bdjax/diffusion.py): "ddim" or "ddpm"."""
        return "ddim" if self.ddim else "ddpm"

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], base: "EditOptions | None" = None) -> "EditOptions":
        """`base` (default: the reference's options) with `values` replacing its fields, each
        checked against the field's type (JSON numbers, flag values); ValueError names a value of
        the wrong type, TypeError an unknown name. Ranges are checked by `validate`."""
        base = cls() if base is None else base
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown}; known: {', '.join(cls.names())}")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        typed = {name: check_type(name, value, kinds[name]) for name, value in values.items()}
        return dataclasses.replace(base, **{name: float(value) if kinds[name] == "float" else value
                                            for name, value in typed.items()})

    def validate(self, num_timesteps: int | None = None) -> None:
        """Raise ValueError for settings the sampler cannot run: a value of the wrong type, a
        non-finite number, a bad respacing, skip_timesteps outside the schedule; `num_timesteps`
        defaults to the respaced schedule's length."""
        for field in dataclasses.fields(self):
            check_type(field.name, getattr(self, field.name), field.type)
        if num_timesteps is None:
            from bdjax import diffusion

            num_timesteps = diffusion.respaced_length(self.timestep_respacing)
        self.check_start(num_timesteps)
        if self.aug_num < 1:
            raise OptionError("aug_num", f"aug_num={self.aug_num} must be at least 1")
        check_batch_size(self.batch_size)
        if self.rank_by not in RANK_BY:
            raise OptionError("rank_by", f"rank_by={self.rank_by!r} must be one of {', '.join(RANK_BY)}")

    def check_start(self, num_timesteps: int) -> None:
        """ValueError unless skip_timesteps leaves a step of the `num_timesteps`-step schedule to run."""
        if not 0 <= self.skip_timesteps < num_timesteps:
            raise OptionError("skip_timesteps", f"skip_timesteps={self.skip_timesteps} must be in "
                              f"[0, {num_timesteps}) for timestep_respacing={self.timestep_respacing!r}")


DEFAULT_BATCH = EditOptions.batch_size  # the class attribute: the field's default, 4 (the reference's)
RANK_BY = ("clip_masked", "clip_whole", "combined")  # what results may be ranked by (bdjax/scores.py)
RANKING = ("rank_by", "rank_whole_weight", "rank_seam_weight", "rank_background_weight")


def reference_name(field: dataclasses.Field) -> str:
    """The reference's name for an option ("" where the reference has no such option)."""
    reference = field.metadata.get("reference")
    return field.name if reference is None else reference


def flag_default(field: dataclasses.Field):
    """The launch programs' default for an option: its own default unless the declaration gives
    the flag another (batch_size: AUTO)."""
    return field.metadata.get("flag_default", field.default)


def check_batch_size(value) -> BatchSize:
    """`value` if it is a batch size (a whole number of at least 1, or AUTO); OptionError naming
    the fix otherwise."""
    auto = f"{AUTO!r} (the largest batch that fits the device's memory)"
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not (whole or value == AUTO):
        raise OptionError("batch_size", f"batch_size={value!r} should be of type int (a whole number of at least 1) "
                          f"or {auto}")
    if whole and value < 1:
        raise OptionError("batch_size", f"batch_size={value} must be at least 1, or {auto}")
    return value


def parse_batch_size(text) -> BatchSize:
    """A batch size typed as text (a flag, a page field): AUTO, or the int it spells; OptionError
    (as `check_batch_size`) for anything else. Ints and AUTO pass through."""
    if isinstance(text, str):
        text = text.strip()
        if text != AUTO:
            try:
                text = int(text)
            except ValueError:
                pass
    return check_batch_size(text)


def _finite(value) -> bool:
    try:
        return bool(np.isfinite(float(value)))
    except OverflowError:  # an int too large for a float
        return False


def check_type(name: str, value, kind: str):
    """`value`, checked to be of type `kind` ("bool", "int", "float", "str"); ValueError naming
    `name` when it is not (a bool is not a number here, an int is a float) or is a non-finite float."""
    if kind == "BatchSize":
        return check_batch_size(value)
    accepted = _ACCEPTED[kind]
    if not isinstance(value, accepted) or (kind != "bool" and isinstance(value, (bool, np.bool_))):
        raise OptionError(name, f"{name}={value!r} should be of type {kind}")
    if kind == "float" and not _finite(value):
        raise OptionError(name, f"{name}={value} must be a finite number")
    return value


def check_request(num_samples: int, seed: int) -> None:
    """The checks on one edit's sample count and seed, shared by the API, the launch programs
    (whose flags have these names) and manifests."""
    for name, value in (("num_samples", num_samples), ("seed", seed)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise OptionError(name, f"{name}={value!r} should be an integer")
    if num_samples < 1:
        raise OptionError("num_samples", f"num_samples={num_samples} must be at least 1")
    if num_samples > MAX_NUM_SAMPLES:
        raise OptionError("num_samples", f"num_samples={num_samples} is more than {MAX_NUM_SAMPLES:,}, the most one "
                          "edit may ask for: split the work into several runs (or batch manifest jobs) with different "
                          "seeds")
    if not 0 <= seed < 2 ** 31:
        raise OptionError("seed", f"seed={seed} must be in [0, 2**31)")
