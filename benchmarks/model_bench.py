"""Benchmark the model on CPU: KV-cache decoding, and training throughput against torch.nn.

Standalone script (measures and reports; it never asserts time)::

    python benchmarks/model_bench.py generation [--new-tokens 256] [--repeats 3]
    python benchmarks/model_bench.py training [--steps 5] [--d-model 256] [--layers 3]
    python benchmarks/model_bench.py matvec [--repeats 5]

``generation``: a random base-size model (6+6 layers, d_model 512, 8 heads, d_ff 2048)
greedily decodes ``--new-tokens`` tokens (EOS made impossible so every run has the same
length) with ``use_cache=True`` and with ``use_cache=False`` (the whole prefix re-decoded
at every step); reports the median seconds of each, the speed-up, and whether both
produced the same tokens. Writes ``benchmarks/results/cpu-generation.json``.

``training``: tokens per second of one training step (forward, label-smoothed
cross-entropy, backward, Adam step) of ``Seq2SeqTransformer`` and of the same-size model
assembled from ``torch.nn.Transformer`` (same embeddings, sinusoids, tied output),
alternating the two so that machine load hits both alike; reports medians and the
ratio torch / ours. Writes ``benchmarks/results/cpu-training-throughput.json``.

``matvec``: one row times the weight shapes of a base-size decoder step (in -> out:
512 -> 1536, 512 -> 512, 512 -> 2048, 2048 -> 512, 512 -> 1000), each shape as enough
distinct matrices to pass 96 MiB, as much as a decoder step reads (more than the AMD
EPYC's last-level cache, so there the weights stream from memory; less than the 480 MiB
L3 the Intel Xeon reports); ``F.linear`` and the split of
:func:`transformer.matvec.linear` (taken whatever the CPU kind) are timed alternately by
``torch.utils.benchmark``; reports GB/s of weights read, the ratio, and whether the
results are bitwise equal. Writes ``benchmarks/results/cpu-matvec.json`` (the Xeon's
was renamed ``cpu-xeon-amx-matvec.json``).

Every target takes ``--out PATH`` instead of its default file, and refuses to replace an
existing file (a committed measurement of some machine) unless ``--force`` is given.

Medians over repeats; the CPU is shared, so run on an idle machine for stable numbers.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from result_file import check_out, write_record
from torch import Tensor, nn

from transformer.generate import greedy_decode
from transformer.kernel_choice import hardware_kind
from transformer.matvec import _linear
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.positional import sinusoidal_table

RESULTS = Path(__file__).resolve().parent / "results"
PAD, BOS, EOS = 0, 1, 2
#: Where each target writes when ``--out`` is not given.
DEFAULT_OUT = {
    "generation": "cpu-generation.json",
    "training": "cpu-training-throughput.json",
    "matvec": "cpu-matvec.json",
}


def _environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "hardware_kind": hardware_kind("cpu"),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- generation


def bench_generation(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, dropout=0.0)
    model = Seq2SeqTransformer.from_config(config).eval()
    with torch.no_grad():
        model.output.bias[EOS] = -1e9  # never end: every run decodes exactly new_tokens
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(3, args.vocab, (args.batch, args.src_len), generator=gen)
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    outputs: dict[str, Tensor] = {}
    for repeat in range(args.repeats):
        for name, use_cache in (("cached", True), ("uncached", False)):
            start = time.perf_counter()
            out = greedy_decode(model, src, args.new_tokens, BOS, EOS, use_cache=use_cache)
            times[name].append(time.perf_counter() - start)
            outputs[name] = out
            print(f"  repeat {repeat}: {name:<9} {times[name][-1]:8.3f} s")
    cached, uncached = statistics.median(times["cached"]), statistics.median(times["uncached"])
    return {
        "benchmark": "greedy decoding, KV cache vs full re-decoding",
        "model": config.to_dict(),
        "batch": args.batch,
        "src_len": args.src_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seconds": times,
        "median_seconds": {"cached": cached, "uncached": uncached},
        "tokens_per_s": {
            "cached": args.batch * args.new_tokens / cached,
            "uncached": args.batch * args.new_tokens / uncached,
        },
        "speedup": uncached / cached,
        "same_tokens": bool(torch.equal(outputs["cached"], outputs["uncached"])),
        "generated_shape": list(outputs["cached"].shape),
        "environment": _environment(),
    }


# --------------------------------------------------------------------------- matvec

#: (in_features, out_features) of the matrix-vector products of one decoder step.
DECODER_SHAPES = [(512, 1536), (512, 512), (512, 2048), (2048, 512), (512, 1000)]


def bench_matvec(args: argparse.Namespace) -> dict[str, Any]:
    from torch.utils import benchmark

    def split(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        # The split wherever it applies, also on a CPU kind where linear() leaves it off.
        return _linear(x, weight, bias, True)

    rows = []
    for d_in, d_out in DECODER_SHAPES:
        count = max(1, math.ceil(96 * 2**20 / (4 * d_in * d_out)))
        weights = [torch.randn(d_out, d_in) for _ in range(count)]
        biases = [torch.randn(d_out) for _ in range(count)]
        x = torch.randn(1, 1, d_in)
        env = {"x": x, "pairs": list(zip(weights, biases, strict=True)), "F": F, "split": split}
        stmts = {
            "F.linear": "for w, b in pairs: F.linear(x, w, b)",
            "split": "for w, b in pairs: split(x, w, b)",
        }
        times: dict[str, list[float]] = {name: [] for name in stmts}
        for _ in range(args.repeats):
            for name, stmt in stmts.items():
                timer = benchmark.Timer(stmt, globals=env, num_threads=torch.get_num_threads())
                times[name].append(timer.blocked_autorange(min_run_time=0.2).median / count)
        median = {name: statistics.median(t) for name, t in times.items()}
        gbs = {name: 4 * d_in * d_out / t / 1e9 for name, t in median.items()}
        ref, got = F.linear(x, weights[0], biases[0]), split(x, weights[0], biases[0])
        rows.append(
            {
                "in_features": d_in,
                "out_features": d_out,
                "matrices": count,
                "median_us": {name: t * 1e6 for name, t in median.items()},
                "gb_per_s": gbs,
                "speedup": median["F.linear"] / median["split"],
                "bitwise_equal": bool(torch.equal(ref, got)),
                "max_abs_diff": float((ref - got).abs().max()),
            }
        )
        print(
            f"  {d_in:>5} -> {d_out:<5} F.linear {gbs['F.linear']:5.1f} GB/s, "
            f"split {gbs['split']:5.1f} GB/s ({rows[-1]['speedup']:.2f}x)"
        )
    return {
        "benchmark": "one row times a weight matrix streamed from memory: F.linear vs split",
        "repeats": args.repeats,
        "rows": rows,
        "environment": _environment(),
    }


# --------------------------------------------------------------------------- training


class TorchSeq2Seq(nn.Module):
    """The same model from ``torch.nn.Transformer``: scaled embeddings, sinusoids, tied output."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.pad_id = config.pad_id
        self.scale = math.sqrt(config.d_model)
        self.src_embedding = nn.Embedding(config.src_vocab_size, config.d_model)
        self.tgt_embedding = nn.Embedding(config.tgt_vocab_size, config.d_model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.transformer = nn.Transformer(
                config.d_model,
                config.nhead,
                config.num_encoder_layers,
                config.num_decoder_layers,
                config.dim_feedforward,
                config.dropout,
                batch_first=True,
            )
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.d_model, config.tgt_vocab_size)
        self.output.weight = self.tgt_embedding.weight
        self.register_buffer(
            "pe", sinusoidal_table(config.max_len, config.d_model), persistent=False
        )

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        x = self.dropout(self.src_embedding(src) * self.scale + self.pe[: src.size(1)])
        y = self.dropout(self.tgt_embedding(tgt_in) * self.scale + self.pe[: tgt_in.size(1)])
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.size(1), dtype=torch.bool)
        h = self.transformer(
            x,
            y,
            tgt_mask=causal,
            src_key_padding_mask=src == self.pad_id,
            tgt_key_padding_mask=tgt_in == self.pad_id,
            memory_key_padding_mask=src == self.pad_id,
        )
        out: Tensor = self.output(h)
        return out


def _train_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[Tensor, ...]
) -> None:
    src, tgt_in, tgt_out = batch
    logits = model(src, tgt_in)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        tgt_out.reshape(-1),
        ignore_index=PAD,
        label_smoothing=0.1,
    )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def bench_training(args: argparse.Namespace) -> dict[str, Any]:
    config = ModelConfig(
        src_vocab_size=args.vocab,
        tgt_vocab_size=args.vocab,
        d_model=args.d_model,
        nhead=args.nhead,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        dim_feedforward=4 * args.d_model,
        dropout=0.1,
    )
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {
        "ours": Seq2SeqTransformer.from_config(config),
        "torch": TorchSeq2Seq(config),
    }
    optimizers = {
        name: torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9)
        for name, m in models.items()
    }
    gen = torch.Generator().manual_seed(1)
    src = torch.randint(3, args.vocab, (args.batch, args.seq_len), generator=gen)
    tgt = torch.randint(3, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
    # Realistic batches have ragged lengths: pad the tail of a quarter of the rows.
    src[: args.batch // 4, args.seq_len // 2 :] = PAD
    tgt[: args.batch // 4, args.seq_len // 2 :] = PAD
    tgt[:, 0] = BOS
    batch = (src, tgt[:, :-1], tgt[:, 1:])
    tokens = int((batch[2] != PAD).sum())  # target tokens trained on per step
    times: dict[str, list[float]] = {"ours": [], "torch": []}
    for m in models.values():
        m.train()
    for step in range(args.warmup + args.steps):
        for name, m in models.items():
            start = time.perf_counter()
            _train_step(m, optimizers[name], batch)
            elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[name].append(elapsed)
                print(f"  step {step - args.warmup}: {name:<5} {elapsed:7.3f} s")
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["torch"])
    return {
        "benchmark": "training step throughput (forward + loss + backward + Adam)",
        "model": config.to_dict(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "target_tokens_per_step": tokens,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "seconds": times,
        "median_seconds": {"ours": ours, "torch": theirs},
        "tokens_per_s": {"ours": tokens / ours, "torch": tokens / theirs},
        "time_ratio_ours_over_torch": ours / theirs,
        "environment": _environment(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="target", required=True)
    g = sub.add_parser("generation", help="KV-cache vs uncached greedy decoding")
    g.add_argument("--new-tokens", type=int, default=256)
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--src-len", type=int, default=32)
    g.add_argument("--vocab", type=int, default=1000)
    g.add_argument("--repeats", type=int, default=3)
    t = sub.add_parser("training", help="training throughput, ours vs torch.nn.Transformer")
    t.add_argument("--d-model", type=int, default=256)
    t.add_argument("--nhead", type=int, default=8)
    t.add_argument("--layers", type=int, default=3)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq-len", type=int, default=24)
    t.add_argument("--vocab", type=int, default=1000)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    m = sub.add_parser("matvec", help="one-row linear maps: F.linear vs the threaded split")
    m.add_argument("--repeats", type=int, default=5)
    for p in (g, t, m):
        p.add_argument("--out", type=Path, help="the JSON file to write (default: see above)")
        p.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    path: Path = args.out or RESULTS / DEFAULT_OUT[args.target]
    check_out(parser, path, force=args.force)
    if args.target == "matvec":
        record = bench_matvec(args)
    elif args.target == "generation":
        record = bench_generation(args)
        print(
            f"cached {record['median_seconds']['cached']:.3f} s, uncached "
            f"{record['median_seconds']['uncached']:.3f} s: {record['speedup']:.1f}x, "
            f"same tokens: {record['same_tokens']}"
        )
    else:
        record = bench_training(args)
        print(
            f"ours {record['tokens_per_s']['ours']:.0f} tok/s, torch "
            f"{record['tokens_per_s']['torch']:.0f} tok/s: ours takes "
            f"{record['time_ratio_ours_over_torch']:.2f}x torch's time"
        )
    write_record(path, record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
