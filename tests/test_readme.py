"""The commands of the README and the other Markdown documents work as written.

Every command of a shell code block (and every inline command) runs the Python of `.venv`
that the README's first two commands create (`.venv/bin/python`, `.venv/bin/pip`); the
scripts, modules, configs and repository files it names exist; every `--flag` it gives a
program is one that program defines (absl mains: their `--helpfull`, which this runs;
argparse scripts: their `add_argument` calls); every `--config.KEY` override names a key of
its config; and what it writes inside the repository is git-ignored. Placeholders (`DIR`,
`STAGE_DIR`, `...`) are not paths, and `[--flag=X]` is an optional flag.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYTHON = ".venv/bin/python"
PIP = ".venv/bin/pip"
BARE = ("python", "python3", "pip", "pip3")
SHELLS = ("bash", "sh", "shell", "console")
SKIP_DIRS = {"runs", "samples", "build", "dist", "workdirs", "outputs", "node_modules"}
# Repository folders: a path under one of these must exist (unless a flag writes it).
SOURCE_DIRS = ("bench", "checkpoints", "configs", "docs", "eval", "imagen_jax", "tests", "tools")
OUTPUT_FLAGS = {"outdir", "workdir", "out", "json", "results", "save_stats", "save_features"}
OUTPUT_DIR_FLAGS = {"outdir", "workdir"}  # folders of many files: they must be git-ignored
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)?)`(?!`)")


@dataclasses.dataclass(frozen=True)
class Command:
    where: str  # "README.md:12"
    argv: tuple[str, ...]  # environment assignments dropped, variables expanded

    def program(self) -> tuple[str, ...] | None:
        """How to run the program whose flags the arguments are: ("sample.py",) or
        ("-m", "imagen_jax.training.export"); None when none is checked."""
        if self.argv[0] == "bash" and self.argv[1:2] in (("sample.sh",), ("demo.sh",)):
            return (self.argv[1][:-3] + ".py",)  # the script passes its arguments on
        if self.argv[0] == PYTHON and len(self.argv) > 1:
            return self.argv[1:3] if self.argv[1] == "-m" else self.argv[1:2]
        return None

    def source(self) -> pathlib.Path | None:
        """The program's Python file, if it exists (a missing one is a path problem)."""
        program = self.program()
        if program is None:
            return None
        path = ROOT / (program[1].replace(".", "/") + ".py" if program[0] == "-m" else program[0])
        return path if path.is_file() else None

    def args(self) -> tuple[str, ...]:
        program = self.program()
        if program is None:
            return ()
        skip = 1 + len(program) if self.argv[0] == PYTHON else 2
        return self.argv[skip:]


def documents() -> list[pathlib.Path]:
    """The repository's Markdown files (not those of virtual environments or outputs)."""
    found = []
    for path in sorted(ROOT.rglob("*.md")):
        parts = path.relative_to(ROOT).parts[:-1]
        if not any(p.startswith(".") or p in SKIP_DIRS or p.endswith(".egg-info") for p in parts):
            found.append(path)
    return found


def _is_assignment(token: str) -> bool:
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", token, re.S) is not None


def _tokens(text: str, variables: dict[str, str]) -> list[str]:
    out = []
    for token in shlex.split(text, comments=True):
        if re.fullmatch(r"\$\{?(\w+)\}?", token) and token.strip("${}") in variables:
            out += shlex.split(variables[token.strip("${}")])
            continue
        if token.startswith("[-") and token.endswith("]"):  # an optional flag: [--step=N]
            token = token[1:-1]
        out.append(token)
    return out


def commands_of_text(text: str, name: str) -> list[Command]:
    """The commands of `text`'s shell code blocks, then those of its inline code spans that
    start with a program (`bash`, an interpreter or the .venv's), with where they are."""
    found = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELLS:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        variables: dict[str, str] = {}
        lines = block.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i]
            i += 1
            tokens = _tokens(line, variables)
            env = 0
            while env < len(tokens) and _is_assignment(tokens[env]):
                env += 1
            if env == len(tokens):  # VAR=value lines set variables for the lines after
                variables.update(t.split("=", 1) for t in tokens)
                continue
            found.append(Command(f"{name}:{first_line + start}", tuple(tokens[env:])))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for span in INLINE.finditer(prose):
        tokens = span.group(1).split()
        while tokens and _is_assignment(tokens[0]):
            tokens = tokens[1:]
        if tokens and tokens[0] in (*BARE, PYTHON, PIP, "bash"):
            where = f"{name}:{prose.count(chr(10), 0, span.start()) + 1}"
            found.append(Command(where, tuple(_tokens(" ".join(tokens), {}))))
    return found


def all_commands() -> list[Command]:
    out = []
    for path in documents():
        out += commands_of_text(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    return out


def _placeholder(value: str) -> bool:
    """DIR, STAGE_DIR, REF.npz, ...: a name the reader fills in, not a path."""
    stem = value.split(":")[0].rstrip("/")
    return "..." in value or not re.search(r"[a-z]", pathlib.PurePath(stem).stem or "x")


def _flag(token: str) -> tuple[str, str | None] | None:
    if not token.startswith("--") or token == "--":
        return None
    name, eq, value = token[2:].partition("=")
    return name, (value if eq else None)


def interpreter_problems(command: Command) -> list[str]:
    if command.argv[0] in BARE:
        fix = PIP if command.argv[0].startswith("pip") else PYTHON
        return [f"{command.where}: `{command.argv[0]} ...` fails outside .venv; write `{fix}`"]
    return []


def _missing_program(argv: tuple[str, ...]) -> str | None:
    """What is wrong with the script or module a command runs, if anything."""
    if argv[0] == PYTHON and argv[1:2] == ("-m",) and len(argv) > 2:
        base = ROOT / argv[2].replace(".", "/")
        found = base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()
        if not found and not _placeholder(argv[2].split(".")[-1]):
            return f"no module {argv[2]} in the repository"
        return None
    script = argv[1] if argv[0] in (PYTHON, "bash") and len(argv) > 1 else None
    if script and not (ROOT / script).is_file() and not _placeholder(script):
        return f"{script} does not exist"
    return None


def path_problems(command: Command) -> list[str]:
    """The script or module must exist, and so must every repository path an argument names
    (outputs excepted)."""
    argv = command.argv
    missing = _missing_program(argv)
    problems = [f"{command.where}: {missing}"] if missing else []
    for token in argv[2:]:
        flag = _flag(token)
        name, value = flag if flag else (None, token)
        if value is None or name in OUTPUT_FLAGS or _placeholder(value):
            continue
        if name == "config" or (name and name.startswith("config")):
            value = value.split(":")[0]  # configs/x.py:arg
        first = value.split("/")[0]
        if "/" in value and first in SOURCE_DIRS and not (ROOT / value).exists():
            problems.append(f"{command.where}: {value} does not exist")
    return problems


def output_problems(command: Command) -> list[str]:
    """What a command writes inside the repository must be git-ignored (or be a tracked
    path it is meant to replace, such as an export to checkpoints/)."""
    problems = []
    for token in command.args():
        flag = _flag(token)
        if not flag or flag[0] not in OUTPUT_DIR_FLAGS or not flag[1] or _placeholder(flag[1]):
            continue
        value = flag[1]
        if value.startswith(("/", "~")) or (ROOT / value).exists():
            continue
        ignored = subprocess.run(["git", "check-ignore", "-q", value], cwd=ROOT).returncode == 0
        if not ignored:
            problems.append(f"{command.where}: {value} would be untracked in the repository")
    return problems


@functools.cache
def defined_flags(program: tuple[str, ...], source_path: pathlib.Path) -> frozenset[str]:
    """The flags `program` accepts: an absl main's `--helpfull` (run), an argparse script's
    `add_argument` option strings (read, with those of the scripts it imports beside it)."""
    source = source_path.read_text(encoding="utf-8")
    if "app.run(" in source:
        out = subprocess.run(
            [sys.executable, *program, "--helpfull"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        text = out.stdout + out.stderr
        assert "Traceback" not in text and "flags:" in text, f"{program} --helpfull:\n{text}"
        names = set()
        for no, name in re.findall(r"^\s+(?:-\w,)?--(\[no\])?([\w.-]+):", text, re.M):
            names |= {name, "no" + name} if no else {name}
        return frozenset(names)
    names = {"help"}
    sources = [source]
    for module in re.findall(r"^import (\w+)$", source, re.M):
        sibling = source_path.parent / f"{module}.py"
        if sibling.is_file():
            sources.append(sibling.read_text(encoding="utf-8"))
    for text in sources:
        names |= set(re.findall(r"add_argument\(\s*['\"]--([\w-]+)['\"]", text))
    return frozenset(names)


def flag_problems(command: Command) -> list[str]:
    program, source = command.program(), command.source()
    if source is None:
        return []
    defined = defined_flags(program, source)
    problems = []
    for token in command.args():
        flag = _flag(token)
        if flag is None:
            continue
        name = flag[0]
        if name.startswith("config.") and "config" in defined:
            continue  # a config override: config_override_problems
        if name not in defined:
            problems.append(f"{command.where}: {' '.join(program)} has no flag --{name}")
    return problems


def config_overrides(command: Command) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(config file, its argument, the --config.KEY keys) of a command with --config."""
    config, keys = None, []
    for token in command.args():
        flag = _flag(token)
        if flag and flag[0] == "config" and flag[1]:
            config = flag[1]
        elif flag and flag[0].startswith("config."):
            keys.append(flag[0].removeprefix("config."))
    if config is None or _placeholder(config):
        return None
    path, colon, arg = config.partition(":")
    return path, (arg if colon else None), tuple(keys)


CHECK_CONFIGS = """
import importlib.util, json, sys
problems = []
for where, path, arg, keys in json.load(sys.stdin):
    spec = importlib.util.spec_from_file_location("documented_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config() if arg is None else module.get_config(arg)
    for key in keys:
        node = config
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                problems.append(f"{where}: {path} has no key {key}")
                break
            node = node[part]
print(json.dumps(problems))
"""


def config_problems(commands: list[Command]) -> list[str]:
    """Loads each documented config (with its argument) in one process and looks up every
    --config.KEY override."""
    jobs = []
    for command in commands:
        found = config_overrides(command)
        if found and (ROOT / found[0]).is_file():
            jobs.append([command.where, *found[:2], list(found[2])])
    if not jobs:
        return []
    out = subprocess.run(
        [sys.executable, "-c", CHECK_CONFIGS],
        input=json.dumps(jobs),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


COMMANDS = all_commands()
PROGRAMS = sorted({c.program() for c in COMMANDS if c.source()})


def test_documents_have_commands():
    """The parser finds the README's commands (a parser that found none would pass all)."""
    readme = [c for c in COMMANDS if c.where.startswith("README.md:")]
    assert readme[0].argv[:2] == ("bash", "sample.sh") and readme[1].argv[:2] == (
        "bash",
        "tests/run.sh",
    )
    assert {("train.py",), ("sample.py",), ("-m", "imagen_jax.training.export")} <= set(PROGRAMS)


def test_commands_use_the_venv():
    problems = [p for c in COMMANDS for p in interpreter_problems(c)]
    assert not problems, "\n".join(problems)


def test_named_files_exist():
    problems = [p for c in COMMANDS for p in path_problems(c)]
    assert not problems, "\n".join(problems)


def test_outputs_are_ignored():
    """sample.py's default --outdir, and every output folder of a documented command."""
    ignored = subprocess.run(["git", "check-ignore", "-q", "samples/grid.png"], cwd=ROOT)
    assert ignored.returncode == 0, "samples/ (sample.py's default --outdir) is not ignored"
    problems = [p for c in COMMANDS for p in output_problems(c)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("program", PROGRAMS, ids=" ".join)
def test_flags_are_defined(program):
    problems = [p for c in COMMANDS if c.program() == program for p in flag_problems(c)]
    assert not problems, "\n".join(problems)


def test_config_overrides_exist():
    problems = config_problems(COMMANDS)
    assert not problems, "\n".join(problems)


BROKEN = """
```bash
python train.py --config=configs/shapes_base.py --workdir=runs/x
.venv/bin/python sample.py --no_such_flag=1 --outdir=samples/x
.venv/bin/python eval/no_such_main.py --samples=DIR
.venv/bin/python -m imagen_jax.no_such_module
COMMON="--config.train.stepz=3"
.venv/bin/python train.py --config=configs/shapes_base.py:runlocal $COMMON --workdir=runs/x
.venv/bin/python sample.py --prompts=eval/missing_prompts.txt --outdir=not_ignored/x
```
Then `pip install x`.
"""


def test_the_checks_catch_broken_commands():
    """Each check fails on a command that would fail: a bare interpreter, a missing file or
    module, an unknown flag, an unknown config key, an output git would show."""
    commands = commands_of_text(BROKEN, "doc.md")
    assert [c.where for c in commands] == [f"doc.md:{n}" for n in (3, 4, 5, 6, 8, 9, 11)]
    assert commands[4].argv[-2] == "--config.train.stepz=3"  # $COMMON expanded
    bare = [p for c in commands for p in interpreter_problems(c)]
    assert len(bare) == 2 and "write `.venv/bin/python`" in bare[0] and ".venv/bin/pip" in bare[1]
    missing = [p for c in commands for p in path_problems(c)]
    assert missing == [
        "doc.md:5: eval/no_such_main.py does not exist",
        "doc.md:6: no module imagen_jax.no_such_module in the repository",
        "doc.md:9: eval/missing_prompts.txt does not exist",
    ]
    assert flag_problems(commands[1]) == ["doc.md:4: sample.py has no flag --no_such_flag"]
    assert config_problems(commands) == ["doc.md:8: configs/shapes_base.py has no key train.stepz"]
    assert output_problems(commands[5]) == [
        "doc.md:9: not_ignored/x would be untracked in the repository"
    ]
