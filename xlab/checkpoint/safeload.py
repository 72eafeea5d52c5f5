"""Reading a checkpoint's state files without trusting them: plain data only, each problem refused by file name.

Accelerate reads optimizer.bin, scheduler.bin, scaler.pt and random_states_<rank>.pkl with
torch.load(weights_only=True), but it swallows every error of the RNG file (logged at a level XLab hides), and an
FSDP run's sharded state (torch.distributed.checkpoint, xlab/training/parallel.py) is read with plain pickle: its
`.metadata` and its non-tensor items could run code. So before anything is loaded, each file is read here as
plain data (tensors memory-mapped, not copied), DCP metadata through an allow-list of the classes DCP writes; and
the RNG states are restored here, loudly.
"""

from __future__ import annotations

import io
import logging
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import load

from xlab.errors import XLabError
from xlab.fsio import opened_inside

log = logging.getLogger("xlab.checkpoint")

RNG_ESCAPE = "add resume_rng=false to resume without the RNG states (they then start from the seed)"
TORCH_STATE_SUFFIXES = (".bin", ".pt", ".pkl")  # Accelerate's torch.save files (DCP shards are checked apart)


def _first_line(exc: BaseException) -> str:
    """The line of an error that says what is wrong (torch's weights_only refusal opens with advice to disable it)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return (said or lines or [type(exc).__name__])[0]


def load_plain(file: Path, hint: str = "", shown: Path | None = None) -> Any:
    """torch.load(weights_only=True) of one state file, or a one-line refusal naming it (as `shown`, if given: the
    name of a file opened as /proc/self/fd/N)."""
    try:
        try:
            return load(str(file), map_location="cpu", mmap=True)  # Accelerate's safe globals (numpy arrays)
        except pickle.UnpicklingError:
            raise
        except Exception:  # not a zip torch.save file: an older format, or damaged; a plain read says which
            return load(str(file), map_location="cpu")
    except Exception as exc:  # whatever fails, the file cannot be trusted: unpickling refused, truncated, not a zip
        plain = not isinstance(exc, pickle.UnpicklingError)
        kind = "is damaged or truncated" if plain else "holds objects that are not plain data"
        tail = f"; {hint}" if hint else ""
        raise XLabError(f"refusing to load {shown or file}: it {kind} ({_first_line(exc)}){tail}") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles only what torch.distributed.checkpoint writes into `.metadata`: its dataclasses, torch sizes,
    dtypes and layouts, paths and plain containers."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
             ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}

    def find_class(self, module: str, name: str) -> Any:
        if module in self.MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type) and obj.__module__ == module:  # a class DCP defines, not one it imports
                return obj
        elif (module, name) in self.NAMES:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def check_dcp_dir(directory: Path) -> None:
    """A sharded (DCP) state directory: its metadata through the allow-list, and every non-tensor item (which DCP
    would torch.load with weights_only=False) as plain data."""
    from torch.distributed.checkpoint import metadata as dcp_metadata  # 0.5 s of start-up: FSDP runs only

    meta_file = directory / ".metadata"
    try:
        with opened_inside(directory, ".metadata") as opened, open(opened, "rb") as f:
            meta = _MetadataUnpickler(f).load()
        items = [(index, meta.storage_data[index]) for index in meta.storage_data
                 if isinstance(meta.state_dict_metadata.get(index.fqn), dcp_metadata.BytesStorageMetadata)]
    except XLabError:  # a link out of the directory: said as such
        raise
    except Exception as exc:
        raise XLabError(f"refusing to load {meta_file}: it is not plain DCP metadata ({_first_line(exc)})") from None
    for index, info in items:
        shard = directory / info.relative_path
        with opened_inside(directory, info.relative_path) as opened, open(opened, "rb") as f:
            f.seek(info.offset)
            item = io.BytesIO(f.read(info.length))
        try:
            torch.load(item, weights_only=True)
        except Exception as exc:
            raise XLabError(f"refusing to load {shard}: item {index.fqn!r} is not plain data ({_first_line(exc)})") \
                from None


def check_state_files(ckpt: Path, world: int, resume_rng: bool) -> None:
    """Read every Accelerate state file of checkpoint `ckpt` (saved by `world` processes) as plain data; with
    `resume_rng`, each rank's RNG file must be there."""
    for file in sorted(ckpt.iterdir()):
        if file.suffix in TORCH_STATE_SUFFIXES and file.is_file():
            rng = file.name.startswith("random_states_")
            if resume_rng or not rng:
                states = load_plain(file, RNG_ESCAPE if rng else "")
                if rng:
                    _check_rng_states(states, file)
        elif file.is_dir() and (file / ".metadata").exists():
            check_dcp_dir(file)
    if resume_rng:
        for rank in range(world):
            if not (ckpt / f"random_states_{rank}.pkl").is_file():
                raise XLabError(f"cannot resume from {ckpt}: random_states_{rank}.pkl is missing; {RNG_ESCAPE}")


RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")


def _check_rng_states(states: Any, file: Path) -> None:
    """Refuse a file that does not hold restorable RNG states: the CPU ones are tried and put back, so xlab.train
    refuses before Hydra writes (CUDA ones are left to the restore: touching CUDA here would claim GPU 0 on every
    rank)."""
    if not isinstance(states, dict) or any(k not in states for k in RNG_KEYS):
        raise XLabError(f"refusing to load {file}: it does not hold the RNG states {', '.join(RNG_KEYS)}; "
                        f"{RNG_ESCAPE}")
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        set_rng_states({k: states[k] for k in RNG_KEYS}, file)
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


def current_rng_states() -> dict:
    """This process's RNG states, in the layout of Accelerate's random_states file."""
    states = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


def rank_rng_states(ckpt: Path, rank: int, world: int) -> dict | None:
    """The RNG states rank `rank` saved, or None for a rank beyond the `world` processes that saved the checkpoint
    (a resume on more processes: that rank's RNG never existed, it keeps its seeded state)."""
    file = ckpt / f"random_states_{rank}.pkl"
    if rank >= world and not file.exists():
        log.warning("rank %d: %s has no RNG state for this rank (saved by %d processes); it starts from the seed",
                    rank, ckpt, world)
        return None
    with opened_inside(ckpt, file.name) as opened:
        states = load_plain(opened, RNG_ESCAPE, shown=file)
    _check_rng_states(states, file)
    return states


def set_rng_states(states: dict, file: Path | str) -> None:
    """Restore Python, NumPy, torch and (when both sides have it) CUDA RNG states, or a one-line refusal."""
    try:
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        cuda = states.get("torch_cuda_manual_seed")
        if cuda is not None and torch.cuda.is_available():  # a CPU checkpoint has no CUDA state to restore
            torch.cuda.set_rng_state_all(list(cuda)[: torch.cuda.device_count()])
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as exc:
        raise XLabError(f"refusing to load {file}: its RNG states cannot be restored ({_first_line(exc)}); "
                        f"{RNG_ESCAPE}") from None
