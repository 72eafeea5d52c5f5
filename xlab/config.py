"""Structured configs (dataclasses) for every config group, registered with Hydra's ConfigStore.

`configs/train.yaml` starts its defaults list with `train_schema`, so every YAML option and command-line override is
merged into these typed dataclasses: a misspelled key or a value of the wrong type fails at start-up, before any work.
Each group's fields are documented next to the code that reads them (one hop from the YAML file).
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from omegaconf import MISSING, OmegaConf


def user_cache_dir() -> str:
    """Default tokenizer/data cache shared by runs: $XLAB_CACHE_DIR, else $XDG_CACHE_HOME/xlab, else ~/.cache/xlab."""
    if os.environ.get("XLAB_CACHE_DIR"):
        return os.environ["XLAB_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "xlab")


def launch_time(fmt: str) -> str:
    """The run's start time, formatted. Under torchrun / accelerate launch every rank of a node uses its launcher's
    start time, so all ranks resolve the same default run dir (Hydra's ${now:} differs across processes)."""
    import datetime

    stamp = datetime.datetime.now()
    if "LOCAL_RANK" in os.environ:
        try:
            import psutil

            stamp = datetime.datetime.fromtimestamp(psutil.Process(os.getppid()).create_time())
        except Exception:  # no psutil or no parent: fall back to this process's clock
            pass
    return stamp.strftime(fmt)


if not OmegaConf.has_resolver("xlab_cache_dir"):
    OmegaConf.register_new_resolver("xlab_cache_dir", user_cache_dir)
    OmegaConf.register_new_resolver("xlab_launch_time", launch_time, use_cache=True)


class Choice(str, Enum):
    """A closed choice of the schema: OmegaConf rejects any other value with the list of valid ones. Members are
    str, so `cfg.x == "name"` and f-strings read like plain strings."""

    def __str__(self) -> str:
        return self.value


class Precision(Choice):
    auto = "auto"  # bf16 where the hardware runs it fast (recent GPUs, CPUs with AMX/AVX512-BF16), else fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class NormPosition(Choice):
    pre = "pre"  # x + f(norm(x)), a final norm before the head (GPT-2, Llama)
    post = "post"  # norm(x + f(x)) (the original transformer)


class AttnImpl(Choice):
    auto = "auto"  # eager for bf16/fp16 on CPU up to 512 tokens, else sdpa (xlab/models/ops.py)
    sdpa = "sdpa"
    eager = "eager"  # matmul + softmax


class ResidualInit(Choice):
    scaled = "scaled"  # init_std / sqrt(2 * n_layer) (GPT-2)
    zero = "zero"  # every block starts as the identity
    plain = "plain"  # init_std


class Normalization(Choice):
    nfc = "nfc"
    nfkc = "nfkc"
    nfd = "nfd"
    nfkd = "nfkd"


class EarlyStopping(Choice):
    """Beam search stopping, transformers' semantics."""

    true = "true"  # stop when num_beams sequences are finished
    false = "false"  # stop when no open beam can beat the finished ones (a heuristic)
    never = "never"  # search until no open beam can, under the length penalty, ever beat them


class Strategy(Choice):
    ddp = "ddp"
    fsdp = "fsdp"  # FSDP2 (fully_shard per Block), on CPU ranks (gloo) and GPUs alike: xlab/parallel.py


class OnNan(Choice):
    stop = "stop"  # stop before the bad update, save the last good weights as nan_step_N, fail naming the step
    skip = "skip"  # drop the update, count it (skipped_steps)


class LocalTask(Choice):
    """The tasks built from a run's own predict split (xlab/tasks), which training can score in the loop."""

    xlab_continuation = "xlab_continuation"  # 4-way multiple choice: which continuation is the document's own
    xlab_cloze = "xlab_cloze"  # the passage's next word (LAMBADA-style)


class Tracker(Choice):
    """Experiment trackers, as Accelerate names them (its own tracker classes do the work)."""

    tensorboard = "tensorboard"  # <run>/tensorboard/
    wandb = "wandb"  # <run>/wandb/ offline without credentials; see xlab/loggers.py


class WandbMode(Choice):
    online = "online"
    offline = "offline"
    disabled = "disabled"


class Split(Choice):
    train = "train"
    val = "val"
    test = "test"
    predict = "predict"


class OutputFormat(Choice):
    text = "text"
    jsonl = "jsonl"  # one JSON object per sequence: prompt, text, tokens (and score for beam search)


class InferenceDtype(Choice):
    """What decoding computes in (xlab/decoding.py)."""

    auto = "auto"  # bf16 on GPUs (fp16 without bf16); fp32 on CPUs, where a one-row bf16 matmul is slower than fp32
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"  # weight-only int8, bf16 activations: a quarter of fp32's bytes read per token; lossy (README)


class Switch(Choice):
    auto = "auto"
    on = "on"
    off = "off"


class CacheKind(Choice):
    auto = "auto"  # static when the step is compiled, else dynamic
    static = "static"  # preallocated buffers of fixed shape, written in place (what compiling needs)
    dynamic = "dynamic"  # grows by concatenation


class ExportFormat(Choice):
    xlab = "xlab"  # model.safetensors + tokenizer.json + config.yaml
    hf = "hf"  # a transformers model directory


@dataclass(frozen=True)
class Range:
    """The valid values of a number field (of each element, for a list): within lo..hi, an end excluded when its
    *_open flag is set, or `also`. `note` says what edge values or null mean."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: float | None = None  # one valid value outside lo..hi (temperature 0 = greedy)
    note: str = ""

    def allows(self, value: float) -> bool:
        if value == self.also:
            return True
        above = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        below = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        return above and below

    def describe(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        else:
            text = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        return f"{text} {self.note}" if self.note else text


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


POSITIVE = Range(0, lo_open=True)
AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)
SEED = Range(0, 2**32 - 1)  # what NumPy's seeding (Accelerate's set_seed) takes
# Below this, logits / temperature (and / repetition_penalty) overflow float32 to inf and sampling breaks
MIN_DIVISOR = 1e-4


class Schema:
    """Base of the config dataclasses, and the one place where values are checked field by field, whether they come
    from YAML, the command line (OmegaConf builds the dataclasses: OmegaConf.to_object) or Python:
    - a value given as a string from Python (OmegaConf checks its own) becomes its Choice, or fails listing them;
    - every float must be finite; a number in LIMITS (field name -> Range) must be in its range (None, for an
      optional field, is always allowed).
    Checks that relate several fields or need a registry stay with the code that reads them (check_*_config)."""

    GROUPS = {"ModelConfig": "model.", "DataConfig": "data.", "TokenizerConfig": "tokenizer.",
              "LoggerConfig": "logger.", "OptimizerConfig": "optimizer.", "SchedulerConfig": "scheduler.",
              "TrainerConfig": "trainer.", "SamplerConfig": "sampler."}
    LIMITS: dict[str, Range] = {}  # a class constant, not a field: subclasses leave it unannotated

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            hint = hints[f.name]
            options = typing.get_args(hint) or (hint,)  # X | None and list[X] name X among their arguments
            choice = next((t for t in options if isinstance(t, type) and issubclass(t, Choice)), None)
            value = getattr(self, f.name)
            key = self.GROUPS.get(type(self).__name__, "") + f.name
            if value is None:
                continue
            if choice is not None:
                if typing.get_origin(hint) is list:
                    setattr(self, f.name, [_choose(choice, v, key) for v in value])
                else:
                    setattr(self, f.name, _choose(choice, value, key))
            else:
                _check_number(key, value, self.LIMITS.get(f.name))


def _choose(choice: type[Choice], value: Any, key: str) -> Choice:
    from xlab.errors import XLabError

    try:
        return choice(value)
    except ValueError:
        valid = ", ".join(c.value for c in choice)
        raise XLabError(f"{key}={value!r} is not valid; valid: {valid}") from None


def _check_number(key: str, value: Any, limits: Range | None) -> None:
    from xlab.errors import XLabError

    items = value if isinstance(value, (list, tuple)) else [value]
    numbers = [v for v in items if isinstance(v, (int, float)) and not isinstance(v, bool)]
    finite = all(math.isfinite(v) for v in numbers)
    if finite and (limits is None or all(limits.allows(v) for v in numbers)):
        return
    shown = list(value) if isinstance(value, (list, tuple)) else value
    if limits is None:
        raise XLabError(f"{key}={shown} must be finite")
    raise XLabError(f"{key}={shown} must be {'a finite number ' if not finite else ''}{limits.describe()}")


@dataclass
class ModelConfig(Schema):
    """Decoder-only transformer; see xlab/models/transformer.py. Parts are picked by registry name. The defaults are
    the default recipe, a Llama-style block (RoPE, RMSNorm, SwiGLU, no biases, untied head), which beat the GPT-2
    block at equal wall-clock in the recipe benchmark (BENCHMARKS.md); configs/model/gpt.yaml is GPT-2."""

    name: str = "transformer"
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # key/value heads (GQA); None = n_head, 1 = multi-query attention
    d_model: int = 256
    max_len: int = 256  # context length in tokens
    pos_emb: str = "rope"  # learned | rope | none
    rope_theta: float = 10000.0
    norm: str = "rmsnorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: NormPosition = NormPosition.pre
    mlp: str = "swiglu"  # gelu | swiglu | relu2
    d_ff: int | None = None  # hidden width of the MLP; None = 4*d_model (gelu, relu2), ~8/3*d_model (swiglu)
    qk_norm: bool = False  # normalise queries and keys per head before attention (and before RoPE)
    bias: bool = False  # biases in linear layers and LayerNorm
    dropout: float = 0.0  # embedding, residual and (unless attn_dropout says otherwise) attention dropout
    # attention-probability dropout; None = dropout. On a CPU it costs about twice what residual dropout does (it
    # draws B x H x T x T numbers per layer), but it regularises: at equal time on small data, residual-only dropout
    # scored worse than both together (BENCHMARKS.md)
    attn_dropout: float | None = None
    tie_embeddings: bool = False
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    z_loss: float = 0.0  # coefficient of the mean squared log-partition term added to the training loss
    init_std: float = 0.02
    residual_init: ResidualInit = ResidualInit.scaled  # init of the residual branches' output projections
    attn_impl: AttnImpl = AttnImpl.auto

    LIMITS = {
        "n_layer": AT_LEAST_1, "n_head": AT_LEAST_1, "d_model": AT_LEAST_1, "max_len": AT_LEAST_1,
        "n_kv_head": Range(1, note="(or null: n_head)"), "d_ff": Range(1, note="(or null: the MLP's default)"),
        "rope_theta": POSITIVE, "norm_eps": POSITIVE, "dropout": Range(0, 1, hi_open=True),
        "attn_dropout": Range(0, 1, hi_open=True, note="(or null: dropout)"),
        "logit_softcap": Range(0, lo_open=True, note="(or null to disable)"), "z_loss": NON_NEGATIVE,
        "init_std": POSITIVE,
    }


@dataclass
class DataConfig(Schema):
    """A document source (xlab/data/) split by document into train/val/test/predict; see configs/data/*.yaml."""

    name: str = "pydocs"
    split_fractions: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.025, 0.025])
    split_seed: int = 1234
    num_proc: int | None = None  # tokenization processes; None = 1 for small corpora, all cores for large ones
    max_documents: int | None = None  # only the first N documents of the source (partial runs); None = all
    data_files: str | None = None  # glob of local files (wikipedia: parquet shards; text_files: txt/jsonl/parquet)
    streaming: bool = False  # hub datasets: stream instead of download + convert; local files are read in place
    hub_dataset: str | None = None  # datasets.load_dataset path, e.g. wikimedia/wikipedia
    hub_config: str | None = None  # its config name, e.g. 20231101.en
    hub_split: str = "train"
    text_column: str = "text"
    title_column: str | None = None  # prepended to the text as its first line (Wikipedia's title)
    id_column: str | None = None  # a stable document id; None (text_files) = file path and row number
    shard_size_mb: float = 1024.0  # token shard files are cut at document boundaries below this size

    # split_fractions (4 fractions summing to 1): xlab/data/sources.py
    LIMITS = {"num_proc": Range(1, note="(or null)"), "max_documents": Range(1, note="(or null)"),
              "shard_size_mb": POSITIVE}


@dataclass
class TokenizerConfig(Schema):
    """A tokenizer trained on the train split; see xlab/tokenizer.py."""

    name: str = "bpe"  # bpe (byte-level) | unigram | wordpiece
    vocab_size: int = 4096
    min_frequency: int = 2  # bpe, wordpiece: merges seen fewer times are not learned
    normalization: Normalization | None = None  # unicode normalisation before tokenizing
    lowercase: bool = False
    train_docs: int | None = 100_000  # train on this many documents sampled from the train split; None = all
    sos_token: str = "<|sos|>"
    eos_token: str = "<|eos|>"
    pad_token: str = "<|pad|>"
    unk_token: str = "<|unk|>"
    extra_special_tokens: list[str] = field(default_factory=list)  # reserved ids after the four above

    # vocab_size's minimum depends on the special tokens and the model: xlab/tokenizer.py
    LIMITS = {"min_frequency": NON_NEGATIVE, "train_docs": Range(1, note="(or null for the whole train split)")}


@dataclass
class OptimizerConfig(Schema):
    """See xlab/optimizers.py."""

    name: str = "adamw"  # adamw | muon | sgd
    lr: float = 3e-3  # peak lr (for muon: of the Muon-updated hidden matrices); tuned for the default run
    # on matrices only; never on norms, biases or embeddings. 1.0 (decoupled: each step shrinks weights by lr x 1.0)
    # beat 0.1 on pydocs and 0.2 / 0.5 on the 1 MB corpus at equal wall-clock, at no cost in speed (BENCHMARKS.md)
    weight_decay: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW (also muon's AdamW part)
    eps: float = 1e-8
    momentum: float = 0.95  # muon and sgd
    nesterov: bool = True  # muon and sgd
    adam_lr: float | None = None  # muon: lr of the AdamW part (embeddings, head, norms, biases); None = lr

    # betas (two of them, in [0, 1)): xlab/optimizers.py
    LIMITS = {"lr": POSITIVE, "adam_lr": POSITIVE, "eps": POSITIVE, "weight_decay": NON_NEGATIVE,
              "momentum": Range(0, 1, hi_open=True)}


@dataclass
class SchedulerConfig(Schema):
    """See xlab/schedulers.py. Learning rate multiplier over optimizer steps."""

    # cosine | linear | constant | wsd. Linear decay to 0 beat cosine to 10% in the recipe benchmark (BENCHMARKS.md)
    name: str = "linear"
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of the peak lr
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to the floor

    LIMITS = {"warmup_steps": NON_NEGATIVE, "min_lr_ratio": FRACTION, "decay_fraction": FRACTION}


@dataclass
class SamplerConfig(Schema):
    """Decoding (configs/sampler/*.yaml; xlab/sampling.py). Temperature, top_k and top_p apply when sampling, in
    that order (transformers' order); repetition_penalty and min_new_tokens apply to every sampler."""

    name: str = "multinomial"  # greedy | multinomial | top_k | top_p | beam
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 discourages tokens already in the sequence
    min_new_tokens: int = 0  # eos is forbidden until this many tokens are generated
    stop: list[str] = field(default_factory=list)  # stop strings: the text is cut where one appears
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: scores are sum(logprobs) / length ** length_penalty
    # beam: true | false | never (EarlyStopping). A str, not the Choice, because `true`/`false` on Hydra's command
    # line are YAML booleans, which OmegaConf refuses for an Enum field; xlab/sampling.py converts it.
    early_stopping: str = "false"
    num_return_sequences: int = 1  # beam: best sequences returned per prompt (<= num_beams)

    # num_return_sequences (<= num_beams): xlab/sampling.py
    LIMITS = {
        "temperature": Range(MIN_DIVISOR, also=0, note="(or 0: greedy)"), "top_k": Range(0, note="(0 = off)"),
        "top_p": Range(0, 1, lo_open=True), "repetition_penalty": Range(MIN_DIVISOR, note="(1 = off)"),
        "min_new_tokens": NON_NEGATIVE, "num_beams": AT_LEAST_1,
    }


@dataclass
class TrainerConfig(Schema):
    """See xlab/trainer.py."""

    max_steps: int = 1000  # ~5 min on a 2-core CPU for the default on pydocs (longer where small data adds dropout)
    batch_size: int = 16  # sequences per device per micro-step
    grad_accum_steps: int = 1
    precision: Precision = Precision.auto
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    eval_every: int = 100
    eval_batches: int = 20
    ckpt_every: int = 600
    log_every: int = 25
    # torch.compile the training model (checkpoints stay free of compile prefixes). auto = on for CUDA (not under
    # FSDP), off on CPUs, where inductor ran at 0.57-1.10x eager for 4-82 s of compiling plus a recompile per
    # evaluation shape (BENCHMARKS.md); the first step's time, compile included, is logged
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
    keep_freed_memory: bool = True  # glibc keeps freed memory for reuse: ~20% faster CPU steps (xlab/runtime.py)
    on_nan: OnNan = OnNan.stop
    save_best: bool = True  # an evaluation with a new best val loss saves a checkpoint; checkpoints/best points at it
    early_stop_patience: int | None = None  # stop after this many evaluations without a new best val loss
    # A run of more than SMALL_DATA_EPOCHS (8) epochs (xlab/trainer.py) trains with model.dropout >= 0.1 and
    # optimizer.weight_decay >= 2.0, logged at start: measured to pay on small corpora (BENCHMARKS.md)
    small_data_regularization: bool = True
    max_time_s: float | None = None  # stop (evaluate, save) once fit() has run this long; the schedule still follows
                                     # max_steps. For probes and hard budgets; equal-time comparisons set max_steps
    # Local downstream tasks scored at every evaluation, logged as tasks/<task>/<metric> beside val loss
    # (xlab/tasks/inloop.py); the first eval_tasks_limit items of each, dealt across ranks
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
class PathsConfig(Schema):
    cache_dir: str = "${xlab_cache_dir:}"


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


@dataclass
class EvaluateConfig(Schema):
    ckpt: str = MISSING
    split: Split = Split.val
    batch_size: int = 8
    max_batches: int | None = None  # None = the whole split
    precision: Precision = Precision.auto
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    paths: PathsConfig = field(default_factory=PathsConfig)
    # lm-evaluation-harness tasks (xlab/harness.py): empty = the split's loss and bits per byte above. Local tasks
    # (xlab/tasks: xlab_continuation, xlab_cloze) are built from the checkpoint's predict split; lm-eval's own
    # need their data.
    # With tasks, precision auto is bf16 where the device runs it fast, else fp32 (exact log-likelihoods).
    tasks: list[str] = field(default_factory=list)
    limit: int | None = None  # documents per task; None = all
    num_fewshot: int = 0
    task_path: str | None = None  # a folder of your own lm-eval task YAMLs (e.g. over local JSON/JSONL files)

    LIMITS = {"batch_size": AT_LEAST_1, "max_batches": Range(1, note="(or null: the whole split)"),
              "limit": Range(1, note="(or null: every document)"), "num_fewshot": NON_NEGATIVE}


@dataclass
class GenerateConfig(Schema):
    ckpt: str = MISSING
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    prompt: str | None = None  # one prompt (sos is prepended)
    prompts_file: str | None = None  # or one prompt per line of a UTF-8 file
    num_samples: int = 1  # sequences per prompt (sampling; beam search uses sampler.num_return_sequences)
    max_new_tokens: int = 50
    temperature: float | None = None  # shortcut for sampler.temperature
    seed: int | None = 0
    output: OutputFormat = OutputFormat.text
    batch_size: int = 8  # prompts decoded together
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N | mps
    prompts_from: Split | None = None  # a split (predict): prompt with the first prompt_tokens of its documents
    num_prompts: int = 8
    prompt_tokens: int = 32
    out: str | None = None  # prompts_from output prefix; None = <checkpoint dir>/samples_<split>.{jsonl,md}
    dtype: InferenceDtype = InferenceDtype.auto
    compile: Switch = Switch.auto  # torch.compile the one-token step; auto = on GPUs (CUDA graphs), off on CPUs,
    # where the compile (~20-30 s) pays back only after ~10k tokens (BENCHMARKS.md)
    cache: CacheKind = CacheKind.auto
    draft: str | None = None  # speculative decoding: a smaller checkpoint with the same tokenizer (greedy, sampling)
    draft_tokens: int = 4  # tokens the draft proposes per target forward
    paths: PathsConfig = field(default_factory=PathsConfig)

    LIMITS = {
        "num_samples": AT_LEAST_1, "draft_tokens": Range(1, 16), "max_new_tokens": NON_NEGATIVE,
        "seed": Range(0, 2**32 - 1, note="(or null)"),
        "temperature": SamplerConfig.LIMITS["temperature"], "batch_size": AT_LEAST_1, "num_prompts": AT_LEAST_1,
        "prompt_tokens": AT_LEAST_1,
    }


@dataclass
class ServeConfig(Schema):
    """`python -m xlab.serve` (xlab/serve/): a playground page and an OpenAI-compatible completions API over one or
    two checkpoints, decoded as xlab.generate decodes (dtype/compile/cache: GenerateConfig's keys)."""

    ckpt: str = MISSING
    ckpt2: str | None = None  # a second checkpoint: the page shows both side by side; the API's model= picks one
    host: str = "127.0.0.1"
    port: int = 8000
    allow_remote: bool = False  # a host other than loopback serves anyone who can reach it: opt in explicitly
    device: str = "auto"
    dtype: InferenceDtype = InferenceDtype.auto
    compile: Switch = Switch.auto
    cache: CacheKind = CacheKind.auto
    batch_window_ms: float = 5.0  # how long the worker waits for more requests after the first (xlab/serve/batcher)
    batch_rejoin_ms: float = 50.0  # at most this long more while fewer rows wait than the last batch decoded
    max_batch_rows: int = 32  # rows decoded together at most
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1048576  # larger request bodies get 413

    LIMITS = {
        "port": Range(1, 65535), "batch_window_ms": Range(0, 10000), "batch_rejoin_ms": Range(0, 10000),
        "max_batch_rows": Range(1, 4096),
        "max_tokens_limit": AT_LEAST_1, "max_body_bytes": Range(1024),
    }


@dataclass
class ExportConfig(Schema):
    ckpt: str = MISSING
    out: str | None = None  # None = <checkpoint dir>-export (xlab) or <checkpoint dir>-hf (hf)
    format: ExportFormat = ExportFormat.xlab


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # here, so that importing the model does not import Hydra

    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="generate_schema", node=GenerateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="serve_schema", node=ServeConfig)


def to_container(cfg: Any) -> dict:
    """Resolved plain-dict form of a config (enums as their names), for saving and trackers."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
