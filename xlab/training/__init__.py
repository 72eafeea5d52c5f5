"""Training: the Trainer and the components it is built from.

trainer.py (the loop as named steps), config.py (TrainConfig and the optimizer/scheduler/trainer/logger groups),
optimizers.py and schedulers.py (registries of configs/optimizer and configs/scheduler), loggers.py (metrics.jsonl,
TensorBoard, W&B: configs/logger), parallel.py (DDP/FSDP2), resume.py, rundir.py (one writer per run dir), state.py
(the resume counters), interval.py (device-side interval sums), guards.py (NaN policy, stop requests), mfu.py,
estimate.py (epoch and time estimates) and runs.py (reading finished run and sweep dirs).

Python: `from xlab.training.trainer import train` and `train(TrainConfig(...), run_dir)`.
"""
