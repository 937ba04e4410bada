"""The edit options are declared once (bdjax/options.py); flags, manifest fields, API keywords,
validation and the flag table (docs/flags.md) must all follow that declaration."""

import dataclasses
import os
import re

import numpy as np
import pytest
from absl import flags

from bdjax import smoke
from bdjax.options import (MAX_NUM_SAMPLES, EditOptions, OptionError, check_request, check_type, flag_default,
                           parse_batch_size, reference_name)
from launch import runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fresh_flags(argv: list[str]) -> flags.FlagValues:
    """The shared --config flag and every option flag, parsed from `argv`, in a FlagValues of their own."""
    values = flags.FlagValues()
    runtime.define_config_flag(values)
    runtime.define_option_flags(values)
    values(["program", *argv])
    return values


def test_every_option_is_a_flag_with_its_declared_type_default_and_help():
    values = fresh_flags([])
    parsers = {"bool": flags.BooleanParser, "int": flags.IntegerParser, "float": flags.FloatParser,
               "str": flags.ArgumentParser, "BatchSize": runtime.BatchSizeParser}
    for field in EditOptions.declaration():
        flag = values[field.name]
        assert flag.default == flag_default(field) and type(flag.parser) is parsers[field.type], field.name
        assert flag.help == field.metadata["help"] and flag.help
    # The launch programs' one default of their own: batch_size auto (the API's stays 4, the reference's).
    assert EditOptions(**runtime.options_from_flags(values)) == EditOptions(batch_size="auto")
    assert EditOptions().batch_size == 4 and values["batch_size"].default == "auto"


@pytest.mark.parametrize("argv, value", [([], "auto"), (["--batch_size=auto"], "auto"), (["--batch_size=8"], 8),
                                         (["--batch_size", "3"], 3)])
def test_the_batch_size_flag_takes_a_number_or_auto(argv, value):
    assert fresh_flags(argv).batch_size == value


@pytest.mark.parametrize("bad", ["big", "0", "-2", "2.5", ""])
def test_the_batch_size_flag_refuses_anything_else_in_one_line(bad):
    with pytest.raises(flags.IllegalFlagValueError, match=r"not a whole number of at least 1, nor auto") as e:
        fresh_flags([f"--batch_size={bad}"])
    assert "\n" not in str(e.value)


def test_batch_size_auto_in_the_api_and_its_refusals():
    options = EditOptions.from_fields({"batch_size": "auto"})
    options.validate()
    assert options.batch_size == "auto" and options.nominal_batch == 4 and options.sampling.batch_size == "auto"
    assert EditOptions.from_fields({"batch_size": 6}).nominal_batch == 6
    for bad in ("big", 0, -1, 2.5, True, None):
        with pytest.raises(OptionError, match=r"^batch_size=.* or 'auto' \(the largest batch that fits the device's "
                                              r"memory\)$"):
            EditOptions.from_fields({"batch_size": bad})
    assert [parse_batch_size(v) for v in ("auto", " 8 ", 3)] == ["auto", 8, 3]


def test_flags_set_options_and_the_smoke_preset_fills_only_unset_ones():
    values = fresh_flags(["--config=smoke", "--aug_num=6", "--symmetric_translation", "--norandomize_class",
                          "--clip_guidance_lambda=3"])
    options = EditOptions.from_fields(runtime.options_from_flags(values))
    assert options == EditOptions(**{**smoke.OPTIONS, "aug_num": 6, "symmetric_translation": True,
                                     "randomize_class": False, "clip_guidance_lambda": 3.0})
    real = EditOptions.from_fields(runtime.options_from_flags(fresh_flags(["--skip_timesteps=40"])))
    assert real == dataclasses.replace(EditOptions(), skip_timesteps=40, batch_size="auto")  # the flag's default


def test_from_fields_checks_types_converts_numbers_and_keeps_the_base():
    base = EditOptions(aug_num=2)
    options = EditOptions.from_fields({"clip_guidance_lambda": 7, "ddim": True}, base)
    assert options.clip_guidance_lambda == 7.0 and type(options.clip_guidance_lambda) is float
    assert options.ddim and options.aug_num == 2 and options.sampler == "ddim"
    assert EditOptions().sampler == "ddpm"
    for name, value, kind in (("aug_num", 2.0, "int"), ("ddim", 1, "bool"), ("range_lambda", True, "float"),
                              ("timestep_respacing", 100, "str")):
        with pytest.raises(ValueError, match=rf"^{name}={re.escape(repr(value))} should be of type {kind}$"):
            EditOptions.from_fields({name: value})
    with pytest.raises(ValueError, match="finite"):
        EditOptions.from_fields({"l2_sim_lambda": float("nan")})
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['steps'\]; known: skip_timesteps, "):
        EditOptions.from_fields({"steps": 3})
    assert check_type("seed", np.int32(3), "int") == 3


def test_reference_names():
    names = {f.name: reference_name(f) for f in EditOptions.declaration()}
    assert names["skip_timesteps"] == "skip_timesteps" and names["enforce_background"] == "enforce_background"
    assert names["randomize_class"] == "" and names["symmetric_translation"] == ""


def test_readme_flag_table_lists_every_option_with_its_default():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        rows = dict(re.findall(r"^\| `--(\w+)` \| ([^|]+) \|", f.read(), flags=re.M))
    for field in EditOptions.declaration():
        assert field.name in rows, f"docs/flags.md's flag table has no row for --{field.name}"
        shown = rows[field.name].strip().strip("`")
        default = flag_default(field)
        expected = {True: "true", False: "false"}.get(default, default) if field.type == "bool" else default
        assert shown == str(expected).removesuffix(".0"), (field.name, shown)


def test_the_sampler_refuses_a_start_outside_the_schedule_for_callers_without_a_request():
    from bdjax import blended
    from bdjax.models import clip as clip_lib
    from bdjax.models import unet as unet_lib

    models = blended.Models(unet=unet_lib.UNetModel(**smoke.unet_config()), clip=clip_lib.CLIP(**smoke.CLIP_CONFIG))
    with pytest.raises(ValueError, match=r"^skip_timesteps=25 must be in \[0, 25\) for timestep_respacing='25'$"):
        blended.make_sampler(models, EditOptions(timestep_respacing="25", skip_timesteps=25), guided=True)
    sampler = blended.make_sampler(models, EditOptions(timestep_respacing="25", skip_timesteps=24), guided=True)
    assert sampler.indices.tolist() == [0]


@pytest.mark.parametrize("name, check", [
    ("aug_num", lambda: EditOptions(aug_num=0).validate()),
    ("batch_size", lambda: EditOptions(batch_size=0).validate()),
    ("skip_timesteps", lambda: EditOptions(skip_timesteps=100).validate()),
    ("timestep_respacing", lambda: EditOptions(timestep_respacing="ddim").validate()),
    ("clip_guidance_lambda", lambda: EditOptions(clip_guidance_lambda=float("nan")).validate()),
    ("ddim", lambda: EditOptions.from_fields({"ddim": 1})),
    ("num_samples", lambda: check_request(0, 1)),
    ("num_samples", lambda: check_request(MAX_NUM_SAMPLES + 1, 1)),
    ("seed", lambda: check_request(1, -1)),
    ("seed", lambda: check_request(1, "3")),
])
def test_a_refused_value_names_its_option(name, check):
    """Programs name their own flag or field from `OptionError.name`, not from the message's text."""
    with pytest.raises(OptionError) as e:
        check()
    assert e.value.name == name and str(e.value).startswith(f"{name}=")
    assert isinstance(e.value, ValueError)
