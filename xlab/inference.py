"""The public decoding API, as the README's "Use in your code" imports it (`from xlab import inference`); the code
lives in xlab/generation/api.py.

    out = inference.generate(model, tokenizer, ["The list", "A dict"], sampler="beam", num_beams=4)
    out[0].text, out[0].tokens, out[0].score
"""

from xlab.generation.api import Generation, generate, load_for_decoding, sample

__all__ = ["Generation", "generate", "load_for_decoding", "sample"]
