"""Checkpoint and export directories on disk: layout.py (names, resolving a path, `last`), read.py (the Checkpoint
object every reader takes), write.py (the atomic Checkpointer), safeload.py (state files read as plain data).

Checkpoint and export directories, and loading them safely.

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

This package knows the files only: the typed loaders live with their owners (XLabModel.load_from_checkpoint,
xlab.data.tokenizer.load_tokenizer, xlab.training.resume).
"""
