"""Generation: decoding a trained model.

api.py (generate, sample, load_for_decoding: what xlab.generate, xlab.serve and the lm-eval harness call),
sampling.py (token samplers and beam search: configs/sampler), fast.py (the decode plan: dtype, int8 weights, static
KV cache, the compiled one-token step), speculative.py (draft-model decoding), config.py (SamplerConfig and the
decoding choices).
"""
