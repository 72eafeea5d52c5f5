"""Models: transformer.py (XLabModel: norms, positions, attention, MLPs, Block, KV caches), loss.py (the LM head's
chunked loss), ops.py (fast CPU kernels), hf.py (transformers interop: init_from=hf:DIR and format=hf exports),
config.py (ModelConfig, the configs/model group). `model.name` picks a class of the MODELS registry.
"""

from typing import Any

__all__ = ["MODELS", "XLabModel"]


def __getattr__(name: str) -> Any:
    # `from xlab.models import XLabModel` stays the public path; resolved on first use so that reading
    # xlab.models.config (the schema) does not import torch.
    if name in __all__:
        from xlab.models import transformer  # torch: not for reading xlab.models.config

        return getattr(transformer, name)
    raise AttributeError(f"module 'xlab.models' has no attribute {name!r}")
