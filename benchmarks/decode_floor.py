"""How fast could a cached decoding step be? Greedy decoding against a check-free floor.

Standalone script (measures and reports; it never asserts time)::

    OMP_NUM_THREADS=2 python benchmarks/decode_floor.py [--repeats 3] [--out PATH] [--force]

A random base-size model (6+6 layers, d_model 512, 8 heads, d_ff 2048, EOS made
impossible) greedily decodes 256 tokens from a 32-token source three ways, in one
process, interleaved so that machine load hits all three alike:

* ``uncached``: ``greedy_decode(..., use_cache=False)``, the prefix re-decoded each step;
* ``cached``: ``greedy_decode(...)``, one position per step through the decoder layers,
  attention modules, kernel registry and KV caches of the package;
* ``floor``: the same arithmetic written out by hand for this one model and batch 1:
  the same ``transformer.matvec.linear`` products, ``F.scaled_dot_product_attention``,
  ``F.layer_norm`` and preallocated key/value buffers, but no argument checks, no
  modules, no registry, no masks. It is an instrument, not an implementation: it
  exists to show how much of a cached step is the package's own Python around the
  arithmetic. It must decode the very tokens ``greedy_decode`` does, or the script
  stops.

Reports the median seconds of each and the speed-ups ``uncached / cached`` and
``uncached / floor``. Writes ``--out`` (default ``benchmarks/results/cpu-decode-floor.json``);
an existing file there is a measurement of some machine, so the script refuses to replace
it, before measuring anything, unless ``--force`` is given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from result_file import check_out, write_record
from torch import Tensor

from transformer.bench_device import cpu_capability
from transformer.generate import greedy_decode
from transformer.kernel_choice import hardware_kind
from transformer.matvec import linear
from transformer.model import ModelConfig, Seq2SeqTransformer

RESULTS = Path(__file__).resolve().parent / "results"
BOS, EOS = 1, 2
NEW_TOKENS, SRC_LEN, VOCAB = 256, 32, 1000


def floor_decode(model: Seq2SeqTransformer, src: Tensor, steps: int) -> Tensor:
    """Greedy decoding of ``src`` ``(1, S)`` for ``steps`` tokens, hand-written: ``(1, steps)``.

    Only for this script's model: post-norm layers, ReLU, no padding, batch 1.
    """
    d = model.d_model
    with torch.inference_mode():
        memory = model.encode(src)  # (1, S, d)
        layers = model.transformer.decoder.layers
        state = []
        for layer in layers:
            cross = layer.multihead_attn
            H, D = cross.num_heads, cross.head_dim
            w, b = cross.in_proj_weight, cross.in_proj_bias
            k = F.linear(memory, w[d : 2 * d], b[d : 2 * d]).view(1, -1, H, D).transpose(1, 2)
            v = F.linear(memory, w[2 * d :], b[2 * d :]).view(1, -1, H, D).transpose(1, 2)
            keys, values = torch.empty(1, H, steps, D), torch.empty(1, H, steps, D)
            state.append((k, v, keys, values, w[:d], b[:d], H, D))
        token = torch.full((1, 1), BOS, dtype=torch.long)
        out = []
        for t in range(steps):
            x = model.embed(token, model.tgt_embedding, offset=t)  # (1, 1, d)
            for layer, (ck, cv, keys, values, wq, bq, H, D) in zip(layers, state, strict=True):
                sa, ca = layer.self_attn, layer.multihead_attn
                qkv = linear(x, sa.in_proj_weight, sa.in_proj_bias).view(1, 1, 3, H, D)
                q, k, v = qkv.unbind(2)  # (1, 1, H, D) each
                keys[:, :, t] = k[:, 0]
                values[:, :, t] = v[:, 0]
                a = F.scaled_dot_product_attention(
                    q.transpose(1, 2), keys[:, :, : t + 1], values[:, :, : t + 1]
                )
                a = linear(a.transpose(1, 2).reshape(1, 1, d), sa.out_proj.weight, sa.out_proj.bias)
                x = F.layer_norm(x + a, (d,), layer.norm1.weight, layer.norm1.bias)
                q = linear(x, wq, bq).view(1, 1, H, D).transpose(1, 2)
                a = F.scaled_dot_product_attention(q, ck, cv)
                a = linear(a.transpose(1, 2).reshape(1, 1, d), ca.out_proj.weight, ca.out_proj.bias)
                x = F.layer_norm(x + a, (d,), layer.norm2.weight, layer.norm2.bias)
                h = torch.relu(linear(x, layer.linear1.weight, layer.linear1.bias))
                h = linear(h, layer.linear2.weight, layer.linear2.bias)
                x = F.layer_norm(x + h, (d,), layer.norm3.weight, layer.norm3.bias)
            token = linear(x, model.output.weight, model.output.bias).argmax(-1)  # (1, 1)
            out.append(token)
        return torch.cat(out, dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu-decode-floor.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    check_out(parser, args.out, force=args.force)
    torch.manual_seed(0)
    config = ModelConfig(src_vocab_size=VOCAB, tgt_vocab_size=VOCAB, dropout=0.0)
    model = Seq2SeqTransformer.from_config(config).eval()
    with torch.no_grad():
        model.output.bias[EOS] = -1e9  # never end: every run decodes exactly NEW_TOKENS
    src = torch.randint(3, VOCAB, (1, SRC_LEN), generator=torch.Generator().manual_seed(1))
    runs = {
        "uncached": lambda: greedy_decode(model, src, NEW_TOKENS, BOS, EOS, use_cache=False),
        "cached": lambda: greedy_decode(model, src, NEW_TOKENS, BOS, EOS),
        "floor": lambda: floor_decode(model, src, NEW_TOKENS),
    }
    if not torch.equal(runs["floor"](), runs["cached"]()):
        raise SystemExit("the floor decodes other tokens than greedy_decode: it measures nothing")
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        # The cheap runs twice around the long one, so drifting load reaches all three.
        for name in ("cached", "floor", "uncached", "floor", "cached"):
            start = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - start)
            print(f"  repeat {repeat}: {name:<9} {seconds[name][-1]:7.3f} s", flush=True)
    median = {name: statistics.median(times) for name, times in seconds.items()}
    record: dict[str, Any] = {
        "benchmark": "greedy decoding: uncached, cached, and a check-free hand-written floor",
        "model": config.to_dict(),
        "batch": 1,
        "src_len": SRC_LEN,
        "new_tokens": NEW_TOKENS,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "speedup_cached": median["uncached"] / median["cached"],
        "speedup_floor": median["uncached"] / median["floor"],
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "hardware_kind": hardware_kind("cpu"),
            "cpu_capability": cpu_capability(),
            "python": platform.python_version(),
        },
    }
    path: Path = args.out
    write_record(path, record)
    print(
        f"median: uncached {median['uncached']:.2f} s, cached {median['cached']:.2f} s "
        f"({record['speedup_cached']:.2f}x), floor {median['floor']:.2f} s "
        f"({record['speedup_floor']:.2f}x); wrote {path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
