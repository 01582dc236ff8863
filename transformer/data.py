"""Data for the sequence-to-sequence model: built-in tasks, TSV corpora, bucketed batches.

One import for the data pipeline; each concern lives in its own module:

* :mod:`transformer.words`: numbers and dates written as English words;
* :mod:`transformer.tasks`: the built-in toy tasks (``copy``, ``reverse``, ``sort``,
  ``numbers``, ``dates``);
* :mod:`transformer.task_splits`: their seeded train/held-out splits, stratified by length;
* :mod:`transformer.corpora`: pairs, splits and TSV corpora;
* :mod:`transformer.batching`: padded batches and the length-bucketed batch stream (§5.1).
"""

from __future__ import annotations

from transformer.batching import Batch, BucketBatcher, make_batch, pad_sequences
from transformer.corpora import Pair, Split, read_tsv, split_heldout

# Importable from here, but not part of ``__all__``; ``as`` marks them as re-exports.
from transformer.task_splits import ALWAYS_TRAINED as ALWAYS_TRAINED
from transformer.task_splits import MIN_TRAIN_SHARE as MIN_TRAIN_SHARE
from transformer.task_splits import make_task
from transformer.tasks import TASKS, Task, source_length, task_names
from transformer.words import date_to_words, number_to_words

__all__ = [
    "TASKS",
    "Batch",
    "BucketBatcher",
    "Pair",
    "Split",
    "Task",
    "date_to_words",
    "make_batch",
    "make_task",
    "number_to_words",
    "pad_sequences",
    "read_tsv",
    "source_length",
    "split_heldout",
    "task_names",
]
