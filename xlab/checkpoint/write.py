"""Writing training checkpoints atomically (tmp dir + rename) and keeping `last` and `best` on complete ones."""


from __future__ import annotations

import json
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_model as load_safetensors
from safetensors.torch import save_file, save_model

from xlab.checkpoint.layout import CONFIG, STATE, TOKENIZER, WEIGHTS
from xlab.errors import XLabError
from xlab.fsio import opened_inside, publish_dir, publish_symlink

if TYPE_CHECKING:
    from accelerate import Accelerator



def save_weights(model: torch.nn.Module, path: Path) -> None:
    save_model(model, str(path))  # de-duplicates tied tensors; load_model restores the tie


def save_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a full state dict of `model` (e.g. gathered from FSDP shards) as safetensors, storing each tied weight
    once under the name save_model keeps (the first in sorted order), so the file is laid out as save_weights'."""

    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    for tied in names.values():
        for name in sorted(tied)[1:]:
            state.pop(name, None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


class ShardedState(Protocol):
    """Model and optimizer state that every rank saves and loads together (FSDP: training.parallel.ShardedState)."""

    def save(self, directory: Path, weights_file: Path) -> None: ...

    def load(self, ckpt: Path) -> None: ...


class Checkpointer:
    """Writes `<run>/checkpoints/step_NNNNNN/` atomically and keeps `last` on the newest complete one.

    Collective: every rank calls save(). Accelerate's save_state writes optimizer, scheduler and RNG states; the
    hooks below route the weights through our own safetensors file of the unwrapped model. Under FSDP, `sharded`
    (xlab.training.parallel.ShardedState) writes model and optimizer instead."""

    def __init__(self, accelerator: Accelerator, root: Path, config: dict, tokenizer_path: Path,
                 keep_last: int | None = None, sharded: ShardedState | None = None) -> None:
        self.accelerator, self.root, self.config = accelerator, Path(root), config
        self.tokenizer_path, self.keep_last, self.sharded = Path(tokenizer_path), keep_last, sharded

    @staticmethod
    def register_hooks(accelerator: Accelerator) -> None:
        """Weights go through model.safetensors of the unwrapped module (no DDP `module.` or compile `_orig_mod.`
        prefixes); Accelerate keeps optimizer, scheduler, scaler and RNG states."""
        accelerator.register_save_state_pre_hook(_save_hook(accelerator))
        accelerator.register_load_state_pre_hook(_load_hook(accelerator))

    def save(self, state: dict, name: str | None = None, best: bool = False,
             extra: Callable[[Path], None] | None = None) -> Path:
        """Write step_<state["step"]> (or `name`: a debug checkpoint that leaves `last` alone) through a temporary
        directory, then point `last` (and, if `best`, `best`) at it and keep only the newest keep_last besides the
        best. A kill at any moment leaves `last` and `best` on complete checkpoints."""
        acc, step = self.accelerator, int(state["step"])
        final = self.root / (name or f"step_{step:06d}")
        tmp = self.root / f".tmp_{final.name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            if self.sharded is not None:
                self.sharded.save(tmp, tmp / WEIGHTS)
            if acc.is_main_process:
                (tmp / CONFIG).write_text(OmegaConf.to_yaml(self.config))
                shutil.copyfile(self.tokenizer_path, tmp / TOKENIZER)
                (tmp / STATE).write_text(json.dumps(state, indent=2))
                if extra is not None:  # more files of the checkpoint (trainer.ema_decay: the trained weights)
                    extra(tmp)
        except (OSError, RuntimeError, SafetensorError) as exc:  # torch.save reports a failed write as RuntimeError
            self._write_failed(tmp, final, exc)
        _test_pause(step, tmp)  # each rank's files written, not yet known to be complete on every rank
        acc.wait_for_everyone()
        if acc.is_main_process:
            publish_dir(tmp, final, replace=True)
            if name is None:
                publish_symlink(self.root / "last", final.name)  # atomic: `last` always names a complete checkpoint
                if best:
                    publish_symlink(self.root / "best", final.name)
                self._drop_old()
        acc.wait_for_everyone()
        return final

    def _write_failed(self, tmp: Path, final: Path, exc: BaseException) -> None:
        """A full disk (or quota, or file size limit) is the user's to fix: say so in one line, and what is safe."""
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back
        last = self.root / "last"
        kept = f"checkpoints/last still points at {os.readlink(last)}" if last.is_symlink() else "no checkpoint kept"
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise XLabError(f"cannot write checkpoint {final} (is the disk full?): {reason}; {kept}") from exc

    def mark_best(self, step: int) -> None:
        """Point `best` at step_<step>, saved earlier at this step, atomically as `last` is."""
        if self.accelerator.is_main_process:
            publish_symlink(self.root / "best", f"step_{step:06d}")
        self.accelerator.wait_for_everyone()

    def _drop_old(self) -> None:
        if self.keep_last:
            best = (self.root / "best").resolve() if (self.root / "best").is_symlink() else None
            for old in sorted(self.root.glob("step_*"))[:-self.keep_last]:
                if old.resolve() != best:  # keep_last keeps the best checkpoint too
                    shutil.rmtree(old, ignore_errors=True)


def _save_hook(accelerator: Accelerator):
    def save_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:  # an FSDP model is not Accelerate's: xlab.training.parallel.ShardedState saves it
            if accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(model, keep_torch_compile=False), Path(output_dir) / WEIGHTS)
        weights.clear()

    return save_hook


def _load_hook(accelerator: Accelerator):
    def load_hook(models: list, input_dir: str) -> None:
        for model in models:  # an FSDP model is not Accelerate's: xlab.training.parallel.ShardedState loads it
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # not "cpu:0"
            with opened_inside(input_dir, WEIGHTS) as opened:
                load_safetensors(unwrapped, str(opened), device=device)
        models.clear()

    return load_hook


def _test_pause(step: int, tmp: Path) -> None:
    """Test hook XLAB_TEST_SAVE_PAUSE="STEP[,STEP...]:SECONDS": a window to kill or signal a save in."""
    pause = os.environ.get("XLAB_TEST_SAVE_PAUSE", "")
    if pause and step in {int(s) for s in pause.split(":")[0].split(",")}:
        print(f"pausing inside the save of {tmp} (rank {os.environ.get('RANK', 0)}, pid {os.getpid()})", flush=True)
        time.sleep(float(pause.split(":")[1]))
