"""`python -m xlab.train [overrides]`: train a model as composed from configs/train.yaml."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from xlab.cli import hydra_app, typed
from xlab.data.sources import check_source
from xlab.errors import check_writable_dir
from xlab.schema import to_container
from xlab.training.config import TrainConfig
from xlab.training.resume import check_resumable, check_resume_config
from xlab.training.rundir import check_run_dir, is_rank_zero, lock_run_dir
from xlab.training.trainer import check_config, resume_path, train

log = logging.getLogger("xlab.train")


def task(cfg: TrainConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if is_rank_zero():  # taken already unless Hydra flags (-m) skipped the prevalidation
        lock_run_dir(run_dir)
    val = train(cfg, run_dir)
    last = run_dir / "checkpoints" / "last"
    if "loss" not in val:  # a second stop signal skipped the final evaluation
        log.info("checkpoint: %s", last)
        return float("nan")
    log.info("final val loss %.4f, val bpb %.4f, val accuracy %.2f%%", val["loss"], val["bits_per_byte"],
             val["accuracy"])
    best = run_dir / "checkpoints" / "best"
    if best.exists():
        state = json.loads((best / "state.json").read_text())["best"]
        log.info("best: step %d, val loss %.4f, val bpb %.4f: %s", state["step"], state["val_loss"],
                 state["val_bpb"], best)
    log.info("checkpoint: %s", last)
    log.info('generate:   python -m xlab.generate ckpt=%s prompt="The "', shlex.quote(str(last)))
    return val["loss"]


def validate_job(cfg: DictConfig) -> TrainConfig:
    """The config checks alone, for each job of a `-m` sweep (Hydra makes the job's run dir); returns the checked
    TrainConfig."""
    train_cfg = typed(cfg)
    check_config(train_cfg)
    check_source(train_cfg.data)
    return train_cfg


def validate(cfg: DictConfig) -> None:
    """Config checks, the resume compatibility check and the run dir's (no fresh run over another, one writer at a
    time: xlab/training/rundir.py), before Hydra writes into the run dir."""
    run_dir = Path(cfg.hydra.run.dir)
    check_writable_dir(run_dir, "hydra.run.dir")
    train_cfg = validate_job(cfg)
    ckpt = resume_path(train_cfg.resume, run_dir / "checkpoints")
    if ckpt is not None and train_cfg.init_from is None:
        check_resumable(ckpt)
        check_resume_config(ckpt, to_container(OmegaConf.structured(train_cfg)))
    check_run_dir(run_dir, train_cfg.resume, train_cfg.overwrite)
    if is_rank_zero():  # held until this process exits: the other ranks write only what rank 0 coordinates
        lock_run_dir(run_dir)


main = hydra_app("train", task, TrainConfig, validate, validate_job)

if __name__ == "__main__":
    main()
