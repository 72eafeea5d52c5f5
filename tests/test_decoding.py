"""The fast decoding path (xlab/decoding.py): the static KV cache and the compiled step compute what the dynamic
cache computes — logits within 1e-5 in fp32, the same greedy and beam outputs."""

from __future__ import annotations

import pytest
import torch

from xlab import inference
from xlab.config import SamplerConfig
from xlab.decoding import DecodeOptions, cache_size
from xlab.models import XLabModel
from xlab.models.transformer import StaticKVCache
from xlab.sampling import beam_search, decode_tokens

LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2, tie_embeddings=False)
KNOBS = pytest.mark.parametrize("knobs", [{}, LLAMA], ids=["learned", "rope"])


def tiny(max_len: int = 64, **knobs) -> XLabModel:
    torch.manual_seed(0)
    return XLabModel(97, n_layer=2, n_head=4, d_model=32, max_len=max_len, **knobs).eval()


@KNOBS
def test_static_cache_chunks_equal_the_uncached_forward(knobs):
    model = tiny(**knobs)
    x = torch.randint(0, 97, (2, 20))
    cache = StaticKVCache(model, 2, 32)
    with torch.no_grad():
        full = model(x)
        parts = [model(x[:, :7], cache), model(x[:, 7:11], cache)]
        parts += [model(x[:, i:i + 1], cache) for i in range(11, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() <= 1e-5


@KNOBS
def test_static_cache_left_padded_prefill_equals_each_prompt_alone(knobs):
    model = tiny(**knobs)
    prompts = [torch.randint(4, 97, (n,)).tolist() for n in (9, 4, 6)]
    ids, mask = inference.left_pad(prompts, 2, torch.device("cpu"))
    with torch.no_grad():
        cache = StaticKVCache(model, 3, 64)
        batched = model(ids, cache, mask)
        nxt = batched[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, cache)[:, -1]
        for i, p in enumerate(prompts):
            alone = model(torch.tensor([p + [int(nxt[i])]]))[0]
            assert (batched[i, -len(p):] - alone[:-1]).abs().max() <= 1e-5
            assert (step[i] - alone[-1]).abs().max() <= 1e-5


def test_rewind_forgets_the_last_tokens():
    model = tiny(**LLAMA)
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        cache = StaticKVCache(model, 1, 32)
        model(x[:, :8], cache)
        model(torch.randint(0, 97, (1, 3)), cache)  # a rejected draft
        cache.rewind(3)
        again = model(x[:, 8:], cache)
        assert (again - model(x)[:, 8:]).abs().max() <= 1e-5


def test_cache_buckets():
    assert [cache_size(1024, n) for n in (1, 64, 65, 300, 2000)] == [64, 64, 128, 512, 1024]
    assert cache_size(48, 20) == 48


def greedy(model, ids, mask, n, decoding):
    return [s.tokens for s in decode_tokens(model, ids, mask, SamplerConfig(name="greedy"), n, [3], sampling=False,
                                            decoding=decoding)]


@KNOBS
def test_static_greedy_equals_dynamic_on_a_left_padded_batch(knobs):
    model = tiny(**knobs)
    prompts = [torch.randint(4, 97, (n,)).tolist() for n in (9, 4, 6)]
    ids, mask = inference.left_pad(prompts, 2, torch.device("cpu"))
    assert greedy(model, ids, mask, 20, DecodeOptions()) == greedy(model, ids, mask, 20, None)


def test_static_window_slides_past_max_len_like_the_dynamic_cache():
    model = tiny(max_len=16, **LLAMA)
    ids = torch.randint(4, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    assert greedy(model, ids, mask, 30, DecodeOptions()) == greedy(model, ids, mask, 30, None)


@KNOBS
def test_static_beam_search_equals_dynamic(knobs):
    model = tiny(**knobs)
    prompts = [torch.randint(4, 97, (n,)).tolist() for n in (7, 3)]
    ids, mask = inference.left_pad(prompts, 2, torch.device("cpu"))
    cfg = SamplerConfig(name="beam", num_beams=4, num_return_sequences=2)
    fast = beam_search(model, ids, mask, cfg, 12, [3], decoding=DecodeOptions())
    slow = beam_search(model, ids, mask, cfg, 12, [3])
    assert [s.tokens for s in fast] == [s.tokens for s in slow]
    assert [s.score for s in fast] == pytest.approx([s.score for s in slow], abs=1e-5)


def test_compiled_step_equals_eager():
    """torch.compile of the one-token step (inductor, C++ on a CPU): the same tokens and logits within 1e-4."""
    model = tiny(**LLAMA).requires_grad_(False)
    ids = torch.randint(4, 97, (2, 5))
    mask = torch.ones_like(ids)
    compiled = DecodeOptions(compile=True)
    with torch.inference_mode():
        got = greedy(model, ids, mask, 10, compiled)
    assert compiled.compile, "the compiled step fell back to eager"
    assert "first_step_s" in compiled.stats
    assert got == greedy(model, ids, mask, 10, DecodeOptions())
    from xlab.decoding import StaticStepper

    eager_step = StaticStepper(model, mask, 20, DecodeOptions())
    compiled_step = StaticStepper(model, mask, 20, DecodeOptions(compile=True))
    with torch.inference_mode():
        for stepper in (eager_step, compiled_step):
            stepper(ids, mask)
        seqs = torch.cat([ids, torch.randint(4, 97, (2, 1))], 1)
        assert (eager_step(seqs, mask) - compiled_step(seqs, mask)).abs().max() <= 1e-4
