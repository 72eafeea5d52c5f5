"""Checkpoint and export directories, and loading them safely.

A training checkpoint `<run>/checkpoints/step_NNNNNN/` holds
    model.safetensors   weights of the unwrapped, uncompiled model (safetensors: loading runs no code)
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl[, scaler.pt]   Accelerate's save_state
    config.yaml         the run's full resolved config
    tokenizer.json      the tokenizer the model was trained with
    state.json          step, tokens seen, data sampler state
An export holds only model.safetensors, tokenizer.json and config.yaml. `<run>/checkpoints/last` is a symlink to the
newest complete checkpoint; it moves only after a checkpoint is fully written (tmp dir + rename).
Accelerate reads its own files with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import OmegaConf

from xlab.errors import XLabError, check_writable_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

    from xlab.models import XLabModel

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
STATE = "state.json"
EXPORT_FILES = (WEIGHTS, TOKENIZER, CONFIG)


def resolve_checkpoint(path: str | Path) -> Path:
    """The real directory behind a checkpoint/export path (following `last`), or a one-line error."""
    p = Path(path).expanduser()
    if not p.exists():
        raise XLabError(f"checkpoint path {str(path)!r} does not exist")
    p = p.resolve()
    for name in EXPORT_FILES:
        if not (p / name).is_file():
            expected = ", ".join(EXPORT_FILES)
            raise XLabError(f"{str(path)!r} is not a checkpoint: {name} is missing (expected {expected})")
    return p


def load_config(path: str | Path) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.load(resolve_checkpoint(path) / CONFIG))


def _vocab_size(weights: Path) -> int:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            # Tied embeddings are stored once, under either name.
            name = "tok_emb.weight" if "tok_emb.weight" in f.keys() else "lm_head.weight"
            return f.get_slice(name).get_shape()[0]
    except (SafetensorError, OSError, KeyError) as exc:
        raise XLabError(f"cannot read weights {weights}: {exc}") from None


def load_model(path: str | Path, map_location: str | torch.device | None = None) -> XLabModel:
    """Rebuild the model from config.yaml and load model.safetensors into it."""
    from safetensors.torch import load_model as load_safetensors

    from xlab.models import MODELS

    ckpt = resolve_checkpoint(path)
    model_cfg = dict(load_config(ckpt)["model"])
    model = MODELS.get(model_cfg["name"])(vocab_size=_vocab_size(ckpt / WEIGHTS), **model_cfg)
    device = str(map_location) if map_location is not None else "cpu"
    try:
        load_safetensors(model, str(ckpt / WEIGHTS), device=device)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, not the generic header
        raise XLabError(f"weights in {ckpt} do not fit the model in its config.yaml: {reason}") from None
    return model.to(device)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))  # de-duplicates tied tensors; load_model restores the tie


def save_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a full state dict of `model` as safetensors, storing tied weights once (as save_model would)."""
    from safetensors.torch import _remove_duplicate_names, save_file

    for names in _remove_duplicate_names(model.state_dict()).values():
        for name in names:
            state.pop(name, None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def register_accelerate_hooks(accelerator: Accelerator) -> None:
    """Let Accelerate's save_state/load_state handle optimizer, scheduler, scaler and RNG states, while model weights
    go through our own safetensors file of the unwrapped module (no DDP `module.` or compile `_orig_mod.` prefixes)."""

    def save_hook(models: list, weights: list, output_dir: str) -> None:
        from accelerate.utils import DistributedType

        for model in models:
            if accelerator.distributed_type == DistributedType.FSDP:
                # Parameters are sharded across ranks: gather a full copy (a collective) for the safetensors file.
                # Accelerate also writes its sharded copy, which resume reads (and reshards to another world size).
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

                full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if accelerator.is_main_process:
                    save_state_dict(accelerator.unwrap_model(model), full, Path(output_dir) / WEIGHTS)
            elif accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(model, keep_torch_compile=False), Path(output_dir) / WEIGHTS)
        weights.clear()

    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_model as load_safetensors

        for model in models:  # FSDP models never get here: Accelerate loads its sharded copy itself
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # not "cpu:0"
            load_safetensors(unwrapped, str(Path(input_dir) / WEIGHTS), device=device)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def save_checkpoint(
    accelerator: Accelerator, ckpt_root: Path, step: int, config: dict, tokenizer_path: Path, state: dict,
    keep_last: int | None = None, name: str | None = None,
) -> Path:
    """Write step_NNNNNN/ through a temporary directory, then point `last` at it (and keep only the newest
    keep_last). Collective: call on every rank. A kill at any moment leaves `last` on a complete checkpoint."""
    final = ckpt_root / (name or f"step_{step:06d}")  # a named checkpoint (debug) leaves `last` alone
    tmp = ckpt_root / f".tmp_{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(config))
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        (tmp / STATE).write_text(json.dumps({"step": step, **state}, indent=2))
    accelerator.wait_for_everyone()
    pause = os.environ.get("XLAB_TEST_SAVE_PAUSE", "")  # test hook "STEP:SECONDS": a window to kill a save in
    if pause and int(pause.split(":")[0]) == step:
        print(f"pausing inside the save of {tmp}", flush=True)
        time.sleep(float(pause.split(":")[1]))
    if accelerator.is_main_process:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    if accelerator.is_main_process and name is None:
        link = ckpt_root / "last"
        tmp_link = ckpt_root / ".last.tmp"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(final.name)
        os.replace(tmp_link, link)  # atomic: `last` always names a complete checkpoint
        if keep_last:
            for old in sorted(ckpt_root.glob("step_*"))[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resume_config(ckpt: Path, config: dict) -> None:
    """Refuse to resume into a different model: name every model key whose value changed. (Training settings such
    as max_steps, lr or eval cadence may change.)"""
    saved = load_config(ckpt)
    diffs = [f"model.{k} (checkpoint {saved['model'].get(k)!r}, now {v!r})"
             for k, v in config["model"].items() if saved["model"].get(k) != v]
    if diffs:
        raise XLabError(f"cannot resume from {ckpt}: the model config changed: {', '.join(diffs)}")


def load_training_state(accelerator: Accelerator, path: str | Path, config: dict | None = None) -> dict:
    """Restore model/optimizer/scheduler/RNG from a checkpoint into the prepared objects; returns state.json."""
    ckpt = resolve_checkpoint(path)
    if not (ckpt / STATE).is_file():
        raise XLabError(f"{str(path)!r} is an export, not a training checkpoint: it has no {STATE} to resume from")
    if config is not None:
        check_resume_config(ckpt, config)
    try:
        accelerator.load_state(str(ckpt))
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met something that is not plain data
        reason = str(exc).strip().splitlines()[0]
        raise XLabError(f"refusing to load {ckpt}: a state file holds pickled objects, not plain data ({reason})") \
            from None
    return json.loads((ckpt / STATE).read_text())


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Copy the weights, tokenizer and config (no optimizer state) into `out`."""
    ckpt = resolve_checkpoint(path)
    check_writable_dir(out, "out")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise XLabError(f"export directory {str(out)!r} exists and is not empty; choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        shutil.copyfile(ckpt / name, out / name)
    return out
