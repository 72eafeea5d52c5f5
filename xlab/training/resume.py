"""Resuming a run from a training checkpoint: what may change, the state files checked as plain data, then
Accelerate's load_state with the RNG states restored by XLab and the configured optimizer settings put back."""


from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf
from safetensors import SafetensorError

from xlab.checkpoint import safeload
from xlab.checkpoint.layout import SHARDED_DIR, STATE, resolve_checkpoint
from xlab.checkpoint.read import Checkpoint
from xlab.checkpoint.write import ShardedState
from xlab.errors import XLabError
from xlab.fsio import opened_inside
from xlab.models.config import ModelConfig
from xlab.schema import to_container
from xlab.training.state import TrainState

if TYPE_CHECKING:
    from accelerate import Accelerator

log = logging.getLogger(__name__)

# Model keys that do not change what the weights compute: training-only regularisation (dropout, z_loss), the
# attention kernel (attn_impl) and initialisation-only keys. Resume accepts a change of these; any other model key
# (shapes, positions, norms, logit_softcap, which changes the output function) makes the weights mean something else.
RESUMABLE_MODEL_KEYS = frozenset({"dropout", "attn_dropout", "z_loss", "attn_impl", "init_std", "residual_init"})


def check_resume_config(ckpt: Path, config: dict) -> None:
    """Refuse to resume into a model whose weights would mean something else, naming each changed key, or under the
    other strategy (a DDP checkpoint holds full optimizer state, an FSDP one shards of it). A key the
    checkpoint's config lacks (written before the key existed) counts as its default, which is the old behaviour.
    (Training settings such as max_steps, lr or eval cadence may change: the resumed run follows the config, the
    optimizer.* settings included, which load_training_state puts back over the checkpoint's param groups and logs.)
    Then the state files are checked, so that xlab.train refuses a damaged checkpoint before Hydra writes into the
    run dir."""
    checkpoint = Checkpoint.of(ckpt)  # resolved once: its path below, its config.yaml here
    ckpt = checkpoint.path
    saved = to_container(OmegaConf.structured(checkpoint.section("model", ModelConfig)))
    diffs = [f"model.{k} (checkpoint {saved.get(k)!r}, now {v!r})" for k, v in config["model"].items()
             if k not in RESUMABLE_MODEL_KEYS and saved.get(k) != v]
    if diffs:
        raise XLabError(f"cannot resume from {ckpt}: the model config changed: {', '.join(diffs)}")
    check_lr_groups(ckpt, checkpoint.config.get("optimizer") or {}, config.get("optimizer") or {})
    check_strategy(ckpt, str(config.get("trainer", {}).get("strategy", "ddp")))
    check_state_files(ckpt, config)


def check_lr_groups(ckpt: Path, saved: dict, now: dict) -> None:
    """The optimizer state holds one entry per param group, and a parameter with an lr scale other than 1 has a group
    of its own (xlab/training/optimizers.py): a scale may change on resume, but not to or from 1."""
    for key in ("embed_lr_scale", "head_lr_scale"):
        was, new = float(saved.get(key, 1.0)), float(now.get(key, 1.0))
        if (was == 1) != (new == 1):
            valid = "1" if was == 1 else "any value but 1"
            raise XLabError(f"cannot resume from {ckpt} with optimizer.{key}={new:g}: it trained with {was:g}, so its "
                            f"optimizer state has {'no' if was == 1 else 'a'} param group of its own for it; "
                            f"valid: optimizer.{key}={valid}")


def check_strategy(ckpt: Path, strategy: str) -> None:
    """A checkpoint resumes under the strategy that wrote it (on any number of ranks), or a one-line error."""
    sharded = (ckpt / SHARDED_DIR).is_dir()
    saved = "fsdp" if sharded else "ddp"
    if (strategy == "fsdp") != sharded:
        held = f"{SHARDED_DIR}/ holds its sharded state" if sharded else f"no {SHARDED_DIR}/ directory"
        raise XLabError(f"cannot resume from {ckpt} with trainer.strategy={strategy}: it was saved by "
                        f"{'an FSDP' if sharded else 'a DDP'} run ({held}); resume it with trainer.strategy={saved}")


def read_state(ckpt: Path) -> dict:
    """A training checkpoint's state.json, checked to hold every key TrainState needs, or a one-line error (an export
    has none; a damaged one names what is wrong)."""
    if not (ckpt / STATE).is_file():
        raise XLabError(f"{str(ckpt)!r} is an export, not a training checkpoint: it has no {STATE} to resume from")
    try:
        with opened_inside(ckpt, STATE) as opened:
            state = json.loads(opened.read_text(encoding="utf-8"))
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
    resume_rng = True if config is None else bool(config.get("resume_rng", True))
    safeload.check_state_files(ckpt, saved_world(ckpt, read_state(ckpt)), resume_rng)


def check_resumable(path: str | Path) -> dict:
    """The state.json of a training checkpoint, once cheap checks found its state files whole, or one line naming
    the damaged file. Cheap enough to run before Hydra writes into the run dir: a truncated torch file lacks the zip
    directory at its end, which is all that is read here."""
    ckpt = resolve_checkpoint(path)
    state = read_state(ckpt)
    for file in sorted([*ckpt.glob("*.bin"), *ckpt.glob("*.pt")]):  # Accelerate's torch.save files
        if not zipfile.is_zipfile(file):
            raise XLabError(f"cannot resume from {ckpt}: {file.name} is damaged or truncated (not a whole torch file)")
    return state


def optimizer_settings(optimizer: Any) -> list[dict]:
    """Each param group's settings: every key but its parameters (lr, initial_lr, weight_decay, betas, eps, ...)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_optimizer_settings(optimizer: Any, scheduler: Any, settings: list[dict]) -> None:
    """Put the settings of the optimizer as built (from the config) back after a load: Optimizer.load_state_dict
    restores the checkpoint's param-group settings and LambdaLR its base_lrs, so a changed optimizer.lr,
    weight_decay or betas would be ignored. The lr of the step resumed at follows from the schedule
    (xlab/training/schedulers.py: a LambdaLR); unchanged settings give back exactly the checkpoint's values."""
    groups = optimizer.param_groups
    for group, values in zip(groups, settings, strict=True):
        group.update(values)
    schedule = getattr(scheduler, "scheduler", scheduler)  # Accelerate's AcceleratedScheduler wraps the LambdaLR
    schedule.base_lrs = [group["initial_lr"] for group in groups]
    for group, base, multiplier in zip(groups, schedule.base_lrs, schedule.lr_lambdas, strict=True):
        group["lr"] = base * multiplier(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in groups]  # get_last_lr(): what the next log reports until a step


def optimizer_changes(ckpt: Path, config: dict) -> list[str]:
    """`optimizer.KEY OLD -> NEW` for each optimizer setting that differs from the checkpoint's config.yaml."""
    saved = Checkpoint.of(ckpt).config.get("optimizer") or {}
    return [f"optimizer.{k} {saved[k]} -> {v}" for k, v in config.get("optimizer", {}).items()
            if k in saved and saved[k] != v]


def load_training_state(accelerator: Accelerator, path: str | Path, config: dict | None = None,
                        sharded: ShardedState | None = None, optimizer: Any = None, scheduler: Any = None) -> dict:
    """Restore model/optimizer/scheduler/RNG from a checkpoint into the prepared objects (model and optimizer
    through `sharded` under FSDP); returns state.json. Given `optimizer` and `scheduler` (built from the config), their
    configured settings are put back over the checkpoint's (apply_optimizer_settings), the changed ones logged. With
    config["resume_rng"] false the RNGs keep their seeded state instead of the checkpoint's."""
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
    settings = None if optimizer is None else optimizer_settings(optimizer)  # before the load replaces them
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
    if settings is not None:
        apply_optimizer_settings(optimizer, scheduler, settings)
        if config is not None and accelerator.is_main_process and (changes := optimizer_changes(ckpt, config)):
            log.info("resume: %s applied", ", ".join(changes))
    return state


def keys_the_checkpoint_lacks(ckpt: str | Path, config: dict) -> list[str]:
    """The config keys (dotted) a checkpoint's config.yaml does not record because it was written before they
    existed: a resume fills them with today's defaults, which the log says (one line)."""

    def flat(node: dict, prefix: str = "") -> set[str]:
        keys = set()
        for key, value in node.items():
            keys |= flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
        return keys

    saved = flat(Checkpoint.of(ckpt).config)
    return sorted(k for k in flat(config) if k not in saved and not any(k.startswith(s + ".") for s in saved))

