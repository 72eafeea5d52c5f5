"""Shared plumbing of the `python -m xlab.<stage>` entry points: Hydra app set-up and one-line user errors.

Hydra prints composition errors over several lines and task errors with a traceback. Researchers mistyping an
override deserve one line that names the bad value and what is valid, so we let exceptions reach us
(HYDRA_FULL_ERROR=1 inside this process) and format the user-facing ones here. Set HYDRA_FULL_ERROR=1 yourself
(or XLAB_DEBUG=1) to get the full trace instead. Real bugs still raise with their traceback.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from xlab.errors import XLabError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")
# Commands over train.yaml (train, prepare) use every config group, so Hydra's own --help fits them. The others share
# configs/ with training and would list its groups, so they print their own help (print_help).
HYDRA_HELP_CONFIGS = {"train"}
HELP_FLAGS = ("--help", "-h")


def _user_error_types() -> tuple[type[BaseException], ...]:

    return (XLabError, HydraException, MissingConfigException, OmegaConfBaseException)


def one_line(exc: BaseException) -> str:
    """Squeeze an exception (and the OmegaConf cause Hydra wraps) into one readable line."""
    if isinstance(exc, MissingConfigException):
        msg = str(exc).splitlines()[0]
        if exc.options:
            msg += f"; valid: {', '.join(sorted(exc.options))}"
        return msg
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    msg = lines[0] if lines else type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first not in msg:
            msg = f"{msg} {first}"
    return msg


def typed(cfg: DictConfig) -> Any:
    """A composed config (its `hydra` node dropped) as its schema's dataclasses: every value checked."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return OmegaConf.to_object(cfg)


MULTIRUN_FLAGS = ("-m", "--multirun")


def sweep_jobs(overrides: list[str]) -> list[list[str]] | None:
    """The overrides of each job of a `-m` grid, split as Hydra's basic sweeper splits them; None when a sweep
    cannot be listed in advance (interval(): a search sweeper samples it)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.is_sweep_override() and not o.is_discrete_sweep() for o in parsed):
        return None
    return BasicSweeper.split_arguments(parsed, None)[0]


def prevalidate(config_name: str, validate: Callable[[Any], None],
                validate_job: Callable[[Any], Any] | None = None) -> None:
    """Compose the command line's config and check it before Hydra creates the run dir and writes its files there,
    so bad input changes nothing on disk. A `-m` sweep has each job of its grid checked by `validate_job` before any
    job runs. Skipped for other Hydra flags (--cfg, ...) and for sweeps that cannot be listed: Hydra then composes
    each job itself and the task checks it."""
    args = sys.argv[1:]
    flags = {arg for arg in args if arg.startswith("-")}
    if not flags:
        jobs, check = [args], validate
    elif validate_job is not None and flags <= set(MULTIRUN_FLAGS):
        jobs, check = sweep_jobs([arg for arg in args if arg not in flags]), validate_job
    else:
        return
    if jobs is None:
        return
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for overrides in jobs:
            check(compose(config_name=config_name, overrides=overrides, return_hydra_config=True))


def _usage(config_name: str) -> list[str]:
    """The leading comment lines of configs/<config_name>.yaml: each command's yaml opens with its usage examples."""
    usage = []
    for line in (Path(CONFIG_DIR) / f"{config_name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        usage.append(line.lstrip("#").strip())
    return usage


def print_help(config_name: str, overrides: list[str]) -> None:
    """Print the command's usage, its own config groups and its composed config (with the overrides given), and
    nothing of the training groups that share configs/. Composes in memory only: nothing is written."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    # The groups this config's defaults list picked (hydra/* are Hydra's own, see --hydra-help).
    choices = {g: c for g, c in cfg.hydra.runtime.choices.items() if not g.startswith("hydra/")}
    lines = ["usage:", *(f"  {u}" for u in _usage(config_name) or [f"python -m xlab.{config_name} key=value ..."])]
    if choices:
        lines += ["", "== Configuration groups ==", "Compose your configuration from those groups (group=option)", ""]
        for group, choice in sorted(choices.items()):
            options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
            lines.append(f"{group}: {', '.join(options)} (now: {choice})")
    own = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    lines += ["", "== Config ==", "Override anything in the config (foo.bar=value)", "", OmegaConf.to_yaml(own)]
    lines.append("Use --hydra-help to view Hydra specific help")
    print("\n".join(lines))


def register_schema(config_name: str, schema: type) -> None:
    """Store a command's dataclass as `<config_name>_schema`, the first entry of configs/<config_name>.yaml's defaults
    list (for Hydra's compose API too)."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)


def hydra_app(
    config_name: str, task: Callable[[Any], Any], schema: type, validate: Callable[[Any], None] | None = None,
    validate_job: Callable[[Any], Any] | None = None,
) -> Callable[[], Any]:
    """Wrap `task(cfg)` as a Hydra app over `configs/<config_name>.yaml` with one-line user errors. `schema` (the
    command's dataclass) is stored as `<config_name>_schema`, which the YAML's defaults list starts with, so every
    value is typed and checked; `task` gets the typed config. `validate(cfg)` (the composed config with its `hydra`
    node) runs first, before anything is written; `validate_job(cfg)` checks each job of a `-m` sweep likewise."""

    register_schema(config_name, schema)
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("XLAB_DEBUG") == "1"

    def report(exc: BaseException) -> None:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)

    @functools.wraps(task)
    def guarded_task(cfg: Any) -> Any:
        # Errors inside the job are caught here, before Hydra adds its "Error executing job" banner.
        try:
            return task(OmegaConf.to_object(cfg))
        except _user_error_types() as exc:
            if debug:
                raise
            report(exc)

    app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(guarded_task)

    def main() -> Any:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions
        try:
            args = sys.argv[1:]
            if config_name not in HYDRA_HELP_CONFIGS and any(arg in HELP_FLAGS for arg in args):
                print_help(config_name, [arg for arg in args if not arg.startswith("-")])
                return None
            if validate is not None:
                prevalidate(config_name, validate, validate_job)
            return app()
        except _user_error_types() as exc:
            if debug:
                raise
            report(exc)

    return main
