"""Tests for imagen_jax.config_utils: parse_arg, and the config file flag whose unknown
override keys stop flag parsing with one line naming the closest key."""

import ml_collections
import pytest
from absl import flags

from imagen_jax.config_utils import define_config_file, override_paths, parse_arg

SPEC = dict(
    runlocal=False,
    res=64,
    guidance=5.0,
    sampler="ddpm",
    channel_mult=(1, 2, 4),
    scales=(0.5, 1.0),
    stages=("base", "sr256"),
    steps=[10, 20],
)


def test_example_from_docs():
    arg = parse_arg("runlocal,res=32,sampler=ddim,guidance=7.5", **SPEC)
    assert isinstance(arg, ml_collections.ConfigDict)
    assert arg.runlocal is True
    assert arg.res == 32
    assert arg.sampler == "ddim"
    assert arg.guidance == 7.5
    assert arg.channel_mult == (1, 2, 4)  # untouched keys keep their defaults


@pytest.mark.parametrize("arg", [None, "", " ", ",,"])
def test_empty_arg_gives_defaults(arg):
    assert parse_arg(arg, **SPEC).to_dict() == SPEC


def test_no_spec_and_no_arg():
    assert parse_arg(None).to_dict() == {}


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("Yes", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("NO", False),
    ],
)
def test_bool_spellings(raw, expected):
    assert parse_arg(f"runlocal={raw}", runlocal=not expected).runlocal is expected


def test_bare_bool_key_means_true():
    assert parse_arg("runlocal", runlocal=False).runlocal is True


def test_int_and_float():
    arg = parse_arg("res=128,guidance=7", **SPEC)
    assert arg.res == 128 and type(arg.res) is int
    assert arg.guidance == 7.0 and type(arg.guidance) is float
    assert parse_arg("guidance=1e-3", **SPEC).guidance == 1e-3


def test_str_is_taken_as_written():
    assert parse_arg("sampler=dpm++2m", **SPEC).sampler == "dpm++2m"
    assert parse_arg("sampler=a=b", **SPEC).sampler == "a=b"  # only the first '=' splits
    assert parse_arg("sampler=", **SPEC).sampler == ""


def test_whitespace_and_trailing_comma():
    arg = parse_arg(" runlocal , res = 32 ,", **SPEC)
    assert arg.runlocal is True
    assert arg.res == 32


@pytest.mark.parametrize(
    "arg, key, expected",
    [
        ("channel_mult=1:2:2:4", "channel_mult", (1, 2, 2, 4)),
        ("channel_mult=8", "channel_mult", (8,)),
        ("channel_mult=", "channel_mult", ()),
        ("scales=0.25:1:2.5", "scales", (0.25, 1.0, 2.5)),
        ("stages=base:sr256:sr1024", "stages", ("base", "sr256", "sr1024")),
        ("steps=1:2:3", "steps", [1, 2, 3]),
    ],
)
def test_sequences(arg, key, expected):
    value = parse_arg(arg, **SPEC)[key]
    assert value == expected
    assert type(value) is type(expected)
    assert all(type(x) is type(y) for x, y in zip(value, expected, strict=True))


def test_sequence_element_types_follow_default():
    assert parse_arg("w=1:2", w=(1, 2.5)).w == (1.0, 2.0)  # mixed int/float -> float
    assert parse_arg("flags=yes:0", flags=(False,)).flags == (True, False)
    assert parse_arg("names=a:b", names=()).names == ("a", "b")  # empty default -> str


def test_unknown_key_names_key_and_allowed_keys():
    with pytest.raises(ValueError, match="resolution") as e:
        parse_arg("runlocal,resolution=32", **SPEC)
    for key in SPEC:
        assert key in str(e.value)


def test_unknown_bare_key():
    with pytest.raises(ValueError, match="'runlcoal'.*allowed keys: runlocal, res"):
        parse_arg("runlcoal", **SPEC)


@pytest.mark.parametrize(
    "arg, key, value, expected_type",
    [
        ("res=32.5", "res", "32.5", "int"),
        ("res=big", "res", "big", "int"),
        ("res=", "res", "", "int"),
        ("guidance=strong", "guidance", "strong", "float"),
        ("runlocal=maybe", "runlocal", "maybe", "bool"),
        ("runlocal=", "runlocal", "", "bool"),
        ("channel_mult=1:x:4", "channel_mult", "1:x:4", "tuple of int"),
        ("scales=0.5:half", "scales", "0.5:half", "tuple of float"),
        ("steps=1::3", "steps", "1::3", "list of int"),
    ],
)
def test_bad_value_names_key_value_and_type(arg, key, value, expected_type):
    with pytest.raises(ValueError) as e:
        parse_arg(arg, **SPEC)
    assert f"{key}={value!r}" in str(e.value)
    assert f"expected {expected_type}" in str(e.value)


def test_comma_is_not_a_sequence_separator():
    # "channel_mult=1,2" sets channel_mult=(1,) and then rejects "2" as an unknown key.
    with pytest.raises(ValueError, match="'2'.*allowed keys"):
        parse_arg("channel_mult=1,2", **SPEC)


def test_key_given_twice():
    with pytest.raises(ValueError, match="'res' is given twice"):
        parse_arg("res=32,runlocal,res=64", **SPEC)
    with pytest.raises(ValueError, match="'runlocal' is given twice"):
        parse_arg("runlocal,runlocal=false", **SPEC)


def test_bare_non_bool_key_needs_value():
    with pytest.raises(ValueError, match="'res' needs a value.*int"):
        parse_arg("res", **SPEC)


@pytest.mark.parametrize("default", [None, {"a": 1}, (1, "a")])
def test_unsupported_default_raises_type_error(default):
    with pytest.raises(TypeError, match="'x'"):
        parse_arg(None, x=default)


def test_result_is_type_safe():
    arg = parse_arg("res=32", res=64)
    with pytest.raises(TypeError):
        arg.res = "large"


CONFIG_FILE = """
import ml_collections


def get_config():
    return ml_collections.ConfigDict(dict(train=dict(steps=1, batch=2), optim=dict(lr=0.1)))
"""


def _parse_config_flag(tmp_path, *overrides):
    """The config of `--config=FILE *overrides`, parsed into a fresh FlagValues."""
    path = tmp_path / "config.py"
    path.write_text(CONFIG_FILE)
    argv = ["prog", f"--config={path}", *overrides]
    values = flags.FlagValues()
    define_config_file("config", None, "the config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_config_flag_applies_known_overrides(tmp_path):
    config = _parse_config_flag(tmp_path, "--config.train.steps=3", "--config.optim.lr=0.5")
    assert (config.train.steps, config.train.batch, config.optim.lr) == (3, 2, 0.5)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.batchh=4", "unknown config key train.batchh; did you mean train.batch?"),
        ("--config.trainn.steps=4", "unknown config key trainn.steps; did you mean train.steps?"),
        ("--config.train.xyz=4", "unknown config key train.xyz; train has keys: batch, steps"),
    ],
)
def test_config_flag_names_the_closest_key_of_an_unknown_override(tmp_path, override, message):
    with pytest.raises(flags.IllegalFlagValueError) as error:
        _parse_config_flag(tmp_path, override)
    assert str(error.value) == message  # absl prints it as one line and exits 1


def test_config_flag_names_a_bad_config_argument_in_one_line(tmp_path):
    path = tmp_path / "config.py"
    path.write_text(
        "from imagen_jax.config_utils import parse_arg\n"
        "def get_config(arg=None):\n"
        "    return parse_arg(arg, runlocal=False)\n"
    )
    values = flags.FlagValues()
    argv = ["prog", f"--config={path}:runlocal,bogus=1"]
    define_config_file("config", None, "the config", flag_values=values, sys_argv=argv)
    with pytest.raises(flags.IllegalFlagValueError) as error:
        values(argv)
    message = str(error.value)
    assert "Traceback" not in message and "\n" not in message.strip()
    assert "Unknown config arg 'bogus' in 'runlocal,bogus=1'" in message


def test_override_paths():
    argv = ["prog", "--config=c.py", "--config.a.b=1", "-config.c", "--noconfig.d.e", "--other.x=2"]
    assert override_paths(argv) == ["a.b", "c", "d.e"]
