"""XLab: train and sample transformer language models with Hydra configs and Accelerate."""

__version__ = "0.1.0"
