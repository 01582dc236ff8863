"""``TrainConfig``: how :func:`~transformer.train_loop.train` trains (§5.3, §5.4), checked early.

Imports only the autocast dtypes of :mod:`transformer.precision`, so the loop and
:mod:`transformer.resume` can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformer.precision import AUTOCAST_DTYPES

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    """How to train (§5.3, §5.4); the model's shape lives in ``ModelConfig``."""

    #: Total training steps (batches) of the run (a resumed run continues up to this step).
    steps: int = 2000
    #: Sentence pairs per batch (the paper batches ~25k tokens; we count sentences).
    batch_size: int = 64
    #: ``warmup_steps`` of the §5.3 schedule (the paper: 4000).
    warmup: int = 400
    #: Factor on the §5.3 learning rate (1.0 is the paper's formula).
    lr_scale: float = 1.0
    #: eps_ls of §5.4 (0.1 in the paper); 0 trains on plain cross-entropy.
    label_smoothing: float = 0.1
    #: Clip the global gradient norm to this value; ``None`` does not clip (the paper).
    clip_norm: float | None = 1.0
    #: Seeds the dropout RNG and the data order (the caller seeds the initial weights).
    seed: int = 0
    #: Write one line to metrics.jsonl every this many steps.
    log_every: int = 10
    #: Save DIR/checkpoint every this many steps (and always at the end).
    checkpoint_every: int = 500
    #: Stop early after this many seconds of this call (the run stays resumable).
    max_seconds: float | None = None
    #: Mixed precision: run forward and loss under ``torch.autocast`` with this dtype
    #: ("bf16", also on CPU; or "fp16", with a ``GradScaler``); ``None`` trains in float32.
    autocast: str | None = None
    #: Also keep the checkpoints of the last this many saves as
    #: DIR/checkpoints/step-XXXXXXXX/, to average them (§6.1); 0 keeps none.
    keep_last: int = 0
    #: Sum the gradients of this many batches before one optimizer step, each loss
    #: divided by the token count of all of them: the step of one batch this many times larger.
    accumulate: int = 1
    #: Build batches by padded token count (§5.1: ~25000 source and target tokens per
    #: batch) instead of ``batch_size`` sentences; ``None`` counts sentences.
    batch_tokens: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "warmup",
            "log_every",
            "checkpoint_every",
            "accumulate",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr_scale, int | float) and self.lr_scale > 0):
            raise ValueError(f"TrainConfig.lr_scale must be positive, got {self.lr_scale!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(
                f"TrainConfig.label_smoothing must be in [0, 1), got {self.label_smoothing!r}"
            )
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(
                f"TrainConfig.clip_norm must be positive or None, got {self.clip_norm!r}"
            )
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"TrainConfig.autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, "
                f"got {self.autocast!r}"
            )
        keep = self.keep_last
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"TrainConfig.keep_last must be a non-negative integer, got {keep!r}")
        tokens = self.batch_tokens
        if tokens is not None and (
            isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
        ):
            raise ValueError(
                f"TrainConfig.batch_tokens must be a positive integer or None, got {tokens!r}"
            )
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(
                f"TrainConfig.max_seconds must be positive or None, got {self.max_seconds!r}"
            )
