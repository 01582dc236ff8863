"""The paper's training recipe: Adam and its schedule (§5.3), the label-smoothed loss (§5.4).

* Optimizer (§5.3): Adam with beta1 = 0.9, beta2 = 0.98, eps = 1e-9.
* Learning rate (§5.3, eq. 3):
  ``lrate = d_model^-0.5 * min(step_num^-0.5, step_num * warmup_steps^-1.5)``, a linear
  warm-up followed by inverse square-root decay; ``scale`` multiplies it (small models
  on small data like a larger rate than the paper's base model).
* Regularisation (§5.4): label smoothing eps_ls = 0.1 (dropout lives inside the model).

Imports the model only; knows nothing of the loop, the process group or the files.

Notation: B batch, T target length, V vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from transformer.model import ModelConfig, Seq2SeqTransformer

__all__ = [
    "build_model",
    "inverse_sqrt_lr",
    "make_optimizer",
    "make_scheduler",
    "sequence_loss",
]


def inverse_sqrt_lr(step: int, d_model: int, warmup: int, scale: float = 1.0) -> float:
    """Learning rate of optimizer step ``step`` (1-based), §5.3 eq. 3, times ``scale``.

    ``scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``: grows linearly for
    the first ``warmup`` steps, then decays with the inverse square root of the step.
    """
    if step < 1:
        raise ValueError(f"inverse_sqrt_lr: step is 1-based, got {step}")
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


def make_optimizer(model: nn.Module) -> torch.optim.Adam:
    """Adam with the paper's betas (0.9, 0.98) and eps 1e-9 (§5.3).

    The base lr is 1.0 so that the scheduler's factor *is* the learning rate.
    """
    return torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)


def make_scheduler(
    optimizer: torch.optim.Optimizer, d_model: int, warmup: int, scale: float = 1.0
) -> LambdaLR:
    """``LambdaLR`` giving the §5.3 rate: the k-th ``optimizer.step()`` uses ``lr(k)``.

    ``LambdaLR`` counts from 0 at construction, the paper's ``step_num`` from 1, hence
    the ``+ 1``; call ``scheduler.step()`` after each ``optimizer.step()``.
    """

    def factor(count: int) -> float:
        return inverse_sqrt_lr(count + 1, d_model, warmup, scale)

    return LambdaLR(optimizer, factor)


def sequence_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    pad_id: int,
    label_smoothing: float = 0.0,
    num_tokens: int | None = None,
) -> Tensor:
    """Mean token cross-entropy with label smoothing (§5.4), padding ignored.

    ``logits`` (B, T, V), ``targets`` (B, T). With smoothing eps the target
    distribution puts ``1 - eps + eps / V`` on the reference token and ``eps / V``
    on every other one (torch's ``label_smoothing``); positions where
    ``targets == pad_id`` contribute nothing, and the mean is over the other tokens.
    With ``num_tokens`` the sum is divided by it instead: a data-parallel shard divides
    by the global batch's token count, so the shards' losses add up to the batch mean.
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(
            f"sequence_loss: expected logits (B, T, V) and targets (B, T), got "
            f"{tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    flat_logits = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    if num_tokens is None:
        return F.cross_entropy(
            flat_logits, flat_targets, ignore_index=pad_id, label_smoothing=label_smoothing
        )
    if num_tokens < 1:
        raise ValueError(f"sequence_loss: num_tokens must be at least 1, got {num_tokens}")
    total = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=pad_id,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / num_tokens


def build_model(config: ModelConfig, seed: int) -> Seq2SeqTransformer:
    """A freshly initialised model of ``config``; the weights depend only on ``seed``.

    With the training seed this is exactly the model before its first step: the
    untrained baseline of the same architecture.
    """
    devices_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Seq2SeqTransformer.from_config(config)
    finally:
        # Building a baseline must not shift the caller's random stream.
        torch.random.set_rng_state(devices_state)
