"""Shared plumbing of the `python -m xlab.<stage>` entry points: Hydra app set-up and one-line user errors.

Hydra prints composition errors over several lines and task errors with a traceback. Researchers mistyping an
override deserve one line that names the bad value and what is valid, so we let exceptions reach us
(HYDRA_FULL_ERROR=1 inside this process) and format the user-facing ones here. Set HYDRA_FULL_ERROR=1 yourself
(or XLAB_DEBUG=1) to get the full trace instead. Real bugs still raise with their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "configs")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    from xlab.errors import XLabError

    return (XLabError, HydraException, MissingConfigException, OmegaConfBaseException)


def one_line(exc: BaseException) -> str:
    """Squeeze an exception (and the OmegaConf cause Hydra wraps) into one readable line."""
    from hydra.errors import MissingConfigException

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


def hydra_app(config_name: str, task: Callable[[Any], Any]) -> Callable[[], Any]:
    """Wrap `task(cfg)` as a Hydra app over `configs/<config_name>.yaml` with one-line user errors."""
    import functools

    import hydra

    from xlab.config import register_configs

    register_configs()
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("XLAB_DEBUG") == "1"

    def report(exc: BaseException) -> None:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)

    @functools.wraps(task)
    def guarded_task(cfg: Any) -> Any:
        # Errors inside the job are caught here, before Hydra adds its "Error executing job" banner.
        try:
            return task(cfg)
        except _user_error_types() as exc:
            if debug:
                raise
            report(exc)

    app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(guarded_task)

    def main() -> Any:
        os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors reach us as exceptions
        try:
            return app()
        except _user_error_types() as exc:
            if debug:
                raise
            report(exc)

    return main
