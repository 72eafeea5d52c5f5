"""The sampler config group (configs/sampler/*.yaml) and the closed choices of decoding (dtype, cache)."""

from __future__ import annotations

from dataclasses import dataclass, field

from xlab.schema import (
    AT_LEAST_1,
    MIN_DIVISOR,
    NON_NEGATIVE,
    Choice,
    Range,
    Schema,
)


class EarlyStopping(Choice):
    """Beam search stopping, transformers' semantics."""

    true = "true"  # stop when num_beams sequences are finished
    false = "false"  # stop when no open beam can beat the finished ones (a heuristic)
    never = "never"  # search until no open beam can, under the length penalty, ever beat them


class InferenceDtype(Choice):
    """What decoding computes in (xlab/generation/fast.py)."""

    auto = "auto"  # training's precision=auto rule (xlab.device.auto_precision)
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    int8 = "int8"  # weight-only int8, bf16 activations: a quarter of the bytes per token; lossy (docs/generation.md)


class CacheKind(Choice):
    auto = "auto"  # static when the step is compiled, else dynamic
    static = "static"  # preallocated buffers of fixed shape, written in place (what compiling needs)
    dynamic = "dynamic"  # grows by concatenation


@dataclass
class SamplerConfig(Schema):
    """Decoding (configs/sampler/*.yaml; xlab/generation/sampling.py). Temperature, top_k and top_p apply when sampling,
    in
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
    # line are YAML booleans, which OmegaConf refuses for an Enum field; xlab/generation/sampling.py converts it.
    early_stopping: str = "false"
    num_return_sequences: int = 1  # beam: best sequences returned per prompt (<= num_beams)

    # num_return_sequences (<= num_beams): xlab/generation/sampling.py
    LIMITS = {
        "temperature": Range(MIN_DIVISOR, also=0, note="(or 0: greedy)"), "top_k": Range(0, note="(0 = off)"),
        "top_p": Range(0, 1, lo_open=True), "repetition_penalty": Range(MIN_DIVISOR, note="(1 = off)"),
        "min_new_tokens": NON_NEGATIVE, "num_beams": AT_LEAST_1,
    }
