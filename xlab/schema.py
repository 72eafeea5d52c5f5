"""Structured configs (dataclasses) for every config group, registered with Hydra's ConfigStore.

`configs/train.yaml` starts its defaults list with `train_schema`, so every YAML option and command-line override is
merged into these typed dataclasses: a misspelled key or a value of the wrong type fails at start-up, before any work.
Each group's fields are documented next to the code that reads them (one hop from the YAML file).
"""

from __future__ import annotations

import datetime
import math
import os
import typing
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from omegaconf import OmegaConf

from xlab.errors import XLabError


def user_cache_dir() -> str:
    """Default tokenizer/data cache shared by runs: $XLAB_CACHE_DIR, else $XDG_CACHE_HOME/xlab, else ~/.cache/xlab."""
    if os.environ.get("XLAB_CACHE_DIR"):
        return os.environ["XLAB_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xlab")


def launch_time(fmt: str) -> str:
    """The run's start time, formatted. Under torchrun / accelerate launch every rank of a node uses its launcher's
    start time, so all ranks resolve the same default run dir (Hydra's ${now:} differs across processes)."""
    stamp = datetime.datetime.now()
    if "LOCAL_RANK" in os.environ:
        try:
            import psutil  # optional: present where Accelerate is

            stamp = datetime.datetime.fromtimestamp(psutil.Process(os.getppid()).create_time())
        except Exception:  # no psutil or no parent: fall back to this process's clock
            pass
    return stamp.strftime(fmt)


if not OmegaConf.has_resolver("xlab_cache_dir"):
    OmegaConf.register_new_resolver("xlab_cache_dir", user_cache_dir)
    OmegaConf.register_new_resolver("xlab_launch_time", launch_time, use_cache=True)


class Choice(str, Enum):
    """A closed choice of the schema: OmegaConf rejects any other value with the list of valid ones. Members are
    str, so `cfg.x == "name"` and f-strings read like plain strings."""

    def __str__(self) -> str:
        return self.value


class Precision(Choice):
    # bf16 where the hardware runs it fast (GPUs with bf16, CPUs with AMX/AVX512-BF16), fp16 on GPUs without bf16,
    # else fp32: xlab.device.auto_precision, for every command
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"




























class Switch(Choice):
    auto = "auto"
    on = "on"
    off = "off"






@dataclass(frozen=True)
class Range:
    """The valid values of a number field (of each element, for a list): within lo..hi, an end excluded when its
    *_open flag is set, or `also`. `note` says what edge values or null mean."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: float | None = None  # one valid value outside lo..hi (temperature 0 = greedy)
    note: str = ""

    def allows(self, value: float) -> bool:
        if value == self.also:
            return True
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        else:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"{text} {self.note}" if self.note else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


POSITIVE = Range(0, lo_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
SEED = Range(0, 2**32 - 1)  # what NumPy's seeding (Accelerate's set_seed) takes
# Below this, logits / temperature (and / repetition_penalty) overflow float32 to inf and sampling breaks
MIN_DIVISOR = 1e-4


class Schema:
    """Base of the config dataclasses, and the one place where values are checked field by field, whether they come
    from YAML, the command line (OmegaConf builds the dataclasses: OmegaConf.to_object) or Python:
    - a value given as a string from Python (OmegaConf checks its own) becomes its Choice, or fails listing them;
    - every float must be finite; a number in LIMITS (field name -> Range) must be in its range (None, for an
      optional field, is always allowed).
    Checks that relate several fields or need a registry stay with the code that reads them (check_*_config)."""

    GROUPS = {"ModelConfig": "model.", "DataConfig": "data.", "TokenizerConfig": "tokenizer.",
              "LoggerConfig": "logger.", "OptimizerConfig": "optimizer.", "SchedulerConfig": "scheduler.",
              "TrainerConfig": "trainer.", "SamplerConfig": "sampler."}
    LIMITS: dict[str, Range] = {}  # a class constant, not a field: subclasses leave it unannotated

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            hint = hints[f.name]
            options = typing.get_args(hint) or (hint,)  # X | None and list[X] name X among their arguments
            choice = next((t for t in options if isinstance(t, type) and issubclass(t, Choice)), None)
            value = getattr(self, f.name)
            key = self.GROUPS.get(type(self).__name__, "") + f.name
            if value is None:
                continue
            if choice is not None:
                if typing.get_origin(hint) is list:
                    setattr(self, f.name, [_choose(choice, v, key) for v in value])
                else:
                    setattr(self, f.name, _choose(choice, value, key))
            else:
                _check_number(key, value, self.LIMITS.get(f.name))


def _choose(choice: type[Choice], value: Any, key: str) -> Choice:
    try:
        return choice(value)
    except ValueError:
        valid = ", ".join(c.value for c in choice)
        raise XLabError(f"{key}={value!r} is not valid; valid: {valid}") from None


def _check_number(key: str, value: Any, limits: Range | None) -> None:
    items = value if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    finite = all(math.isfinite(v) for v in numbers)
    if finite and (limits is None or all(limits.allows(v) for v in numbers)):
        return
    shown = list(value) if isinstance(value, (list, tuple)) else value
    if limits is None:
        raise XLabError(f"{key}={shown} must be finite")
    raise XLabError(f"{key}={shown} must be {'a finite number ' if not finite else ''}{limits.describe()}")


















@dataclass
class PathsConfig(Schema):
    cache_dir: str = "${xlab_cache_dir:}"














def to_container(cfg: Any) -> dict:
    """Resolved plain-dict form of a config (enums as their names), for saving and trackers."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
