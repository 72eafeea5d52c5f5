"""The training config groups (optimizer, scheduler, trainer, logger) and TrainConfig, the whole run's schema
(configs/train.yaml), which nests every group's dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field

from xlab.data.config import DataConfig, TokenizerConfig
from xlab.evaluation.tasks import LocalTask
from xlab.models.config import ModelConfig
from xlab.schema import (
    AT_LEAST_1,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    SEED,
    Choice,
    PathsConfig,
    Precision,
    Range,
    Schema,
    Switch,
)


class Strategy(Choice):
    ddp = "ddp"
    fsdp = "fsdp"  # FSDP2 (fully_shard per Block), on CPU ranks (gloo) and GPUs alike: xlab/training/parallel.py


class MuonLrScale(Choice):
    """How torch's Muon scales optimizer.lr per matrix (its adjust_lr_fn)."""

    original = "original"  # Keller Jordan's: lr x sqrt(max(1, rows/cols)); lr ~0.02
    # Moonshot's ("Muon is scalable", 2025): lr x 0.2 x sqrt(max(rows, cols)), an update as large as AdamW's, so
    # AdamW's lr and weight decay carry over (lr x weight decay shrinks the weights each step, as AdamW's does)
    match_rms_adamw = "match_rms_adamw"


class OnNan(Choice):
    stop = "stop"  # stop before the bad update, save the last good weights as nan_step_N, fail naming the step
    skip = "skip"  # drop the update, count it (skipped_steps)


class Tracker(Choice):
    """Experiment trackers, as Accelerate names them (its own tracker classes do the work)."""

    tensorboard = "tensorboard"  # <run>/tensorboard/
    wandb = "wandb"  # <run>/wandb/ offline without credentials; see xlab/loggers.py


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class OptimizerConfig(Schema):
    """See xlab/training/optimizers.py."""

    name: str = "adamw"  # adamw | muon | sgd
    lr: float = 3e-3  # peak lr (for muon: of the Muon-updated hidden matrices); tuned for the default run
    # on matrices only; never on norms, biases or embeddings. Decoupled: each step shrinks weights by lr x this.
    # Far above the usual 0.1 because it won at equal wall-clock on small and mid corpora (BENCHMARKS.md, recipes)
    weight_decay: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (also muon's AdamW part)
    eps: float = 1e-8
    momentum: float = 0.95  # muon and sgd
    nesterov: bool = True  # muon and sgd
    adam_lr: float | None = None  # muon: lr of the AdamW part (embeddings, head, norms, biases); None = lr
    muon_lr_scale: MuonLrScale = MuonLrScale.original  # muon: how lr scales per matrix
    # the token embeddings' lr = lr (muon: adam_lr) x this: 3 won at equal compute (BENCHMARKS.md, recipes)
    embed_lr_scale: float = 3.0
    head_lr_scale: float = 1.0  # the untied output head's lr = lr (muon: adam_lr) x this

    # betas (two of them, in [0, 1)): xlab/training/optimizers.py
    LIMITS = {"lr": POSITIVE, "adam_lr": POSITIVE, "eps": POSITIVE, "weight_decay": NON_NEGATIVE,
              "momentum": Range(0, 1, hi_open=True),
              "embed_lr_scale": POSITIVE, "head_lr_scale": POSITIVE}


@dataclass
class SchedulerConfig(Schema):
    """See xlab/training/schedulers.py. Learning rate multiplier over optimizer steps."""

    # cosine | linear | constant | wsd. Linear decay to 0 won the recipe benchmark (BENCHMARKS.md, recipes)
    name: str = "linear"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak lr
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to the floor

    LIMITS = {"warmup_steps": NON_NEGATIVE, "min_lr_ratio": FRACTION, "decay_fraction": FRACTION}


@dataclass
class TrainerConfig(Schema):
    """See xlab/training/trainer.py."""

    max_steps: int = 1500  # ~5 min of steps on a 2-core CPU for the default on pydocs (longer where small data adds
                           # dropout)
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum_steps: int = 1
    precision: Precision = Precision.auto
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 600
    log_every: int = 25
    # torch.compile the training model (checkpoints stay free of compile prefixes). auto = on for CUDA (not under
    # FSDP), off on CPUs, where inductor was no faster than eager after a long compile and a recompile per
    # evaluation shape (BENCHMARKS.md, trainer.compile=auto); the first step's time, compile included, is logged
    compile: Switch = Switch.auto
    compile_backend: str = "inductor"  # torch.compile's backend: inductor (fast code), aot_eager (debugging), ...
    strategy: Strategy = Strategy.ddp
    fsdp_reshard_after_forward: bool = True  # free each Block's gathered weights after its forward (less memory,
                                             # one more all-gather in backward); false keeps them (ZeRO-2 like)
    keep_last: int | None = None  # keep only the newest K step_* checkpoints; None = keep all
    # A collective (gradient reduction, a checkpoint's barrier) waiting longer than this on another rank ends the
    # run with one line naming the lost rank (a dead rank is seen at once; this bounds a hung one). Long enough for
    # rank 0 to build the data cache while the others wait, or raise it.
    collective_timeout_s: float = 600.0
    keep_freed_memory: bool = True  # glibc keeps freed memory for reuse: ~20% faster CPU steps (xlab/device.py)
    on_nan: OnNan = OnNan.stop
    save_best: bool = True  # an evaluation with a new best val loss saves a checkpoint; checkpoints/best points at it
    early_stop_patience: int | None = None  # stop after this many evaluations without a new best val loss
    # A run of many epochs over its train split trains with more dropout and weight decay (SMALL_DATA_TIERS in
    # xlab/training/trainer.py), logged at start: measured to pay on small corpora (BENCHMARKS.md, recipes)
    small_data_regularization: bool = True
    # Train for this many seconds of training steps on this machine (start-up, evaluations and checkpoints not
    # counted): max_steps is set from the step time measured over the first steps and re-planned at fractions of
    # the run, so the schedule decays at the budget's end; the plan is logged and kept in state.json, so resume
    # continues that schedule (xlab/training/budget.py). null: train max_steps steps, the reproducible default
    time_budget_s: float | None = None
    # An exponential moving average of the weights (e.g. 0.99), the model that is evaluated and saved as
    # model.safetensors (the trained weights beside it, for resume): xlab/training/ema.py. null: no averaging
    ema_decay: float | None = None
    max_time_s: float | None = None  # stop (evaluate, save) once fit() has run this long; the schedule still follows
                                     # max_steps. For probes and hard budgets; equal-time comparisons set max_steps
    # Local downstream tasks scored at every evaluation, logged as tasks/<task>/<metric> beside val loss
    # (xlab/evaluation/tasks/inloop.py); the first eval_tasks_limit items of each, dealt across ranks
    eval_tasks: list[LocalTask] = field(default_factory=list)
    eval_tasks_limit: int = 200

    LIMITS = {
        "max_steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "eval_every": AT_LEAST_1, "eval_batches": AT_LEAST_1,
        "ckpt_every": AT_LEAST_1, "log_every": AT_LEAST_1, "eval_tasks_limit": AT_LEAST_1,
        # A stop request (SIGTERM, Ctrl-C, max_time_s) is honoured between optimizer steps, so a step must stay
        # short; and one step's window starts are drawn at once (xlab/data/datamodule.py). More: raise batch_size.
        "grad_accum_steps": Range(1, 1024),
        "grad_clip": Range(0, note="(0 disables clipping)"),
        "keep_last": Range(1, note="(or null to keep every checkpoint)"),
        "early_stop_patience": Range(1, note="(or null: never stop early)"),
        "max_time_s": Range(0, lo_open=True, note="(or null: no time limit)"),
        "time_budget_s": Range(0, lo_open=True, note="(or null: train max_steps steps)"),
        "ema_decay": Range(0, 1, lo_open=True, hi_open=True, note="(or null: no weight averaging)"),
        "collective_timeout_s": POSITIVE,
    }


@dataclass
class LoggerConfig(Schema):
    """Experiment trackers besides metrics.jsonl (always written); see xlab/loggers.py. The other keys are W&B's."""

    trackers: list[Tracker] = field(default_factory=lambda: [Tracker.tensorboard])
    project: str = "xlab"
    entity: str | None = None  # W&B user or team; None = the API key's default entity
    group: str | None = None  # None = the sweep dir (<date>/<time>) for the jobs of a -m sweep, no group otherwise
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # display name; None = the run dir's last two parts (<date>/<time>, <time>/<job num>)
    mode: WandbMode | None = None  # None = $WANDB_MODE, else online iff credentials exist


@dataclass
class TrainConfig(Schema):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 1337
    resume: str | None = None  # a checkpoint path, or "auto" for <run dir>/checkpoints/last if it exists
    # false: resume without the checkpoint's RNG states (a lost or damaged random_states_<rank>.pkl); the RNGs keep
    # their seeded state, so dropout draws differ from an uninterrupted run. True refuses such a checkpoint.
    resume_rng: bool = True
    overwrite: bool = False  # a run without resume into a run dir with checkpoints: true removes them, else refused
    init_from: str | None = None  # "hf:DIR": start from a local transformers GPT-2/Llama/Qwen3 model and tokenizer

    LIMITS = {"seed": SEED}
