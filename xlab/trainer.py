"""The training loop (Accelerate), and the evaluation that training and `xlab.evaluate` share.

One optimizer step = grad_accum_steps micro-batches of batch_size windows per process. The loss is a sum of
token losses divided by the step's token count, so accumulation gives exactly the gradient of one big batch.
Metrics leave the device only every log_every steps, so steps queue back to back on a GPU.
"""

from __future__ import annotations

import itertools
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from xlab.checkpoint import load_training_state, register_accelerate_hooks, resolve_checkpoint, save_checkpoint
from xlab.config import Precision, TrainConfig, to_container
from xlab.data.datamodule import XLabDataModule
from xlab.data.estimate import epoch_estimate
from xlab.data.sources import check_data_config
from xlab.errors import XLabError
from xlab.loggers import (
    TRACKERS,
    MetricsFile,
    check_logger_config,
    flat_config,
    tracker_init_kwargs,
    tracker_run_ids,
)
from xlab.metrics import mfu, peak_flops
from xlab.models import MODELS
from xlab.models.transformer import check_model_config
from xlab.optimizers import OPTIMIZERS, check_optimizer_config
from xlab.runtime import keep_freed_memory
from xlab.schedulers import build_scheduler, check_scheduler_config
from xlab.tokenizer import check_tokenizer_config

log = logging.getLogger(__name__)


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: Precision | str) -> str:
    """Config precision → Accelerate's mixed_precision ("no", "bf16", "fp16")."""
    p = Precision(precision)
    if p is Precision.auto:
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_fast_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[p.value]


def autocast_for(device: torch.device, mixed_precision: str) -> Callable[[], AbstractContextManager]:
    if mixed_precision == "no":
        return nullcontext
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    windows: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Token-level loss, accuracy (%), perplexity and token count over the given windows. With several processes,
    each passes its share of the windows and `reduce` sums the totals across them."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens
    for x, y in windows:
        x, y = x.to(device), y.to(device)
        with autocast():
            _, batch_loss, batch_correct = model(x, targets=y)
        totals += torch.stack([batch_loss.double(), batch_correct.double(), totals.new_tensor(y.numel())])
    model.train(was_training)
    if reduce is not None:
        totals = reduce(totals)
    loss_sum, correct, count = totals.tolist()
    if count == 0:
        raise XLabError("nothing to evaluate: the split has no complete window")
    mean = loss_sum / count
    return {"loss": mean, "accuracy": 100.0 * correct / count, "perplexity": math.exp(min(mean, 50.0)),
            "tokens": int(count)}


def check_config(cfg: TrainConfig) -> None:
    """Every check that can fail before any work is done."""
    MODELS.get(cfg.model.name)
    check_model_config(cfg.model)
    check_data_config(cfg.data)
    if cfg.init_from is None:  # a pretrained tokenizer is taken as it is
        check_tokenizer_config(cfg.tokenizer)
    check_optimizer_config(cfg.optimizer)
    check_scheduler_config(cfg.scheduler)
    check_logger_config(cfg.logger)
    t = cfg.trainer
    for key in ("max_steps", "batch_size", "grad_accum_steps", "eval_every", "eval_batches", "ckpt_every", "log_every"):
        if getattr(t, key) < 1:
            raise XLabError(f"trainer.{key}={getattr(t, key)} must be >= 1")
    if t.strategy not in STRATEGIES:
        raise XLabError(f"trainer.strategy={t.strategy!r}; valid: {', '.join(STRATEGIES)}")
    if t.strategy == "fsdp" and not torch.cuda.is_available():
        raise XLabError("trainer.strategy=fsdp needs CUDA GPUs (on CPU Accelerate runs DDP); use trainer.strategy=ddp")
    if t.on_nan not in ("stop", "skip"):
        raise XLabError(f"trainer.on_nan={t.on_nan!r}; valid: stop, skip")
    if t.keep_last is not None and t.keep_last < 1:
        raise XLabError(f"trainer.keep_last={t.keep_last} must be >= 1 (or null to keep every checkpoint)")
    if t.grad_clip < 0:
        raise XLabError(f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")


STRATEGIES = ("ddp", "fsdp")


def fsdp_plugin():
    """FSDP2 through Accelerate: each transformer Block is sharded on its own, parameters regathered per forward."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"],
        reshard_after_forward=True, state_dict_type="SHARDED_STATE_DICT",
    )


class StopRequest:
    """SIGTERM (SLURM preemption, `kill`) or SIGINT (Ctrl-C) asks training to stop: the loop finishes its step,
    saves a checkpoint and returns, and `resume=auto` continues from there."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop right away
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("received %s: stopping after this step and saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_path(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint `resume` names: a path, or "auto" = <run dir>/checkpoints/last when it exists."""
    if resume is None:
        return None
    if resume == "auto":
        last = ckpt_root / "last"
        return last if last.exists() else None
    return resolve_checkpoint(resume)


def train(cfg: TrainConfig | DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured, writing metrics and checkpoints under run_dir; returns the final val metrics."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin, set_seed

    if not isinstance(cfg, TrainConfig):  # a DictConfig from Hydra: turn it into the typed dataclasses
        cfg = OmegaConf.to_object(cfg)
    init = None
    if cfg.init_from is not None:  # the pretrained model's architecture and tokenizer replace the configured ones
        from xlab.models.hf import load_init

        init = load_init(cfg.init_from)
        cfg.model, cfg.tokenizer = init.model_config, init.tokenizer
    check_config(cfg)
    if cfg.trainer.keep_freed_memory:
        keep_freed_memory()
    run_dir = Path(run_dir)
    t = cfg.trainer
    mixed_precision = resolve_precision(t.precision)
    trackers = [TRACKERS.get(name)(run_dir) for name in cfg.logger.trackers]
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # with no CUDA every rank must still join the process group on CPU
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the number of ranks
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if t.compile else None,
        fsdp_plugin=fsdp_plugin() if t.strategy == "fsdp" else None,
    )
    main = accelerator.is_main_process
    if not main:  # one voice: the other ranks only report problems
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(cfg.seed)  # same initial weights on every rank

    datamodule = XLabDataModule(cfg.data, cfg.tokenizer, cfg.paths.cache_dir,
                                tokenizer_file=init.tokenizer_file if init else None)
    with accelerator.main_process_first():  # rank 0 builds the cache, the others then find it
        datamodule.prepare()
    tokenizer = datamodule.tokenizer
    seq_len = cfg.model.max_len
    world = accelerator.num_processes
    sampler = datamodule.train_windows(seq_len, t.batch_size, cfg.seed, accelerator.process_index, world)

    tokens_per_step = t.batch_size * seq_len * t.grad_accum_steps  # per process
    model = init.model if init else MODELS.get(cfg.model.name)(vocab_size=len(tokenizer), **asdict(cfg.model))
    if main:
        log.info("model: %.2fM parameters, %.3g training FLOPs/token, vocab %d, context %d",
                 model.num_params() / 1e6, model.flops_per_token(), len(tokenizer), seq_len)
        for line in epoch_estimate(model.flops_per_token(), len(datamodule.tokens("train")),
                                   tokens_per_step * accelerator.num_processes, devices=accelerator.num_processes):
            log.info(line)
    optimizer = OPTIMIZERS.get(cfg.optimizer.name)(model, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, t.max_steps)
    register_accelerate_hooks(accelerator)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    autocast = accelerator.autocast

    ckpt_root = run_dir / "checkpoints"
    step, tokens_seen = 0, 0
    config_dict = to_container(OmegaConf.structured(cfg))
    resume_from = resume_path(cfg.resume, ckpt_root)
    resume_ids = None
    if resume_from is not None:
        state = load_training_state(accelerator, resume_from, config_dict)
        resume_ids = state.get("trackers")  # the same W&B run continues
        step, tokens_seen = state["step"], state["tokens"]
        sampler.load_state_dict(state["sampler"])
        if main:
            log.info("resumed from %s at step %d", resume_from, step)

    if trackers:
        accelerator.init_trackers(cfg.logger.project, config=flat_config(config_dict),
                                  init_kwargs=tracker_init_kwargs(cfg.logger, run_dir, resume_ids))
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    peak = peak_flops(accelerator.device, mixed_precision)
    if main:
        peak_note = f"against a {peak / 1e12:.0f} TFLOP/s peak per device" if peak else "n/a (no known peak)"
        log.info("%d process(es) on %s; global batch %d sequences x %d tokens; MFU %s", world,
                 accelerator.device.type, t.batch_size * t.grad_accum_steps * world, seq_len, peak_note)
    flops_per_token = accelerator.unwrap_model(model).flops_per_token()

    def run_eval() -> dict[str, float]:
        # eval_batches global batches (batch_size x world windows each): the same windows whatever the world size
        windows = datamodule.eval_windows("val", seq_len, t.batch_size, t.eval_batches * world)
        mine = itertools.islice(windows, accelerator.process_index, None, world)  # each rank scores its share
        result = evaluate(model, mine, accelerator.device, autocast, lambda x: accelerator.reduce(x, "sum"))
        record = {"step": step, "tokens": tokens_seen, "val/loss": result["loss"], "val/accuracy": result["accuracy"]}
        if main:
            metrics.write(record)
            log.info("step %d: val loss %.4f, val accuracy %.2f%%", step, result["loss"], result["accuracy"])
        accelerator.log({k: v for k, v in record.items() if "/" in k}, step=step)
        return result

    def checkpoint(name: str | None = None) -> Path:
        # A checksum of the weights of every rank: DDP keeps them identical, and a mismatch means a broken run.
        total = sum(p.detach().double().sum() for p in model.parameters())
        sums = accelerator.gather(total.reshape(1)).tolist()
        if main and len(set(sums)) > 1:
            log.warning("weights differ across ranks at step %d: checksums %s", step, sums)
        state = {"tokens": tokens_seen, "sampler": sampler.state_dict(), "rank_weight_checksums": sums,
                 "trackers": tracker_run_ids(accelerator)}
        return save_checkpoint(accelerator, ckpt_root, step, config_dict, datamodule.tokenizer_path, state,
                               t.keep_last, name)

    model.train()
    loss_acc = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    correct_acc = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    first_bad = torch.full((), -1, dtype=torch.long, device=accelerator.device)  # first step with a NaN/inf loss
    skipped = 0
    interval_tokens, interval_start = 0, time.perf_counter()
    bar = tqdm(total=t.max_steps, initial=step, disable=not main, desc="train", dynamic_ncols=True)
    val: dict[str, float] | None = None
    saved_step = -1
    stop = StopRequest().__enter__()
    stopped = False
    try:
        while step < t.max_steps:
            step_loss = torch.zeros((), device=accelerator.device)
            for _ in range(t.grad_accum_steps):
                x, y = sampler.next_batch()
                x, y = x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    objective, loss_sum, correct = model(x, targets=y)
                    # backward() divides by grad_accum_steps; scaling by it here makes the step's gradient the mean
                    # over all of its tokens rather than a mean of per-micro-batch means.
                    accelerator.backward(objective * (t.grad_accum_steps / tokens_per_step))
                loss_acc += loss_sum.detach()
                correct_acc += correct
                step_loss += objective.detach()
            # NaN/inf is noted on the device (no sync) and acted on at the log step, unless on_nan=skip, which must
            # decide before this update (a host sync per step, the price of skipping).
            bad = ~torch.isfinite(step_loss)
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step + 1), first_bad)
            if t.on_nan == "skip" and bool(accelerator.reduce(bad.float(), "sum").item() > 0):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                first_bad.fill_(-1)
            else:
                if t.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step * world
            interval_tokens += tokens_per_step * world
            bar.update(1)

            log_step = step % t.log_every == 0 or step == t.max_steps
            if log_step:
                # the only host syncs of the loop: totals over all ranks, once per log interval
                loss_total, correct_total = accelerator.reduce(torch.stack([loss_acc, correct_acc.double()]), "sum")
                elapsed = time.perf_counter() - interval_start
                record = {
                    "step": step, "tokens": tokens_seen,
                    "train/loss": loss_total.item() / interval_tokens,
                    "train/accuracy": 100.0 * correct_total.item() / interval_tokens,
                    "lr": scheduler.get_last_lr()[0], "tok_per_s": interval_tokens / elapsed,
                    "tok_per_s_per_device": interval_tokens / elapsed / world,
                }
                if peak:
                    record["mfu"] = mfu(flops_per_token, record["tok_per_s_per_device"], peak)
                if t.grad_clip > 0:
                    record["grad_norm"] = float(grad_norm)
                if t.on_nan == "skip":
                    record["skipped_steps"] = skipped
                bad_step = int(accelerator.reduce(first_bad.clamp(min=0), "max").item())
                if t.on_nan == "stop" and bad_step > 0:
                    path = checkpoint(name=f"nan_step_{bad_step:06d}")
                    raise XLabError(f"the loss became NaN/inf at step {bad_step}; debug checkpoint {path} "
                                    "(set trainer.on_nan=skip to drop such updates, or lower optimizer.lr)")
                if main:
                    metrics.write(record)
                    bar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tok_per_s']:.0f}")
                accelerator.log({k: v for k, v in record.items() if k not in ("step",)}, step=step)
                loss_acc.zero_()
                correct_acc.zero_()
                interval_tokens, interval_start = 0, time.perf_counter()
            pause = time.perf_counter()
            if step % t.eval_every == 0 or step == t.max_steps:
                val = run_eval()
            if step % t.ckpt_every == 0 or step == t.max_steps:
                checkpoint()
                saved_step = step
            interval_start += time.perf_counter() - pause  # tok/s measures training, not evaluation or saving
            # A stop request ends the run after this step. Ranks must agree on the step (the checkpoint is collective),
            # so with several processes they vote at log steps, where the loop synchronises anyway.
            stopped = stop.signal is not None
            if world > 1:
                vote = torch.tensor(float(stopped), device=accelerator.device)
                stopped = log_step and bool(accelerator.reduce(vote, "sum").item() > 0)
            if stopped:
                break
    finally:  # restore the signal handlers and end the bar even when training fails
        stop.__exit__()
        bar.close()
    if val is None:  # resumed at or past max_steps
        val = run_eval()
    if saved_step != step and (stopped or not (ckpt_root / "last").exists()):
        checkpoint()
    if stopped and main:
        log.warning("stopped at step %d of %d; checkpoint %s. Continue with resume=auto hydra.run.dir=%s", step,
                    t.max_steps, ckpt_root / "last", run_dir)
    accelerator.end_training()
    return {**val, "stopped_at": step} if stopped else val
