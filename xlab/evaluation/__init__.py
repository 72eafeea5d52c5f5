"""Evaluation: scoring a model on held-out data.

windows.py (loss, accuracy and bits per byte over a split's fixed windows: training's periodic evaluation and
`xlab.evaluate` share it), harness.py (lm-evaluation-harness on a checkpoint, imported only for tasks=), tasks/
(downstream tasks built from a run's own predict split, scored by lm-eval or in the training loop).
"""
