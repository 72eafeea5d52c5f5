"""Every documented command runs as written, up to composing its config: each `python -m xlab.<command>` line in a
shell block of README.md or docs/*.md is composed in-process through Hydra's compose API (50+ subprocesses would
cost minutes) and built into its typed dataclasses, so a documented key, option or value that drifts from the
configs fails here, naming the file, line and command. Composition opens no files, so placeholders (ckpt=PATH) are
fine. Commands that are not Hydra apps (results, plot, sweep, data.synthetic: argparse) only need their module."""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from xlab.cli import CONFIG_DIR, one_line, register_schema, sweep_jobs, typed
from xlab.evaluate import EvaluateConfig
from xlab.export import ExportConfig
from xlab.generate import GenerateConfig
from xlab.serve.config import ServeConfig
from xlab.training.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent

# The Hydra commands: `python -m xlab.<command>` -> (config name, schema). Any other xlab.<command> is argparse.
HYDRA_COMMANDS = {
    "train": ("train", TrainConfig), "prepare": ("train", TrainConfig), "evaluate": ("evaluate", EvaluateConfig),
    "generate": ("generate", GenerateConfig), "export": ("export", ExportConfig), "serve": ("serve", ServeConfig),
}
for _config_name, _schema in HYDRA_COMMANDS.values():
    register_schema(_config_name, _schema)

SHELL_LANGUAGES = {"shell", "bash", "sh"}
FENCE = re.compile(r"^\s*```\s*([\w+-]*)\s*$")
SEPARATORS = {"&&", "||", ";", "|"}  # shell tokens between two commands of one line
MULTIRUN_FLAGS = {"-m", "--multirun"}
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd"}
MIN_COMMANDS = 20  # the docs hold far more: fewer means the extractor broke, not that the docs are fine


@dataclass
class Command:
    where: str  # file:line of the command's first line
    text: str  # the command line as written, continuations joined
    module: str  # what follows `-m xlab.`: train, evaluate, results, data.synthetic, ...
    args: list[str]  # its arguments, as the shell would pass them
    error: str | None = None  # why the line could not be read as shell words


def shell_blocks(text: str) -> list[tuple[int, list[str]]]:
    """(line number of the first body line, body lines) of each fenced shell block: ```shell, ```bash, ```sh, or an
    unlabelled block one of whose lines starts with `python -m xlab.`."""
    blocks: list[tuple[int, list[str]]] = []
    language: str | None = None  # None: outside a block
    start, body = 0, []
    for number, line in enumerate(text.splitlines(), 1):
        fence = FENCE.match(line)
        if language is None:
            if fence:
                language, start, body = fence.group(1).lower(), number + 1, []
        elif fence and not fence.group(1):  # the closing fence
            unlabelled_xlab = language == "" and any(ln.lstrip().startswith("python -m xlab.") for ln in body)
            if language in SHELL_LANGUAGES or unlabelled_xlab:
                blocks.append((start, body))
            language = None
        else:
            body.append(line)
    return blocks


def logical_lines(start: int, body: list[str]) -> list[tuple[int, str]]:
    """(line number, line) of each shell line of a block, a line ending in a backslash joined with the next."""
    lines: list[tuple[int, str]] = []
    pending, first = "", None
    for offset, line in enumerate(body):
        if first is None:
            first = start + offset
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append((first, pending + line))
        pending, first = "", None
    if first is not None:
        lines.append((first, pending))
    return lines


def xlab_commands(line: str) -> list[tuple[str, list[str]]]:
    """(module, args) of each `... -m xlab.<module> args` in a shell line: `#` comments, leading env assignments
    (XLAB_X=1 python -m ...), launchers (torchrun, accelerate launch) and `&&`-joined commands allowed. A line
    the shell could not split raises ValueError."""
    if "xlab." not in line:
        return []
    tokens = shlex.split(line.strip().removeprefix("$ "), comments=True)
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token in SEPARATORS:
            segments.append([])
        else:
            segments[-1].append(token)
    found = []
    for segment in segments:
        for i, token in enumerate(segment[:-1]):
            if token == "-m" and segment[i + 1].startswith("xlab."):
                found.append((segment[i + 1].removeprefix("xlab."), segment[i + 2:]))
                break
    return found


def documented_commands() -> list[Command]:
    commands = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        name = path.relative_to(REPO).as_posix()
        for start, body in shell_blocks(path.read_text(encoding="utf-8")):
            for number, line in logical_lines(start, body):
                where = f"{name}:{number}"
                try:
                    found = xlab_commands(line)
                except ValueError as exc:  # unbalanced quotes: the shell would refuse it too
                    commands.append(Command(where, line.strip(), "?", [], error=f"not valid shell: {exc}"))
                    continue
                commands += [Command(where, line.strip(), module, args) for module, args in found]
    return commands


def hydra_overrides(args: list[str]) -> list[str]:
    """The overrides a Hydra command composes: Hydra's own flags (--cfg job, --help, -m, ...) dropped, and a `-m`
    sweep as its first job (the first value of each comma list or range; a search sweeper's interval(...) left to
    the sweeper's own search space, as it has no first value)."""
    overrides, multirun, skip_value = [], False, False
    for arg in args:
        if skip_value:
            skip_value = False
        elif arg in MULTIRUN_FLAGS:
            multirun = True
        elif arg in VALUE_FLAGS:
            skip_value = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    if not multirun:
        return overrides
    parsed = OverridesParser.create().parse_overrides(overrides)
    listable = [o.input_line for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
    return sweep_jobs(listable)[0]


def check(command: Command) -> None:
    """Raise if the command would not start: its config does not compose and type-check, or its module is missing."""
    if command.error is not None:
        raise ValueError(command.error)
    if command.module in HYDRA_COMMANDS:
        config_name, _ = HYDRA_COMMANDS[command.module]
        typed(compose(config_name=config_name, overrides=hydra_overrides(command.args)))
    elif importlib.util.find_spec(f"xlab.{command.module}") is None:
        raise ModuleNotFoundError(f"no module xlab.{command.module}")


def test_extractor_reads_blocks_continuations_comments_and_env():
    text = "\n".join([
        "```shell",
        "pip install -e . && python -m xlab.train   # a comment: model=nonsense",
        "XLAB_NO_LOCK=1 python -m xlab.evaluate \\",
        "  ckpt=PATH split=test",
        "torchrun --nproc_per_node 2 -m xlab.train -m model.n_layer=2,4 'optimizer.lr=interval(1e-4,1e-2)'",
        "```",
        "```python",
        "python -m xlab.train not=shell",
        "```",
        "```",
        "python -m xlab.results DIR",
        "```",
        "```",
        "outputs/<date>/<time>/   not a command",
        "```",
    ])
    found = [(number, module, args) for start, body in shell_blocks(text) for number, line in logical_lines(start, body)
             for module, args in xlab_commands(line)]
    assert found == [
        (2, "train", []),
        (3, "evaluate", ["ckpt=PATH", "split=test"]),
        (5, "train", ["-m", "model.n_layer=2,4", "optimizer.lr=interval(1e-4,1e-2)"]),
        (11, "results", ["DIR"]),
    ]
    assert hydra_overrides(found[2][2]) == ["model.n_layer=2"]
    assert hydra_overrides(["--cfg", "job", "seed=1"]) == ["seed=1"]


def test_documented_commands_compose():
    commands = documented_commands()
    assert len(commands) >= MIN_COMMANDS, f"only {len(commands)} documented xlab commands found: extractor broken?"
    missing = set(HYDRA_COMMANDS) - {c.module for c in commands}
    assert not missing, f"no documented command found for: {sorted(missing)}"

    failures = []
    GlobalHydra.instance().clear()  # an in-process Hydra app earlier in this worker may have left it set
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for command in commands:
            try:
                check(command)
            except Exception as exc:  # every failure reported at once, each naming its file, line and command
                failures.append(f"{command.where}: {command.text}\n    {type(exc).__name__}: {one_line(exc)}")
    assert not failures, f"{len(failures)} of {len(commands)} documented commands fail:\n" + "\n".join(failures)
