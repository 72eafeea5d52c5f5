"""Model registry: `model.name` in configs/model/*.yaml picks a class here."""

from xlab.models.transformer import XLabModel
from xlab.registry import Registry

MODELS: Registry[type] = Registry("model")
MODELS.register("transformer")(XLabModel)

__all__ = ["MODELS", "XLabModel"]
