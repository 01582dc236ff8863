"""Checkpoint averaging (§6.1): one model whose weights are the mean of several checkpoints'.

The paper's base models are "a single model obtained by averaging the last 5
checkpoints" (§6.1). :func:`average_checkpoints` takes checkpoints of one architecture
(``train --keep-last N`` keeps them), averages every parameter and floating-point
buffer element-wise in float64, casts the mean back to each tensor's dtype and writes a
checkpoint that :func:`~transformer.checkpoint.load_checkpoint` reads.

Imports checkpoints and the model; nothing of the loop or the CLI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.model import Seq2SeqTransformer

__all__ = ["average_checkpoints"]


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> Seq2SeqTransformer:
    """Write to ``out`` the checkpoint whose weights are the mean of those at ``paths`` (§6.1).

    Parameters and floating-point buffers are summed in float64, divided by
    ``len(paths)`` and cast back, so averaging copies of one checkpoint returns it bit
    for bit; other buffers (integer ones) are taken from the first checkpoint. The meta
    of the last checkpoint (the newest, as ``train --keep-last`` lists them) is kept
    without its training state, which no longer describes the averaged weights (but with
    the run's seed as ``init_seed``, which rebuilds its initial model), and
    ``averaged_from`` lists the inputs. Returns the averaged model (eval mode).

    Raises:
        ValueError: no paths.
        FileExistsError: ``out`` exists and ``force`` is false.
        CheckpointError: a checkpoint is missing or damaged, or its architecture or its
            tokenizer differs from the first one's (the message names the first
            mismatching checkpoint).
    """
    if not paths:
        raise ValueError("average_checkpoints: got no checkpoints to average")
    target = Path(out)
    if target.exists() and not force:
        raise FileExistsError(f"average_checkpoints: {target} already exists")
    model, meta = load_checkpoint(paths[0])
    sums: dict[str, Tensor] = {
        name: tensor.double() for name, tensor in model.state_dict().items() if _averaged(tensor)
    }
    # A scratch model of the first architecture: loading into it refuses another one.
    scratch = Seq2SeqTransformer.from_config(model.config)
    tokenizer = meta.get("tokenizer")
    for path in paths[1:]:
        _, meta = load_checkpoint(path, scratch)
        if meta.get("tokenizer") != tokenizer:
            # Same shapes, but token id i may be another token there: the embedding and
            # output rows of different tokens would be averaged together.
            raise CheckpointError(
                f"average_checkpoints: {path} has another tokenizer than {paths[0]}: its "
                "token ids mean other tokens, so averaging the weights would mix them; "
                "average checkpoints of one run"
            )
        for name, tensor in scratch.state_dict().items():
            if name in sums:
                sums[name] += tensor.double()
    state = model.state_dict()
    with torch.no_grad():
        for name, total in sums.items():
            state[name].copy_((total / len(paths)).to(state[name].dtype))
    kept = {key: value for key, value in meta.items() if key != "training"}
    kept["averaged_from"] = [str(p) for p in paths]
    seed = meta.get("training", {}).get("config", {}).get("seed")
    if seed is not None:
        kept["init_seed"] = seed  # the run's initialisation: evaluate's untrained baseline
    save_checkpoint(target, model, **kept)
    return model


def _averaged(tensor: Tensor) -> bool:
    """Parameters and float buffers are averaged; integer and bool buffers are not."""
    return tensor.is_floating_point() or tensor.is_complex()
