"""`python -m xlab.train [overrides]`: train a model as composed from configs/train.yaml."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from xlab.cli import hydra_app

log = logging.getLogger("xlab.train")


def task(cfg: DictConfig) -> float:
    from xlab.trainer import train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    val = train(cfg, run_dir)
    last = run_dir / "checkpoints" / "last"
    log.info("final val loss %.4f, val accuracy %.2f%%", val["loss"], val["accuracy"])
    log.info("checkpoint: %s", last)
    log.info('generate:   python -m xlab.generate ckpt=%s prompt="The "', shlex.quote(str(last)))
    return val["loss"]


main = hydra_app("train", task)

if __name__ == "__main__":
    main()
