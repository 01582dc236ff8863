"""Training with the paper's recipe (§5.3, §5.4) and evaluation: the public names in one place.

* :mod:`transformer.recipe` — Adam 0.9/0.98/1e-9 and the warm-up + inverse-sqrt rate
  (§5.3 eq. 3), the label-smoothed loss (§5.4), the seeded untrained model.
* :mod:`transformer.train_config` — ``TrainConfig``, the training settings and their checks.
* :mod:`transformer.train_loop` — ``train``: the step, the loop, logging and checkpoints.
* :mod:`transformer.resume` — RNG states, resuming a run, step checkpoints, stop signals.
* :mod:`transformer.precision` — autocast and the fp16 gradient scaler.
* :mod:`transformer.distributed` — the torchrun process group, DistributedDataParallel,
  batch shards.
* :mod:`transformer.run_files` — metrics.jsonl and the loss plot.
* :mod:`transformer.evaluation` — translation, exact match and BLEU.

Import from here or from those modules; the names are the same objects.
"""

from __future__ import annotations

from transformer.distributed import shard_batch, world
from transformer.evaluation import EvalResult, evaluate, translate
from transformer.recipe import (
    build_model,
    inverse_sqrt_lr,
    make_optimizer,
    make_scheduler,
    sequence_loss,
)
from transformer.run_files import plot_metrics, read_metrics
from transformer.train_loop import TrainConfig, TrainResult, restore_rng_state, rng_state, train

__all__ = [
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "inverse_sqrt_lr",
    "make_optimizer",
    "make_scheduler",
    "plot_metrics",
    "read_metrics",
    "restore_rng_state",
    "rng_state",
    "sequence_loss",
    "shard_batch",
    "train",
    "translate",
    "world",
]
