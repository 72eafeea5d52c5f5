"""Checkpoint and export directories, and loading them safely.

A training checkpoint `<run>/checkpoints/step_NNNNNN/` holds
    model.safetensors   weights of the unwrapped, uncompiled model (safetensors: loading runs no code)
    optimizer.bin, scheduler.bin, random_states_<rank>.pkl[, scaler.pt]   Accelerate's save_state
    sharded/            FSDP runs: model and optimizer shards (torch.distributed.checkpoint) instead of optimizer.bin
    config.yaml         the run's full resolved config
    tokenizer.json      the tokenizer the model was trained with
    state.json          step, tokens seen, data sampler state
An export holds only model.safetensors, tokenizer.json and config.yaml. `<run>/checkpoints/last` is a symlink to the
newest complete checkpoint; it moves only after a checkpoint is fully written (tmp dir + rename).

Loading trusts nothing in the directory: a symlink that leads out of it is refused (XLab, Accelerate and transformers
open its files by name, so a planted link would make them read, or export, any file); each of Accelerate's state
files is first read as plain data (torch.load(weights_only=True), DCP metadata through an allow-list), and a
damaged or code-carrying one is refused by name; the RNG states are restored by XLab itself, because Accelerate
swallows a failure there; a tokenizer with ids beyond the weights' embedding rows is refused.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from omegaconf import OmegaConf
from safetensors import SafetensorError

from xlab.errors import XLabError, check_writable_dir
from xlab.fsio import contained, publish_dir, publish_symlink

if TYPE_CHECKING:
    from accelerate import Accelerator

    from xlab.tokenizer import XLabTokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.json"
STATE = "state.json"
EXPORT_FILES = (WEIGHTS, TOKENIZER, CONFIG)
SHARDED_DIR = "sharded"  # FSDP runs: model and optimizer shards (torch.distributed.checkpoint)
# What xlab.evaluate and xlab.generate write into a checkpoint: replaced on write (fsio.write_file), never read, so a
# symlink there is no reason to refuse the checkpoint.
OUTPUTS = ("eval_*.json", "samples_*.jsonl", "samples_*.md")


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
    check_links(p)
    return p


def check_links(ckpt: Path) -> None:
    """Refuse a checkpoint holding a symlink that leads out of it, at any depth (an FSDP run's sharded/ state is a
    subdirectory), naming the link; links between its own files are fine."""
    for root, dirs, files in os.walk(ckpt):  # a linked directory is listed, not entered
        for name in dirs + files:
            rel = (Path(root) / name).relative_to(ckpt)
            if (ckpt / rel).is_symlink() and not (root == str(ckpt) and any(fnmatch.fnmatch(name, o) for o in OUTPUTS)):
                contained(ckpt, rel)


def is_complete(path: Path) -> bool:
    """Whether `path` is a directory with every file a training checkpoint has (ours; Accelerate's vary)."""
    return path.is_dir() and all((path / name).is_file() for name in (*EXPORT_FILES, STATE))


def newest_checkpoint(root: Path) -> Path | None:
    """The complete step_N directory with the highest N under `root`, or None."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("step_*") if p.name[5:].isdigit() and is_complete(p)]
    return max(found)[1] if found else None


def load_config(path: str | Path) -> dict[str, Any]:
    """A checkpoint's config.yaml as a dict, or one line saying why it cannot be read."""
    file = contained(resolve_checkpoint(path), CONFIG)
    try:
        config = OmegaConf.to_container(OmegaConf.load(file))
    except Exception as exc:  # OSError, YAML and OmegaConf errors alike: the file is damaged
        reason = " ".join(str(exc).split())  # YAML errors span several lines
        raise XLabError(f"cannot read {file}: {reason}") from None
    if not isinstance(config, dict):
        raise XLabError(f"{file} is not a mapping of config groups (model, data, tokenizer, ...)")
    return config


def load_section(path: str | Path, group: str, schema: type) -> Any:
    """One group of a checkpoint's config.yaml as its typed config (schema: the group's dataclass), checked like a
    command line's, or one line naming the key or value that is wrong there."""
    from omegaconf.errors import OmegaConfBaseException

    file = resolve_checkpoint(path) / CONFIG
    values = load_config(path).get(group)
    if not isinstance(values, dict):
        raise XLabError(f"{file} has no {group}: mapping")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except (OmegaConfBaseException, XLabError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise XLabError(f"{file}, {group}: {first}") from None


def model_vocab_size(path: str | Path) -> int:
    """Rows of the token embedding stored in a checkpoint's weights (read from the header, no tensor loaded)."""
    from safetensors import safe_open

    weights = contained(resolve_checkpoint(path), WEIGHTS)
    try:
        with safe_open(str(weights), framework="pt") as f:
            # Tied embeddings are stored once, under either name.
            name = "tok_emb.weight" if "tok_emb.weight" in f.keys() else "lm_head.weight"
            return f.get_slice(name).get_shape()[0]
    except (SafetensorError, OSError, KeyError) as exc:
        raise XLabError(f"cannot read weights {weights}: {exc}") from None


def load_weights(model: torch.nn.Module, path: str | Path, device: str = "cpu") -> None:
    """Load a checkpoint's model.safetensors into `model` (safetensors: no code runs), or a one-line error naming
    the first tensor that does not fit."""
    from safetensors.torch import load_model as load_safetensors

    ckpt = resolve_checkpoint(path)
    try:
        load_safetensors(model, str(contained(ckpt, WEIGHTS)), device=device)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        reason = lines[1] if len(lines) > 1 else lines[0]  # the first mismatch, not the generic header
        raise XLabError(f"weights in {ckpt} do not fit the model in its config.yaml: {reason}") from None


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_model

    save_model(model, str(path))  # de-duplicates tied tensors; load_model restores the tie


def save_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Save a full state dict of `model` (e.g. gathered from FSDP shards) as safetensors, storing each tied weight
    once under the name save_model keeps (the first in sorted order), so the file is laid out as save_weights'."""
    from collections import defaultdict

    from safetensors.torch import save_file

    names: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        names[id(p)].append(name)
    for tied in names.values():
        for name in sorted(tied)[1:]:
            state.pop(name, None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# Model keys that do not change what the weights compute: training-only regularisation (dropout, z_loss), the
# attention kernel (attn_impl) and initialisation-only keys. Resume accepts a change of these; any other model key
# (shapes, positions, norms, logit_softcap, which changes the output function) makes the weights mean something else.
RESUMABLE_MODEL_KEYS = frozenset({"dropout", "attn_dropout", "z_loss", "attn_impl", "init_std", "residual_init"})


def check_resume_config(ckpt: Path, config: dict) -> None:
    """Refuse to resume into a model whose weights would mean something else, naming each changed key, or under the
    other strategy (a DDP checkpoint holds full optimizer state, an FSDP one shards of it). A key the
    checkpoint's config lacks (written before the key existed) counts as its default, which is the old behaviour.
    (Training settings such as max_steps, lr or eval cadence may change.) Then the state files are checked, so that
    xlab.train refuses a damaged checkpoint before Hydra writes into the run dir."""
    from xlab.config import ModelConfig, to_container

    saved = to_container(OmegaConf.structured(load_section(ckpt, "model", ModelConfig)))
    diffs = [f"model.{k} (checkpoint {saved.get(k)!r}, now {v!r})" for k, v in config["model"].items()
             if k not in RESUMABLE_MODEL_KEYS and saved.get(k) != v]
    if diffs:
        raise XLabError(f"cannot resume from {ckpt}: the model config changed: {', '.join(diffs)}")
    check_strategy(ckpt, str(config.get("trainer", {}).get("strategy", "ddp")))
    check_state_files(ckpt, config)


def check_strategy(ckpt: Path, strategy: str) -> None:
    """A checkpoint resumes under the strategy that wrote it (on any number of ranks), or a one-line error."""
    sharded = (ckpt / SHARDED_DIR).is_dir()
    saved = "fsdp" if sharded else "ddp"
    if (strategy == "fsdp") != sharded:
        held = f"{SHARDED_DIR}/ holds its sharded state" if sharded else f"no {SHARDED_DIR}/ directory"
        raise XLabError(f"cannot resume from {ckpt} with trainer.strategy={strategy}: it was saved by "
                        f"{'an FSDP' if sharded else 'a DDP'} run ({held}); resume it with trainer.strategy={saved}")


class ShardedState(Protocol):
    """Model and optimizer state that every rank saves and loads together (FSDP: xlab.parallel.ShardedState)."""

    def save(self, directory: Path, weights_file: Path) -> None: ...

    def load(self, ckpt: Path) -> None: ...


class Checkpointer:
    """Writes `<run>/checkpoints/step_NNNNNN/` atomically and keeps `last` on the newest complete one.

    Collective: every rank calls save(). Accelerate's save_state writes optimizer, scheduler and RNG states; the
    hooks below route the weights through our own safetensors file of the unwrapped model. Under FSDP, `sharded`
    (xlab.parallel.ShardedState) writes model and optimizer instead."""

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

    def save(self, state: dict, name: str | None = None, best: bool = False) -> Path:
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
        for model in models:  # an FSDP model is not Accelerate's: xlab.parallel.ShardedState saves it
            if accelerator.is_main_process:
                save_weights(accelerator.unwrap_model(model, keep_torch_compile=False), Path(output_dir) / WEIGHTS)
        weights.clear()

    return save_hook


def _load_hook(accelerator: Accelerator):
    def load_hook(models: list, input_dir: str) -> None:
        from safetensors.torch import load_model as load_safetensors

        for model in models:  # an FSDP model is not Accelerate's: xlab.parallel.ShardedState loads it
            unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
            device = "cpu" if accelerator.device.type == "cpu" else str(accelerator.device)  # not "cpu:0"
            load_safetensors(unwrapped, str(contained(input_dir, WEIGHTS)), device=device)
        models.clear()

    return load_hook


def _test_pause(step: int, tmp: Path) -> None:
    """Test hook XLAB_TEST_SAVE_PAUSE="STEP[,STEP...]:SECONDS": a window to kill or signal a save in."""
    pause = os.environ.get("XLAB_TEST_SAVE_PAUSE", "")
    if pause and step in {int(s) for s in pause.split(":")[0].split(",")}:
        print(f"pausing inside the save of {tmp} (rank {os.environ.get('RANK', 0)}, pid {os.getpid()})", flush=True)
        time.sleep(float(pause.split(":")[1]))


def read_state(ckpt: Path) -> dict:
    """A training checkpoint's state.json, checked to hold every key TrainState needs, or a one-line error (an export
    has none; a damaged one names what is wrong)."""
    from xlab.train_state import TrainState

    if not (ckpt / STATE).is_file():
        raise XLabError(f"{str(ckpt)!r} is an export, not a training checkpoint: it has no {STATE} to resume from")
    try:
        state = json.loads(contained(ckpt, STATE).read_text(encoding="utf-8"))
        TrainState().load_state_dict(state)  # every key it needs, of the right type
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise XLabError(f"cannot resume from {ckpt}: {STATE} is damaged ({type(exc).__name__}: {exc})") from None
    return state


def saved_world(ckpt: Path, state: dict) -> int:
    """How many processes wrote the checkpoint: one weight checksum each (older ones: one RNG file each)."""
    checksums = state.get("rank_weight_checksums") or []
    return len(checksums) or max(1, len(list(ckpt.glob("random_states_*.pkl"))))


def check_state_files(ckpt: Path, config: dict | None) -> None:
    """Refuse damaged or code-carrying state files, naming the file, before anything is restored; a missing RNG
    file is refused too unless the config says resume_rng=false."""
    from xlab.safeload import check_state_files as check

    resume_rng = True if config is None else bool(config.get("resume_rng", True))
    check(ckpt, saved_world(ckpt, read_state(ckpt)), resume_rng)


def check_resumable(path: str | Path) -> dict:
    """The state.json of a training checkpoint, once cheap checks found its state files whole, or one line naming
    the damaged file. Cheap enough to run before Hydra writes into the run dir: a truncated torch file lacks the zip
    directory at its end, which is all that is read here."""
    import zipfile

    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    for file in sorted([*ckpt.glob("*.bin"), *ckpt.glob("*.pt")]):  # Accelerate's torch.save files
        if not zipfile.is_zipfile(file):
            raise XLabError(f"cannot resume from {ckpt}: {file.name} is damaged or truncated (not a whole torch file)")
    return state


def load_training_state(accelerator: Accelerator, path: str | Path, config: dict | None = None,
                        sharded: ShardedState | None = None) -> dict:
    """Restore model/optimizer/scheduler/RNG from a checkpoint into the prepared objects (model and optimizer
    through `sharded` under FSDP); returns state.json. With config["resume_rng"] false the RNGs keep their seeded
    state instead of the checkpoint's."""
    from xlab import safeload

    ckpt = resolve_checkpoint(path)
    state = check_resumable(ckpt)
    if config is not None:
        check_resume_config(ckpt, config)  # the state files too
    else:
        check_state_files(ckpt, None)
    resume_rng = True if config is None else bool(config.get("resume_rng", True))
    rank = accelerator.process_index
    # Accelerate restores the RNGs itself but swallows any failure; XLab sets them after it, loudly (or puts the
    # seeded ones back, with resume_rng=false).
    rng = safeload.rank_rng_states(ckpt, rank, saved_world(ckpt, state)) if resume_rng else \
        safeload.current_rng_states()
    try:
        accelerator.load_state(str(ckpt))
        if sharded is not None:
            sharded.load(ckpt)
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met something that is not plain data
        reason = str(exc).strip().splitlines()[0]
        raise XLabError(f"refusing to load {ckpt}: a state file holds pickled objects, not plain data ({reason})") \
            from None
    except FileNotFoundError as exc:
        raise XLabError(f"cannot resume from {ckpt}: {Path(exc.filename or '?').name} is missing") from None
    except (RuntimeError, EOFError, ValueError, OSError, SafetensorError) as exc:  # damage the checks above miss
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise XLabError(f"cannot resume from {ckpt}: a state file is damaged ({reason})") from None
    if rng is not None:
        safeload.set_rng_states(rng, ckpt / f"random_states_{rank}.pkl")
    return state


def load_tokenizer(path: str | Path) -> XLabTokenizer:
    """A checkpoint's tokenizer, or a one-line error when it cannot be read, lacks the config's special tokens or
    has ids beyond the weights' embedding rows (a tokenizer.json of another run)."""
    from xlab.config import TokenizerConfig
    from xlab.tokenizer import XLabTokenizer

    ckpt = resolve_checkpoint(path)
    file = contained(ckpt, TOKENIZER)
    try:
        tokenizer = XLabTokenizer.from_file(file, load_section(ckpt, "tokenizer", TokenizerConfig))
    except XLabError:
        raise
    except Exception as exc:  # the tokenizers library raises plain Exceptions for a damaged file
        raise XLabError(f"cannot read the tokenizer {file}: {str(exc).strip().splitlines()[0]}") from None
    ids = max(len(tokenizer), 1 + max(tokenizer.tokenizer.get_vocab(with_added_tokens=True).values()))
    rows = model_vocab_size(ckpt)
    # XLab sizes the embedding to its tokenizer exactly; a transformers model (init_from) may have spare rows.
    if ids > rows or (not load_config(ckpt).get("init_from") and ids != rows):
        raise XLabError(f"{file} has {ids} token ids but the weights in {ckpt} have {rows} embedding rows: the "
                        "tokenizer is not the one these weights were trained with")
    return tokenizer


def export_checkpoint(path: str | Path, out: str | Path) -> Path:
    """Copy the weights, tokenizer and config (no optimizer state) into `out`."""
    from xlab.config import DataConfig, ModelConfig, TokenizerConfig

    ckpt = resolve_checkpoint(path)
    load_tokenizer(ckpt)  # refuse a tokenizer that does not fit the weights before writing anything
    for group, schema in (("model", ModelConfig), ("data", DataConfig), ("tokenizer", TokenizerConfig)):
        load_section(ckpt, group, schema)  # an export must load: refuse to copy a damaged config.yaml
    check_writable_dir(out, "out")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise XLabError(f"export directory {str(out)!r} exists and is not empty; choose another out=")
    out.mkdir(parents=True, exist_ok=True)
    for name in EXPORT_FILES:
        shutil.copyfile(contained(ckpt, name), out / name)
    return out
