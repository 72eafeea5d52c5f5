"""`python -m xlab.prepare [same overrides as train]`: build the tokenizer and token shards ahead of training.

Training calls the same code (xlab/data/prepare.py) when the cache lacks them, so this is optional; it lets a big
corpus be prepared on a CPU machine (or with all cores, before the GPUs are booked), and a killed preparation is
continued by running it again. Prints the split sizes, the tokenizer's bytes per token on each split (what turns a
per-token loss into bits per byte), and the expected time per epoch of the configured run.
"""

from __future__ import annotations

import json
import logging

from xlab.cli import hydra_app
from xlab.data.datamodule import XLabDataModule
from xlab.training.config import TrainConfig
from xlab.training.estimate import bytes_per_token, epoch_estimate, model_flops_per_token

log = logging.getLogger("xlab.prepare")


def task(typed: TrainConfig) -> dict:
    datamodule = XLabDataModule(typed.data, typed.tokenizer, typed.paths.cache_dir)
    prepared = datamodule.prepare()
    meta = json.loads((prepared.tokens_dir / "meta.json").read_text())
    log.info("tokenizer: %s (%d tokens)", prepared.tokenizer_path, len(datamodule.tokenizer))
    log.info("token files: %s (%s)", prepared.tokens_dir, meta["dtype"])
    table = datamodule.tokenizer.byte_lengths()
    for name, split in meta["splits"].items():
        shards = len(split.get("shards", [None]))
        per_token = bytes_per_token(datamodule.tokens(name), table)
        log.info("  %-8s %10d documents %14d tokens in %d shard(s), %.3f bytes/token", name, split["documents"],
                 split["tokens"], shards, per_token)
    t = typed.trainer
    flops, params = model_flops_per_token(typed.model, len(datamodule.tokenizer))
    log.info("model: %.1fM parameters", params / 1e6)
    tokens_per_step = t.batch_size * t.grad_accum_steps * typed.model.max_len
    for line in epoch_estimate(flops, meta["splits"]["train"]["tokens"], tokens_per_step):
        log.info(line)
    return meta


main = hydra_app("train", task, TrainConfig)

if __name__ == "__main__":
    main()
