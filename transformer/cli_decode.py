"""The commands that decode with a trained checkpoint: ``transformer generate`` (greedy,
beam search or sampling) and ``transformer evaluate`` (scores against the untrained
baseline), with their flags.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from transformer.cli_common import (
    CHECKPOINT_HELP,
    MAX_LEN_HELP,
    PROG,
    CLIError,
    add_data_args,
    checked_number,
    describe_data,
    load_run,
    max_len_of,
    non_negative_float,
    non_negative_int,
    positive_int,
    print_by_length,
    split_for,
)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Greedy or beam search (``translate``), or sampling when a sampling flag is given."""
    sampling = (args.temperature, args.top_k, args.top_p) != (None, None, None)
    if sampling and args.beam_size > 1:
        # Checked before the checkpoint is read: beam search does not sample.
        raise CLIError("--beam-size cannot be combined with --temperature, --top-k or --top-p")
    model, tokenizer, meta = load_run(args.checkpoint)
    max_len = max_len_of(args, meta, model.config.max_len)
    for text in args.text:  # every input before the first is decoded
        n = len(tokenizer.encode(text))
        if n > model.config.max_len:
            raise CLIError(
                f"input {text!r} is {n} tokens, more than the model's positional table of "
                f"{model.config.max_len}: shorten it"
            )
    _warn_unknown_input(tokenizer, args.text)
    if not sampling:
        from transformer.training import translate

        rows = translate(model, tokenizer, args.text, max_len=max_len, beam_size=args.beam_size)
        for row in rows:
            print(tokenizer.decode(row))
        return 0
    import torch

    from transformer.data import pad_sequences
    from transformer.sampling import sample_decode

    for text in args.text:
        # One input at a time, each with its own generator: in one batch every row's
        # draws would come from one stream, so an input's output would depend on the
        # inputs beside it in the command.
        src = pad_sequences([tokenizer.encode(text) or [tokenizer.unk_id]], tokenizer.pad_id)
        (row,) = sample_decode(
            model,
            src,
            max_len,
            tokenizer.bos_id,
            tokenizer.eos_id,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=torch.Generator().manual_seed(args.seed),
        )
        print(tokenizer.decode(row))
    return 0


def _warn_unknown_input(tokenizer: Any, texts: Sequence[str]) -> None:
    """Say on stderr which inputs the model cannot read: empty, or holding unknown tokens."""
    for text in texts:
        ids = tokenizer.encode(text)
        if not ids:
            print(f"{PROG}: warning: input {text!r} is empty to the tokenizer", file=sys.stderr)
        elif tokenizer.unk_id in ids:
            unknown = sum(i == tokenizer.unk_id for i in ids)
            print(
                f"{PROG}: warning: input {text!r} has {unknown} of {len(ids)} tokens unknown "
                "to the checkpoint's tokenizer (not seen in training); the output is a guess",
                file=sys.stderr,
            )


def add_generate_parser(subparsers: Any) -> None:
    """Register ``transformer generate`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "generate",
        help="decode texts token by token with a trained checkpoint",
        description="Print one output line per input text: greedy decoding by default, beam "
        "search with --beam-size, or sampling with --temperature/--top-k/--top-p (reproducible "
        "with --seed).",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    p.add_argument("text", nargs="+", help="source texts")
    p.add_argument("--beam-size", type=positive_int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=positive_int, default=None, help=MAX_LEN_HELP)
    p.add_argument(
        "--temperature",
        type=non_negative_float,
        default=None,
        help="sample with this temperature (1 = the model's distribution, 0 = greedy)",
    )
    p.add_argument(
        "--top-k", type=positive_int, default=None, help="sample from the K most probable tokens"
    )
    p.add_argument(
        "--top-p",
        type=checked_number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
        default=None,
        help="sample from the smallest set of tokens whose probability reaches P (nucleus)",
    )
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the sampler's generator (default %(default)s), one generator per input: "
        "the same input and seed print the same line, whatever the other inputs",
    )
    p.set_defaults(func=_cmd_generate)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from transformer.data import make_task, read_tsv
    from transformer.training import build_model, evaluate

    model, tokenizer, meta = load_run(args.checkpoint)
    data = meta.get("data", {})
    if args.data is not None:
        pairs = read_tsv(args.data)
        where = f"all {len(pairs)} pairs of {args.data}"
    elif args.task is not None and args.task != data.get("task"):
        seed = 0 if args.seed is None else args.seed
        pairs = list(make_task(args.task, seed=seed).heldout)
        where = f"{len(pairs)} held-out examples of task {args.task!r}"
    elif data:
        if args.seed is not None and args.seed != data.get("seed"):
            # Another seed splits the task otherwise: its held-out examples may be ones
            # this run trained on.
            raise CLIError(
                f"--seed {args.seed}: the run trained on {describe_data(data)}, and its "
                "held-out examples are that seed's; drop --seed"
            )
        pairs = list(split_for(data).heldout)
        where = f"{len(pairs)} held-out examples ({describe_data(data)})"
    else:
        raise CLIError("the checkpoint does not say what it was trained on; pass --task or --data")
    if not pairs:
        raise CLIError("no held-out examples to evaluate")
    if args.limit is not None and args.limit < len(pairs):
        # The header names what was scored, not what was available.
        pairs = pairs[: args.limit]
        where = f"the first {args.limit} of {where}"
    max_len = max_len_of(args, meta, model.config.max_len)
    # The baseline is the run's model before its first step: built from the run's seed
    # (an averaged checkpoint keeps it as init_seed).
    seed = int(meta.get("training", {}).get("config", {}).get("seed", meta.get("init_seed", 0)))
    baseline = build_model(model.config, seed)
    trained = evaluate(model, tokenizer, pairs, max_len=max_len, beam_size=args.beam_size)
    untrained = evaluate(baseline, tokenizer, pairs, max_len=max_len, beam_size=args.beam_size)
    if "averaged_from" in meta:
        label = f"averaged ({len(meta['averaged_from'])} checkpoints)"
    else:
        label = f"trained (step {meta.get('training', {}).get('step', '?')})"
    print(f"evaluated on {where}, beam size {args.beam_size}")
    print(f"{'model':<28}{'exact match':>12}{'BLEU':>8}")
    print(f"{label:<28}{trained.exact_match:>12.3f}{trained.bleu:>8.2f}")
    print(f"{'untrained baseline':<28}{untrained.exact_match:>12.3f}{untrained.bleu:>8.2f}")
    # BLEU on one- and two-word answers says little; exact match by length says more.
    print_by_length(trained, untrained)
    return 0


def add_evaluate_parser(subparsers: Any) -> None:
    """Register ``transformer evaluate`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "evaluate",
        help="exact match and BLEU, trained vs untrained baseline",
        description="Score held-out examples (of the run's own data unless --task/--data is "
        "given; --data scores every pair of the file) against the untrained baseline of "
        "the same architecture.",
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help=CHECKPOINT_HELP)
    add_data_args(p, required=False)
    p.add_argument(
        "--seed",
        type=non_negative_int,
        default=None,
        help="split seed for --task of another task than the run's (default 0); the run's "
        "own task is split by the run's seed",
    )
    p.add_argument("--beam-size", type=positive_int, default=1, help="1 = greedy (default)")
    p.add_argument("--max-len", type=positive_int, default=None, help=MAX_LEN_HELP)
    p.add_argument("--limit", type=positive_int, default=None, help="score the first N only")
    p.set_defaults(func=_cmd_evaluate)
