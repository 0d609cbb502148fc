"""Parsing of the single string argument that every `configs/*.py:get_config(arg)` takes,
and the `--config` flag of the command lines.

`parse_arg` is modelled on big_vision's `configs/common.py:parse_arg`, but strict: every key
must be declared, every value must parse as the type of its default, and no key may repeat.
`define_config_file` is ml_collections' config file flag whose unknown override keys
(`--config.train.stepss=4`) stop the command with one line that names the closest key.
"""

import difflib
import re
import sys
from collections.abc import Callable
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})
_SEQ_SEP = ":"


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """Parses `"key=value,key=value,..."` into a ConfigDict typed by the defaults in `spec`.

    Example, in `configs/shapes_base.py`:

        def get_config(arg=None):
            arg = parse_arg(arg, runlocal=False, res=64, guidance=5.0, sampler="ddim",
                            channel_mult=(1, 2, 4))
            ...

    launched as `--config=configs/shapes_base.py:runlocal,res=32,channel_mult=1:2`.

    How a value is read depends on the type of the key's default:
      bool:        a bare `key` means True; `key=V` with V one of true/false, 1/0, yes/no
                   (any case).
      int:         `res=32`.
      float:       `guidance=7.5`; an integer such as `guidance=7` is accepted too.
      str:         `sampler=ddim`, taken as written (may be empty; may not contain ',').
      tuple/list:  elements separated by ':', e.g. `channel_mult=1:2:4`; `key=` gives an
                   empty sequence. The element type comes from the default's elements
                   (bool, int, float if any is a float, else str; str for an empty default).
                   The result has the default's container type.
    Keys are separated by ','; whitespace around keys and values is ignored, and so are
    empty items (a trailing comma).

    Args:
      arg: the argument string; None or "" gives the defaults.
      **spec: every allowed key with its default value.

    Returns:
      A ConfigDict holding every key of `spec`: the parsed value where `arg` gives one,
      else the default.

    Raises:
      ValueError: on an unknown key (the message lists the allowed keys), a value that
        does not parse as the default's type, a key given twice, or a bare non-bool key.
      TypeError: if a default in `spec` has a type that cannot be parsed from a string.
    """
    parsers = {key: _parser_for(key, default) for key, default in spec.items()}
    result = ml_collections.ConfigDict(spec)
    seen = set()
    for item in (arg or "").split(","):
        key, has_value, raw = (part.strip() for part in item.partition("="))
        if not key and not has_value:
            continue
        if key not in spec:
            raise ValueError(
                f"Unknown config arg {key!r} in {arg!r}; allowed keys: {', '.join(spec) or 'none'}"
            )
        if key in seen:
            raise ValueError(f"Config arg {key!r} is given twice in {arg!r}")
        seen.add(key)
        if not has_value:
            if not isinstance(spec[key], bool):
                raise ValueError(
                    f"Config arg {key!r} needs a value ({_describe(spec[key])}): write {key}=VALUE"
                )
            raw = "true"
        result[key] = parsers[key](key, raw)
    return result


def _parser_for(key: str, default: Any) -> Callable[[str, str], Any]:
    """Returns `parse(key, raw) -> value` for the type of `default`."""
    if isinstance(default, tuple | list):
        elem_type = _element_type(key, default)
        container = type(default)

        def parse_seq(key: str, raw: str) -> Any:
            if not raw:
                return container()
            try:
                return container(_parse_scalar(elem_type, s.strip()) for s in raw.split(_SEQ_SEP))
            except ValueError:
                raise ValueError(
                    f"Config arg {key}={raw!r} does not parse: expected {_describe(default)}"
                ) from None

        return parse_seq
    scalar_type = _scalar_type(key, default)

    def parse(key: str, raw: str) -> Any:
        try:
            return _parse_scalar(scalar_type, raw)
        except ValueError:
            raise ValueError(
                f"Config arg {key}={raw!r} does not parse: expected {_describe(default)}"
            ) from None

    return parse


def _scalar_type(key: str, default: Any) -> type:
    # bool before int: bool is a subclass of int.
    for t in (bool, int, float, str):
        if isinstance(default, t):
            return t
    raise TypeError(
        f"Default of config arg {key!r} is {default!r} of type {type(default).__name__}; "
        "supported: bool, int, float, str, or a tuple/list of them"
    )


def _element_type(key: str, default: tuple | list) -> type:
    types = {_scalar_type(key, x) for x in default}
    if not types:
        return str
    if len(types) == 1:
        return types.pop()
    if types <= {int, float}:
        return float
    raise TypeError(f"Default of config arg {key!r} mixes element types: {default!r}")


def _parse_scalar(t: type, raw: str) -> Any:
    if t is bool:
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise ValueError(raw)
    if t is str:
        return raw
    return t(raw)  # int("7.5") and float("x") raise ValueError.


def _describe(default: Any) -> str:
    if isinstance(default, tuple | list):
        elem = _element_type("", default).__name__
        return f"{type(default).__name__} of {elem}, written as a{_SEQ_SEP}b{_SEQ_SEP}c"
    t = _scalar_type("", default)
    if t is bool:
        return "bool: true/false, 1/0 or yes/no"
    return t.__name__


# ----------------------------------------------------------------------------------------------
# Command lines: config flags whose mistakes read as one line
# ----------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config key or value that cannot work; the message is one line naming the key."""


def define_config_file(
    name: str,
    default: str | None,
    help_string: str,
    *,
    flag_values: flags.FlagValues = flags.FLAGS,
    lock_config: bool = True,
    sys_argv: list[str] | None = None,
):
    """`config_flags.DEFINE_config_file`, whose overrides of keys the config does not have
    (`--config.train.stepss=4`) stop flag parsing with one line,
    `unknown config key train.stepss; did you mean train.steps?`, and exit status 1, where
    ml_collections raises a chain of tracebacks ending in `AttributeError: "'stepss'"`; a
    bad config argument (`configs/x.py:bogus=1`) is reported by its error's one line too.

    The keys are checked as soon as the config file is loaded, before ml_collections defines
    a flag per override. `sys_argv` as in DEFINE_config_file (default: sys.argv). The flag
    is the calling main's key flag (its --help lists it)."""
    flags.disclaim_key_flags()
    holder = config_flags.DEFINE_config_file(
        name,
        default,
        help_string,
        flag_values=flag_values,
        lock_config=lock_config,
        sys_argv=sys_argv,
    )
    flag = flag_values[name]
    flag.parser = _OverrideKeyCheck(flag.parser, name, sys_argv)
    return holder


class _OverrideKeyCheck(flags.ArgumentParser):
    """Wraps a config file flag's parser: the loaded config must hold every key that the
    command line overrides."""

    def __init__(self, parser: flags.ArgumentParser, name: str, sys_argv: list[str] | None):
        self._parser = parser
        self._name = name
        self._sys_argv = sys_argv

    def parse(self, argument):
        try:
            config = self._parser.parse(argument)
        except (TypeError, ValueError) as e:
            # ml_collections wraps get_config's error in its traceback; its last line (say
            # "ValueError: Unknown config arg 'bogus' in 'runlocal,bogus=1'; ...") is it.
            lines = [line for line in str(e).splitlines() if line.strip()]
            raise flags.IllegalFlagValueError(lines[-1].strip() if lines else repr(e)) from None
        argv = sys.argv if self._sys_argv is None else self._sys_argv
        argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)  # expands --flagfile
        for path in override_paths(argv, self._name):
            message = unknown_key_message(config, path)
            if message:
                raise flags.IllegalFlagValueError(message)
        return config

    def flag_type(self):
        return self._parser.flag_type()


def override_paths(argv: list[str], name: str = "config") -> list[str]:
    """The config paths that `--name.PATH=...` (or `--noname.PATH`) arguments override."""
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    return [m.group(1) for m in map(pattern.match, argv) if m]


def unknown_key_message(config: ml_collections.ConfigDict, path: str) -> str | None:
    """None if `config` holds the dotted `path`; else one line naming the first unknown key
    and the closest keys beside it (difflib), or all of them when none is close."""
    node, walked = config, []
    parts = config_path.split(path)
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or not isinstance(part, str):
            return None  # a sequence, dataclass or index: ml_collections checks it
        if part not in node:
            keys = sorted(node.keys())
            prefix = ".".join(walked + [""])
            close = difflib.get_close_matches(part, keys, n=3)
            rest = "".join(f".{p}" for p in parts[i + 1 :])
            if close:
                hint = "did you mean " + " or ".join(f"{prefix}{k}{rest}" for k in close) + "?"
            else:
                hint = f"{'.'.join(walked) or 'the config'} has keys: {', '.join(keys)}"
            return f"unknown config key {path}; {hint}"
        node = node[part]
        walked.append(part)
    return None
