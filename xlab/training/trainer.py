"""The training loop: `Trainer(cfg, run_dir).fit()`, or `train(cfg, run_dir)` in one call.

How it is organised. Construction builds everything (Accelerator, data, model, optimizer, schedule, checkpointer)
and resumes; `fit()` logs the start-up lines (`report_start()`) and runs the loop, in one screen: `train_step()` runs
`forward_backward()` per micro-batch and then `optimizer_step()`; `due()` (a pure function of the step, the cadence
and the stop flags) says what the step is due, done in this order: evaluate, log, save. The evaluation can end the
run (early stop), so it comes first and the last interval is still logged and saved. The last step is due all
three, through the same code as the periodic steps. Each concern is a small unit of its own: `TrainState`
(state.py) holds every counter resume needs and is what a checkpoint's state.json holds; `IntervalMetrics`
(interval.py) sums a log interval on the device; `NanGuard` and `StopRequest` (guards.py) are the NaN and stop
policies; `Checkpointer` (xlab/checkpoint/write.py) writes checkpoints atomically; evaluation
(xlab/evaluation/windows.py) is shared with xlab.evaluate.

One optimizer step = grad_accum_steps micro-batches of batch_size windows per process. The loss is a sum of
token losses divided by the step's token count, so accumulation gives exactly the gradient of one big batch.
Metrics leave the device only every log_every steps, so steps queue back to back on a GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration, TorchDynamoPlugin, set_seed
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from xlab.checkpoint.layout import newest_checkpoint, resolve_checkpoint
from xlab.checkpoint.write import Checkpointer
from xlab.data.datamodule import RandomWindows, XLabDataModule
from xlab.data.sources import SPLITS, check_data_config
from xlab.data.tokenizer import check_tokenizer_config
from xlab.device import accelerate_precision, keep_freed_memory, pick_device, resolve_precision
from xlab.errors import XLabError
from xlab.evaluation.tasks.inloop import TaskScorer
from xlab.evaluation.windows import score_windows
from xlab.models import MODELS
from xlab.models.transformer import check_model_config
from xlab.schema import Precision, Switch, to_container
from xlab.training import parallel
from xlab.training.budget import TimeBudget
from xlab.training.config import OnNan, Strategy, TrainConfig, TrainerConfig
from xlab.training.ema import WeightAverage, load_trained_weights
from xlab.training.estimate import bytes_per_token, epoch_estimate, warn_many_epochs
from xlab.training.guards import NanGuard, StopRequest
from xlab.training.interval import IntervalMetrics
from xlab.training.loggers import MetricsFile, check_logger_config, flat_config, tracker_init_kwargs, tracker_run_ids
from xlab.training.mfu import mfu, peak_flops
from xlab.training.optimizers import OPTIMIZERS, check_optimizer_config, set_weight_decay
from xlab.training.resume import keys_the_checkpoint_lacks, load_training_state
from xlab.training.rundir import check_run_dir, clear_run_dir
from xlab.training.schedulers import SCHEDULERS, build_scheduler, check_scheduler_config
from xlab.training.state import TrainState

log = logging.getLogger(__name__)

__all__ = ["Trainer", "train", "check_config", "resume_path", "Due", "due"]


def check_config(cfg: TrainConfig) -> None:
    """Every check that can fail before any work is done, beyond the schema's (closed choices and number ranges,
    checked when the config's dataclasses are built: xlab/schema.py)."""
    MODELS.get(cfg.model.name)
    check_model_config(cfg.model)
    check_data_config(cfg.data)
    if cfg.init_from is None:  # a pretrained tokenizer is taken as it is
        check_tokenizer_config(cfg.tokenizer)
    check_optimizer_config(cfg.optimizer)
    check_scheduler_config(cfg.scheduler)
    check_logger_config(cfg.logger)
    parallel.check_strategy_config(cfg)
    if compile_enabled(cfg.trainer):
        import torch._dynamo  # 1.75 s of start-up: only when compiling

        if cfg.trainer.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise XLabError(f"trainer.compile_backend={cfg.trainer.compile_backend!r} is not a torch.compile backend; "
                            f"valid: {', '.join(torch._dynamo.list_backends())}")
    if cfg.overwrite and cfg.resume is not None:
        raise XLabError(f"overwrite=true starts afresh but resume={cfg.resume} continues a run; give one of them")


def compile_enabled(t: TrainerConfig) -> bool:
    """trainer.compile resolved: auto = on for CUDA (FSDP runs uncompiled: not supported yet), off on CPUs."""
    if t.compile is Switch.auto:
        return torch.cuda.is_available() and t.strategy is not Strategy.fsdp
    return t.compile is Switch.on


def resume_path(resume: str | None, ckpt_root: Path) -> Path | None:
    """The checkpoint `resume` names: a path, or "auto" = <run dir>/checkpoints/last when it exists. When `last` is
    missing or dangles (a kill between a save's rename and the link's move, a deleted checkpoint), auto takes the
    newest complete step_N; with none left it refuses, rather than start at step 0 over the run's checkpoints."""
    if resume is None:
        return None
    if resume != "auto":
        return resolve_checkpoint(resume)
    last = ckpt_root / "last"
    if last.exists():
        return last
    newest = newest_checkpoint(ckpt_root)
    if newest is None and (last.is_symlink() or any(ckpt_root.glob("step_*"))):
        why = f"last points to the missing {last.readlink()}" if last.is_symlink() else "its step_* dirs are incomplete"
        raise XLabError(f"resume=auto: no complete checkpoint to continue from in {ckpt_root} ({why}); start afresh "
                        "there with overwrite=true instead of resume, or give another hydra.run.dir")
    return newest


def as_train_config(cfg: TrainConfig | DictConfig) -> tuple[TrainConfig, Any]:
    """The typed config, and the pretrained model of `init_from` (whose architecture and tokenizer replace the
    configured ones), or None."""
    # A DictConfig from Hydra becomes the typed dataclasses; a TrainConfig built in Python gets its interpolations
    # (paths.cache_dir's ${xlab_cache_dir:}) resolved, as Hydra resolves them, and is checked the same way.
    cfg = OmegaConf.to_object(OmegaConf.structured(cfg) if isinstance(cfg, TrainConfig) else cfg)
    init = None
    if cfg.init_from is not None:
        from xlab.models.hf import load_init  # transformers: only for init_from

        init = load_init(cfg.init_from)
        cfg.model, cfg.tokenizer = init.model_config, init.tokenizer
    return cfg, init


def build_accelerator(cfg: TrainConfig, run_dir: Path, precision: Precision) -> Accelerator:
    trackers = [str(name) for name in cfg.logger.trackers]  # Accelerate's tracker names
    try:
        return _accelerator(cfg, run_dir, precision, trackers)
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e):
            raise
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        raise XLabError(f"MASTER_PORT={port} is in use on {addr}: rank 0 cannot listen there; set MASTER_PORT to a "
                        "free port (torchrun: --master-port or --rdzv-endpoint)") from None


def _accelerator(cfg: TrainConfig, run_dir: Path, precision: Precision, trackers: list[str]) -> Accelerator:
    t = cfg.trainer
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # with no CUDA every rank must still join the process group on CPU
        mixed_precision=accelerate_precision(precision),
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the number of ranks
        dynamo_plugin=TorchDynamoPlugin(backend=t.compile_backend) if compile_enabled(t) else None,
        # a rank that stops answering ends the run after this long, not after torch's 10-30 minutes
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=t.collective_timeout_s))],
    )


# Regularisation by epochs over the train split, tier by tier: (more than this many epochs, floors). Below the first
# tier dropout costs more than it buys (on pydocs at ~6-10 epochs, 4x128 at 300 s: 1.956-1.985 bits per byte with
# dropout 0.1 and weight decay 2.0 against 1.827-1.871 without); past ~20, dropout 0.2 beat 0.1 (the Rust book at
# ~22 epochs and the Vim manual at ~40); between the two, 0.1 (BENCHMARKS.md, recipes).
SMALL_DATA_TIERS = ((12.0, {"model.dropout": 0.1, "optimizer.weight_decay": 2.0}),
                    (20.0, {"model.dropout": 0.2, "optimizer.weight_decay": 2.0}))


def regularize_small_data(cfg: TrainConfig, epochs: float) -> list[str]:
    """trainer.small_data_regularization: raise dropout and weight decay to the floors of the highest of
    SMALL_DATA_TIERS whose epoch count the run exceeds; the changes made, as `key=value` strings."""
    passed = [floors for threshold, floors in SMALL_DATA_TIERS if epochs > threshold]
    if not cfg.trainer.small_data_regularization or not passed:
        return []
    changed = []
    for key, floor in passed[-1].items():
        group, name = key.split(".")
        node = getattr(cfg, group)
        if getattr(node, name) < floor:
            setattr(node, name, floor)
            changed.append(f"{key}={floor}")
    return changed


def _lookup(config: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        config = config[part]
    return config


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host batch → device. To a GPU through pinned memory, so the copy is really asynchronous (a non_blocking copy
    from pageable memory is a synchronous one)."""
    if device.type != "cuda":
        return tuple(x.to(device) for x in batch)
    return tuple(x.pin_memory().to(device, non_blocking=True) for x in batch)


@dataclass(frozen=True)
class Due:
    """What the loop does after a step, in this order: evaluate, log, save (`best`: also point checkpoints/best at
    the save; `mark_best`: only re-point it at this step's checkpoint, written already), then stop if `last`."""

    step: int
    log: bool
    eval: bool
    save: bool
    last: bool
    stopped: bool = False  # a stop request (signal, max_time_s) ends the run at this step
    saved: bool = False  # this step's checkpoint exists already (a run resumed at its end)
    best: bool = False
    mark_best: bool = False

    def after_eval(self, improved: bool, stop_early: bool, save_best: bool) -> Due:
        """The evaluation's outcome folded in: an early stop makes the step the last (so its interval is logged and
        it is saved), and a new best val loss is saved (trainer.save_best), or only marked when saved already."""
        last, best = self.last or stop_early, improved and save_best
        return replace(self, last=last, log=self.log or last, save=not self.saved and (self.save or last or best),
                       best=best and not self.saved, mark_best=best and self.saved)


def due(step: int, t: TrainerConfig, stopping: bool = False, hurry: bool = False, saved_step: int = -1) -> Due:
    """The cadence after optimizer step `step`, pure (tested without training). The last step (max_steps, or a stop
    request) is due everything a periodic step can be, so the final evaluation and checkpoint are the periodic ones;
    hurry (a second stop signal) skips the evaluation; a step saved already (resumed at the end) is not saved again."""
    last, saved = step >= t.max_steps or stopping, saved_step == step
    return Due(step, log=step % t.log_every == 0 or last, eval=(step % t.eval_every == 0 or last) and not hurry,
               save=(step % t.ckpt_every == 0 or last) and not saved, last=last, stopped=stopping, saved=saved)


class Trainer:
    """Builds a run from its config and trains it; see the module docstring for how the loop is organised."""

    # Components: built by __init__ from the config, each a unit of its own
    accelerator: Accelerator
    datamodule: XLabDataModule
    sampler: RandomWindows  # the train batches, resumable
    task_scorer: TaskScorer | None  # trainer.eval_tasks
    model: nn.Module  # prepared: DDP-wrapped and compiled, or FSDP-sharded
    optimizer: torch.optim.Optimizer
    scheduler: Any  # Accelerate's wrapper of the LambdaLR (xlab/training/schedulers.py)
    sharded: parallel.ShardedState | None  # FSDP: model and optimizer state in checkpoints
    checkpointer: Checkpointer
    metrics_file: MetricsFile
    nan_guard: NanGuard
    metrics: IntervalMetrics
    # Runtime: the run's settings and the facts derived from them, fixed once built
    cfg: TrainConfig
    t: TrainerConfig  # cfg.trainer
    config_dict: dict[str, Any]  # cfg as plain data: each checkpoint's config.yaml
    run_dir: Path
    main: bool  # rank 0: the one that logs and writes metrics.jsonl
    world: int  # processes
    device: torch.device
    precision: Precision
    compiled: bool
    fsdp: bool
    seq_len: int
    tokens_per_step: int  # per process
    train_tokens: int
    epochs: float  # over the train split, at max_steps
    byte_lengths: torch.Tensor  # UTF-8 bytes per token id: bits per byte
    flops_per_token: float
    peak: float | None  # FLOP/s of one device, for MFU
    # State: changes as the run trains
    state: TrainState  # every counter resume needs: a checkpoint's state.json
    saved_step: int  # the step of the newest checkpoint, -1 before any
    started: float  # when fit() began (trainer.max_time_s)
    report_memory: bool  # the memory line of the first step is still due
    first_step: bool  # the first step's time (compile included) is still due
    budget: TimeBudget | None  # trainer.time_budget_s: its probe, then its re-plans of max_steps

    def __init__(self, cfg: TrainConfig | DictConfig, run_dir: str | Path) -> None:
        self.cfg, init = as_train_config(cfg)
        check_config(self.cfg)
        self.t, self.run_dir = self.cfg.trainer, Path(run_dir)
        self.fsdp = self.t.strategy is Strategy.fsdp
        check_run_dir(self.run_dir, self.cfg.resume, self.cfg.overwrite)  # every rank, before any rank writes
        if self.t.keep_freed_memory:
            keep_freed_memory()
        self.precision = resolve_precision(self.t.precision, pick_device("auto"))  # the device Accelerate picks
        self.compiled = compile_enabled(self.t)
        self.accelerator = build_accelerator(self.cfg, self.run_dir, self.precision)
        self.main, self.world, self.device = (self.accelerator.is_main_process, self.accelerator.num_processes,
                                              self.accelerator.device)
        if not self.main:  # one voice: the other ranks only report problems
            logging.getLogger().setLevel(logging.WARNING)
        if self.cfg.overwrite and self.main and (removed := clear_run_dir(self.run_dir)):
            log.warning("overwrite=true: removed the previous run's %s from %s", ", ".join(removed), self.run_dir)
        set_seed(self.cfg.seed)  # same initial weights on every rank
        self._build_data(init)
        self._build_model(init)
        self.state, self.saved_step, self.started = TrainState(), -1, time.perf_counter()
        self.config_dict = to_container(OmegaConf.structured(self.cfg))
        self.sharded = parallel.ShardedState(self.accelerator, self.model, self.optimizer) if self.fsdp else None
        self.checkpointer = Checkpointer(self.accelerator, self.run_dir / "checkpoints", self.config_dict,
                                         self.datamodule.tokenizer_path, self.t.keep_last, self.sharded)
        self.report_memory = self.first_step = True
        self.budget = TimeBudget(self.t.time_budget_s) if self.t.time_budget_s is not None else None
        self._resume()
        self._start_logging()

    # --- construction -------------------------------------------------------------------------------------------

    def _build_data(self, init: Any) -> None:
        self.datamodule = XLabDataModule(self.cfg.data, self.cfg.tokenizer, self.cfg.paths.cache_dir,
                                         tokenizer_file=init.tokenizer_file if init else None)
        with self.accelerator.main_process_first():  # rank 0 builds the cache, the others then find it
            self.datamodule.prepare()
        self.seq_len = self.cfg.model.max_len
        self.sampler = self.datamodule.train_windows(self.seq_len, self.t.batch_size, self.cfg.seed,
                                                     self.accelerator.process_index, self.world,
                                                     self.t.grad_accum_steps)
        self.tokens_per_step = self.t.batch_size * self.seq_len * self.t.grad_accum_steps  # per process
        self.train_tokens = len(self.datamodule.tokens("train"))
        self.datamodule.check_split("val", self.seq_len)  # now, not at the first evaluation after training
        self.task_scorer = None
        if self.t.eval_tasks:  # built now: a predict split too small for the tasks fails before training
            self.task_scorer = TaskScorer([str(t) for t in self.t.eval_tasks], self.datamodule, self.seq_len,
                                          self.t.eval_tasks_limit)
        self.epochs = self.t.max_steps * self.tokens_per_step * self.world / max(self.train_tokens, 1)
        # With a time budget the run's length is known once its probe has timed the first steps: decided then
        self.rule_after_probe = self.t.time_budget_s is not None and self.t.small_data_regularization
        if not self.rule_after_probe:
            self._report_small_data(regularize_small_data(self.cfg, self.epochs), self.epochs)
        self.byte_lengths = torch.as_tensor(self.datamodule.tokenizer.byte_lengths(), device=self.device)

    def _report_small_data(self, changed: list[str], epochs: float) -> None:
        if changed and self.main:
            log.info("small data (%.1f epochs over the train split): training with %s "
                     "(trainer.small_data_regularization=false to keep the configured values)", epochs,
                     " ".join(changed))

    def _build_model(self, init: Any) -> None:
        vocab = len(self.datamodule.tokenizer)
        model = init.model if init else MODELS.get(self.cfg.model.name)(vocab_size=vocab, **asdict(self.cfg.model))
        if self.fsdp:  # sharded before the optimizer is built: it must hold the sharded parameters
            model = parallel.shard_model(model, self.device, self.precision, self.t.fsdp_reshard_after_forward)
        optimizer = OPTIMIZERS.get(self.cfg.optimizer.name)(model, self.cfg.optimizer)
        scheduler = build_scheduler(optimizer, self.cfg.scheduler, self.t.max_steps)
        Checkpointer.register_hooks(self.accelerator)
        if self.fsdp:  # Accelerate keeps the schedule (and RNGs); model and optimizer are xlab.training.parallel's
            self.model, self.optimizer, self.scheduler = model, optimizer, self.accelerator.prepare(scheduler)
        else:
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.flops_per_token = unwrapped.flops_per_token()
        self.ema = WeightAverage(unwrapped, self.t.ema_decay) if self.t.ema_decay is not None else None
        reduce = self._sum_over_ranks if self.world > 1 else None
        self.nan_guard = NanGuard(self.t.on_nan, self.optimizer, self.device, reduce)
        self.metrics = IntervalMetrics(self.device)

    def _resume(self) -> None:
        path = resume_path(self.cfg.resume, self.checkpointer.root)
        if path is None:
            return
        self.state.load_state_dict(load_training_state(self.accelerator, path, self.config_dict, self.sharded,
                                                       self.optimizer, self.scheduler))
        if self.ema is not None:  # model.safetensors held the average; the trained weights lie beside it
            self.ema.resume(path)
        elif not self.fsdp:  # a checkpoint of an ema_decay run, resumed without averaging
            load_trained_weights(self.accelerator.unwrap_model(self.model), path)
        self.sampler.load_state_dict(self.state.sampler)
        self.saved_step = self.state.step
        if self.state.budget_steps is not None:  # the budget's schedule, as chosen before the checkpoint
            self.set_horizon(self.state.budget_steps)
            mark = self.state.budget_mark  # None in checkpoints from before re-planning: that plan stays
            self.budget = None if mark is None or self.budget is None else \
                TimeBudget(self.budget.seconds, self.state.budget_spent_s, (mark[0], mark[1]))
        if self.state.small_data is not None:  # and the small-data rule as decided then (after the configured
            self.rule_after_probe = False      # optimizer settings were put back over the checkpoint's)
            self._regularize_now(self.state.small_data)
        if self.main:
            if self.cfg.resume == "auto" and path.name != "last":
                log.warning("%s is missing or points to a missing checkpoint: resuming from the newest complete one",
                            self.checkpointer.root / "last")
            log.info("resumed from %s at step %d", path, self.state.step)
            if lacking := keys_the_checkpoint_lacks(path, self.config_dict):
                log.warning("resume: %s's config.yaml predates %d key(s), so today's defaults fill them: %s", path,
                            len(lacking), ", ".join(f"{k}={_lookup(self.config_dict, k)!r}" for k in lacking))

    def _start_logging(self) -> None:
        if self.cfg.logger.trackers:
            self.accelerator.init_trackers(
                self.cfg.logger.project, config=flat_config(self.config_dict),
                init_kwargs=tracker_init_kwargs(self.cfg.logger, self.run_dir, self.state.trackers or None))
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        if self.main and (dropped := self.metrics_file.keep_until(self.state.step)):
            log.info("dropped %d metrics.jsonl lines past step %d (this run writes them again)", dropped,
                     self.state.step)
        self.peak = peak_flops(self.device, self.precision)

    def report_start(self) -> None:
        """The start-up lines (rank 0): bytes per token of each split, model size, the epoch estimate (a warning past
        many epochs), global batch, MFU peak and compile."""
        if not self.main:
            return
        table = self.byte_lengths.cpu().numpy()
        log.info("tokenizer bytes per token: %s", ", ".join(
            f"{split} {bytes_per_token(self.datamodule.tokens(split), table):.3f}" for split in SPLITS))
        global_tokens = self.tokens_per_step * self.world
        log.info("model: %.2fM parameters, %.3g training FLOPs/token, vocab %d, context %d",
                 self.accelerator.unwrap_model(self.model).num_params() / 1e6, self.flops_per_token,
                 len(self.datamodule.tokenizer), self.seq_len)
        for line in epoch_estimate(self.flops_per_token, self.train_tokens, global_tokens, devices=self.world):
            log.info(line)
        warn_many_epochs(self.t.max_steps, global_tokens, self.train_tokens)
        peak = f"against a {self.peak / 1e12:.0f} TFLOP/s peak per device" if self.peak else "n/a (no known peak)"
        log.info("%d process(es) on %s; global batch %d sequences x %d tokens; MFU %s; precision %s%s; "
                 "torch.compile %s%s", self.world, self.device.type,
                 self.t.batch_size * self.t.grad_accum_steps * self.world, self.seq_len, peak, self.precision,
                 " (trainer.precision=auto)" if self.t.precision is Precision.auto else "",
                 "on" if self.compiled else "off",
                 f" (trainer.compile=auto on {self.device.type})" if self.t.compile is Switch.auto else "")

    # --- the loop -----------------------------------------------------------------------------------------------

    def fit(self) -> dict[str, float]:
        """Train to trainer.max_steps or a stop request; returns the last evaluation (and `stopped_at` if stopped;
        empty when a second stop signal skipped every evaluation, see guards.StopRequest)."""
        self.report_start()
        self.started, val = time.perf_counter(), {}
        bar = tqdm(total=self.t.max_steps, initial=self.state.step, disable=not self.main, desc="train",
                   dynamic_ncols=True)
        lost_rank = parallel.lost_rank_is_an_error(self.accelerator.process_index, self.world, self.checkpointer.root,
                                                   self.run_dir)
        with StopRequest() as stop, lost_rank:
            try:
                while True:
                    if self.should_train(stop):
                        self.train_step()
                        bar.update(1)
                        bar.total = self.t.max_steps  # trainer.time_budget_s may have set it
                    due = self._due(stop)
                    with self.metrics.paused():  # tok/s measures training, not evaluation, logging or saving
                        if due.log:
                            self.check_nan()  # on_nan=stop fails at the log step after a bad one, before evaluating
                        if due.eval:  # the final evaluation is a periodic one
                            val, improved = self.validate()
                            due = due.after_eval(improved, self.should_stop_early(), self.t.save_best)
                        if due.log:  # after the evaluation: a step that stops early logs its interval too
                            self.log_interval(bar)
                        if due.save:
                            self.save(best=due.best)
                        elif due.mark_best:  # saved at this step already (resumed at the end)
                            self.checkpointer.mark_best(due.step)
                    if due.last:
                        break
            finally:
                bar.close()
        if due.stopped and self.main:
            log.warning("stopped at step %d of %d; checkpoint %s. Continue with resume=auto hydra.run.dir=%s",
                        due.step, self.t.max_steps, self.checkpointer.root / "last", self.run_dir)
        self.accelerator.end_training()
        return {**val, "stopped_at": due.step} if due.stopped else val

    def should_train(self, stop: StopRequest) -> bool:
        """Another step, unless at max_steps or hurried by a second stop signal (seen at once by one process; several
        see it at the next log step's vote)."""
        return self.state.step < self.t.max_steps and not (self.world == 1 and stop.hurried())

    def _due(self, stop: StopRequest) -> Due:
        step = self.state.step
        stopping, hurry = self._stop_requested(stop, step % self.t.log_every == 0)
        return due(step, self.t, stopping, hurry, self.saved_step)

    def train_step(self) -> None:
        """One optimizer step: grad_accum_steps micro-batches, then the (NaN-guarded) update."""
        timed = self.first_step or self.budget is not None  # the budget times every step: its cost is two clock reads
        started = time.perf_counter() if timed else 0.0
        step_loss = torch.zeros((), device=self.device)
        for _ in range(self.t.grad_accum_steps):
            x, y = to_device(self.sampler.next_batch(), self.device)
            step_loss += self.forward_backward(x, y)
        dropped, grad_norm = self.optimizer_step(step_loss)
        self.metrics.end_step(dropped, grad_norm, self.tokens_per_step, self.tokens_per_step * self.world)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step * self.world
        if self.ema is not None:
            self.ema.update(self.state.step)
        if not timed:  # the hot path: no clock, no device sync
            return
        if self.device.type == "cuda" and self._sync_now():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        if self.first_step:  # the compile happens in this process's first step: its cost, once
            self.first_step = False
            if self.main:
                log.info("first step: %.2f s%s", seconds, " (torch.compile included)" if self.compiled else "")
        if self.budget is not None:
            self.observe_budget(seconds)

    def _sync_now(self) -> bool:
        """Wait for the device's queue at the first step, the probe's steps and re-plans: between those the steps'
        launch times add up to the device's (the queue it leaves is waited for at the next evaluation or re-plan)."""
        return self.first_step or self.budget is None or self.budget.probing or \
            self.state.step == self.budget.next_replan(self.t.max_steps)

    def observe_budget(self, seconds: float) -> None:
        """trainer.time_budget_s: at the end of its probe and at each re-plan, set max_steps (every rank the same: the
        slowest's). After the probe the small-data rule decides from those steps; dropout it adds changes the step's
        cost, so the rest of the budget is timed again."""
        probing = self.budget.probing
        chosen = self.budget.observe(self.state.step, seconds, self.t.max_steps)
        self.state.budget_spent_s = self.budget.spent
        if chosen is None:
            return
        if self.world > 1:
            chosen = int(self.accelerator.gather(torch.tensor([chosen], device=self.device)).min())
        if probing and self.rule_after_probe:
            self.rule_after_probe = False
            epochs = chosen * self.tokens_per_step * self.world / max(self.train_tokens, 1)
            changed = self.state.small_data = regularize_small_data(self.cfg, epochs)
            self._report_small_data(changed, epochs)
            self._regularize_now(changed)
            if any(change.startswith("model.dropout=") for change in changed):
                if self.main:
                    log.info("time budget: dropout changes the step's cost; timing the next steps for the %.0f s "
                             "left", self.budget.seconds - self.budget.spent)
                self.budget.probe_again()
                self.set_horizon(chosen, record=False)  # until the new timing ends
                return
        if self.main:
            self._report_plan(probing, chosen)
        self.state.budget_mark = list(self.budget.mark)
        self.set_horizon(chosen)

    def _report_plan(self, probing: bool, chosen: int) -> None:
        budget, step = self.budget, self.state.step
        if probing:
            log.info("time budget %.4g s: %.3f s per step over the probe's last %d steps, so max_steps=%d "
                     "(trainer.max_steps=%d set aside)", budget.seconds, budget.step_time, len(budget.times) - 1,
                     chosen, self.t.max_steps)
        elif chosen != self.t.max_steps:
            log.info("time budget: %.4g of %.4g s spent at step %d; at this pace max_steps=%d (was %d)",
                     budget.spent, budget.seconds, step, chosen, self.t.max_steps)

    def _regularize_now(self, changed: list[str]) -> None:
        """The small-data rule's `key=value` changes into the built model, optimizer and saved config."""
        if not changed:
            return
        for change in changed:
            key, value = change.split("=")
            group, name = key.split(".")
            setattr(getattr(self.cfg, group), name, float(value))
        model = self.accelerator.unwrap_model(self.model)
        model.set_dropout(self.cfg.model.dropout)
        set_weight_decay(model, self.optimizer, self.cfg.optimizer.weight_decay)
        self.config_dict = self.checkpointer.config = to_container(OmegaConf.structured(self.cfg))

    def set_horizon(self, steps: int, record: bool = True) -> None:
        """End the run, and the learning-rate schedule's decay, at `steps` (trainer.time_budget_s's choice; not
        recorded for resume while it is provisional: the steps are being timed again)."""
        self.t.max_steps = steps
        if record:
            self.state.budget_steps = steps
        schedule = getattr(self.scheduler, "scheduler", self.scheduler)  # Accelerate wraps torch's LambdaLR
        multiplier = SCHEDULERS.get(self.cfg.scheduler.name)(self.cfg.scheduler, steps)
        schedule.lr_lambdas = [multiplier] * len(schedule.lr_lambdas)
        # this step's lr under the new end
        for group, base in zip(schedule.optimizer.param_groups, schedule.base_lrs, strict=True):
            group["lr"] = base * multiplier(schedule.last_epoch)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss and gradient of one micro-batch; returns its (detached) objective."""
        with self.accelerator.accumulate(self.model):
            if self.fsdp:  # Accelerate runs a model it prepared under autocast; this one it did not prepare
                self.model.set_requires_gradient_sync(self.accelerator.sync_gradients)  # reduce at the last only
                with self.accelerator.autocast():
                    objective, loss_sum, correct = self.model(x, targets=y)
            else:
                objective, loss_sum, correct = self.model(x, targets=y)
            # backward() divides by grad_accum_steps; scaling by it here makes the step's gradient the mean over all
            # of its tokens rather than a mean of per-micro-batch means.
            self.accelerator.backward(objective * (self.t.grad_accum_steps / self.tokens_per_step))
        self.metrics.add(loss_sum, correct, self.byte_lengths[y].sum())
        return objective.detach()

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clip, update unless the step is bad (trainer.on_nan), advance the schedule; (dropped, grad norm)."""
        grad_norm = None
        if self.t.grad_clip > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.t.grad_clip)
            if self.fsdp:  # the norm of sharded gradients is a DTensor: its value is a collective
                grad_norm = parallel.full(grad_norm)
        dropped = self.nan_guard.check(self.state.step + 1, loss, grad_norm)
        self.nan_guard.step(dropped)
        if self.report_memory and self.main:  # this process's first step: every state exists now
            memory = parallel.memory_per_rank(self.model, self.optimizer)
            log.info(parallel.memory_line(memory, self.t.strategy.value, self.world))
            self.report_memory = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return dropped, grad_norm

    # --- periodic work ------------------------------------------------------------------------------------------

    def log_interval(self, bar: tqdm) -> None:
        """Write the interval's train metrics (the loop's only host sync besides evaluation and saving)."""
        if self.metrics.processed == 0:  # resumed at the end: nothing was trained since the checkpoint
            return
        interval = self.metrics.record(self._sum_over_ranks, self.world)
        self.state.skipped_steps += interval.pop("skipped")
        record = {"step": self.state.step, "tokens": self.state.tokens, **interval,
                  "lr": self.scheduler.get_last_lr()[0]}
        if self.peak:
            record["mfu"] = mfu(self.flops_per_token, record["tok_per_s_per_device"], self.peak)
        if self.t.on_nan is OnNan.skip:
            record["skipped_steps"] = self.state.skipped_steps
        self._write(record, {k: v for k, v in record.items() if k != "step"})
        if "train/loss" in record:
            bar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tok_per_s']:.0f}")

    def validate(self) -> tuple[dict[str, float], bool]:
        """Val loss, bits per byte and accuracy on the same eval_batches global batches of windows, whatever the world
        size; and whether this is the best val loss so far."""
        windows = self.datamodule.eval_windows("val", self.seq_len, self.t.batch_size, self.t.eval_batches * self.world)
        mine = itertools.islice(windows, self.accelerator.process_index, None, self.world)  # each rank its share
        with self._averaged():
            result = score_windows(self.model, mine, self.device, self.accelerator.autocast, self._sum_over_ranks,
                                   self.byte_lengths)
            tasks = {} if self.task_scorer is None else self.task_scorer.score(
                self.model, self.device, self.accelerator.autocast, self._sum_over_ranks,
                self.accelerator.process_index, self.world)
        improved = self.state.observe_val(result["loss"], result["bits_per_byte"])
        record = {"step": self.state.step, "tokens": self.state.tokens, "val/loss": result["loss"],
                  "val/bpb": result["bits_per_byte"], "val/accuracy": result["accuracy"], **tasks}
        self._write(record, {k: v for k, v in record.items() if "/" in k})
        if self.main:
            tasks = "".join(f", {k.removeprefix('tasks/')} {v:.3f}" for k, v in record.items()
                            if k.startswith("tasks/"))
            log.info("step %d: val loss %.4f, val bpb %.4f, val accuracy %.2f%%%s%s", self.state.step, result["loss"],
                     result["bits_per_byte"], result["accuracy"], tasks, " (best)" if improved else "")
        return result, improved

    def should_stop_early(self) -> bool:
        """trainer.early_stop_patience evaluations in a row without a new best val loss end the run."""
        patience = self.t.early_stop_patience
        if patience is None or self.state.evals_since_best < patience:
            return False
        if self.main:
            best = self.state.best
            log.warning("early stop at step %d: %d evaluations without a better val loss than step %d's %.4f",
                        self.state.step, patience, best.step, best.val_loss)
        return True

    def save(self, name: str | None = None, step: int | None = None, best: bool = False) -> Path:
        """A checkpoint of this step (or, named, a debug checkpoint that leaves `last` alone; `best`: also point
        checkpoints/best at it). Collective."""
        if name is None:
            self.check_nan()
        with self._averaged() as trained:  # model.safetensors: the average (trainer.ema_decay), if any
            # A checksum of the weights each rank holds: DDP keeps them identical, and a mismatch means a broken run;
            # FSDP ranks hold different shards, whose sum is the model's (the weights of model.safetensors).
            sums = self.accelerator.gather(parallel.local_weight_sum(self.model).reshape(1)).tolist()
            if self.main and not self.fsdp and len(set(sums)) > 1:
                log.warning("weights differ across ranks at step %d: checksums %s", self.state.step, sums)
            self.state.rank_weight_checksums = sums
            self.state.weight_checksum = sum(sums) if self.fsdp else sums[0]
            self.state.sampler = self.sampler.state_dict()
            self.state.trackers = tracker_run_ids(self.accelerator)
            state = self.state.state_dict() if step is None else {**self.state.state_dict(), "step": step}
            extra = (lambda tmp: self.ema.save_trained(trained, tmp)) if self.ema is not None else None
            path = self.checkpointer.save(state, name, best, extra)
        if name is None:
            self.saved_step = self.state.step
        return path

    def _averaged(self) -> contextlib.AbstractContextManager:
        """The weight average in the model while evaluating or saving (trainer.ema_decay); otherwise nothing."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext([])

    def check_nan(self) -> None:
        """on_nan=stop: after a bad step, save the last good weights as nan_step_N and fail."""
        if self.nan_guard.policy is not OnNan.stop:
            return
        bad = self.nan_guard.bad_step()
        if bad:
            path = self.save(name=f"nan_step_{bad:06d}", step=bad - 1)  # the weights are those after step bad-1
            raise XLabError(f"the loss became NaN/inf at step {bad}; debug checkpoint {path} holds the weights "
                            "before that step (set trainer.on_nan=skip to drop such updates, or lower optimizer.lr)")

    # --- helpers ------------------------------------------------------------------------------------------------

    def _sum_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(x, "sum")

    def _stop_requested(self, stop: StopRequest, log_step: bool) -> tuple[bool, bool]:
        """(stop now, hurry: a second signal, so skip the evaluation)."""
        out_of_time = self.t.max_time_s is not None and time.perf_counter() - self.started >= self.t.max_time_s
        if self.world == 1:
            return stop.requested() or out_of_time, stop.hurried()
        if not log_step:  # ranks must agree on the step to stop at (the checkpoint is collective): they vote at
            return False, False  # log steps, where the loop syncs anyway
        flags = torch.tensor([float(stop.requested() or out_of_time), float(stop.hurried())], device=self.device)
        stopping, hurry = (self._sum_over_ranks(flags) > 0).tolist()
        return stopping, hurry

    def _write(self, record: dict[str, Any], tracked: dict[str, Any]) -> None:
        if self.main:
            self.metrics_file.write(record)
        self.accelerator.log(tracked, step=self.state.step)


def train(cfg: TrainConfig | DictConfig, run_dir: str | Path) -> dict[str, float]:
    """Train as configured, writing metrics and checkpoints under run_dir; returns the final val metrics."""
    return Trainer(cfg, run_dir).fit()
