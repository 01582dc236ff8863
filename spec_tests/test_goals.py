"""The three goals of the project, checked end to end (slow: `tox -e slow`).

1. A tiny training set is learned to near-zero loss (< 0.05 cross-entropy).
2. The trained model beats the untrained baseline of the same architecture on held-out
   examples of a translation-like task (numbers -> English words): exact match >= 0.9,
   the baseline near 0.
3. A saved model, reloaded in a fresh process, generates token by token exactly the
   tokens of the model that was saved.

``transformer demo`` checks the same three goals and prints them; its run (about two
minutes on 2 CPU cores) is shared by the tests below, which re-score its checkpoint with
their own decoding loop rather than trusting the demo's printout.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from transformer import cli
from transformer.checkpoint import load_checkpoint
from transformer.data import make_batch, make_task
from transformer.generate import greedy_decode
from transformer.model import ModelConfig
from transformer.tokenizer import Tokenizer
from transformer.training import TrainConfig, build_model, sequence_loss, train, translate

pytestmark = pytest.mark.slow
spec = functools.partial(pytest.mark.spec, section="extra")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One run of `python -m transformer demo` (the embedded default job)."""
    out = tmp_path_factory.mktemp("demo") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "transformer", "demo", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    return done, out


@spec(component="cli", kind="equivalence")
def test_demo_meets_the_three_goals_and_writes_its_plot(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """`transformer demo` exits 0, prints the three goals checked with their numbers, and writes loss.png."""
    done, out = demo
    assert done.returncode == 0, done.stdout + done.stderr
    goal_lines = [
        line.strip() for line in done.stdout.splitlines() if line.strip()[:3] in ("[x]", "[ ]")
    ]
    assert [line[:6] for line in goal_lines] == ["[x] 1.", "[x] 2.", "[x] 3."], done.stdout
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "metrics.jsonl").stat().st_size > 0


@spec(component="training", kind="equivalence")
def test_tiny_training_set_is_learned_to_near_zero_loss(tmp_path: Path) -> None:
    """32 examples, the demo's settings: the cross-entropy over the whole set, recomputed after training, is < 0.05."""
    split = make_task(cli.DEFAULT_TASK, seed=0)
    tiny = split.train[: cli.TINY_SET]
    tokenizer = Tokenizer.train(
        [t for pair in split.train for t in pair], vocab_size=cli.DEFAULT_VOCAB
    )
    config = cli.model_config(tokenizer.vocab_size, dropout=0.0)
    model = build_model(config, seed=0)
    settings = TrainConfig(
        steps=cli.TINY_STEPS,
        batch_size=cli.TINY_SET,
        warmup=cli.TINY_WARMUP,
        lr_scale=cli.TINY_LR_SCALE,
        label_smoothing=0.0,
        seed=0,
    )
    train(model, tokenizer, tiny, tmp_path, settings, progress=False)

    model.eval()
    batch = make_batch(
        [(tokenizer.encode(s), tokenizer.encode(t)) for s, t in tiny],
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
    )
    with torch.no_grad():
        loss = sequence_loss(model(batch.src, batch.tgt_in), batch.tgt_out, pad_id=tokenizer.pad_id)
    assert loss.item() < cli.TINY_GOAL


@spec(component="training", kind="equivalence")
def test_trained_model_beats_the_untrained_baseline_on_heldout_numbers(
    demo: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """The demo's checkpoint decodes >= 90% of the 1000 held-out numbers exactly; the untrained baseline about none."""
    _, out = demo
    model, meta = load_checkpoint(out / "checkpoint")
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    heldout = make_task(cli.DEFAULT_TASK, seed=0).heldout
    train_sources = {s for s, _ in make_task(cli.DEFAULT_TASK, seed=0).train}
    assert len(heldout) == 1000 and not train_sources & {s for s, _ in heldout}

    def exact_match(m: torch.nn.Module) -> float:
        m.eval()
        hits = 0
        for start in range(0, len(heldout), 250):
            chunk = heldout[start : start + 250]
            src = torch.nn.utils.rnn.pad_sequence(
                [torch.tensor(tokenizer.encode(s)) for s, _ in chunk],
                batch_first=True,
                padding_value=tokenizer.pad_id,
            )
            ids = greedy_decode(m, src, 24, tokenizer.bos_id, tokenizer.eos_id)
            hits += sum(tokenizer.decode(row) == t for row, (_, t) in zip(ids, chunk, strict=True))
        return hits / len(heldout)

    baseline = build_model(model.config, seed=0)
    trained_score, baseline_score = exact_match(model), exact_match(baseline)
    assert trained_score >= 0.9, trained_score
    assert baseline_score <= 0.01, baseline_score


_RELOAD_SCRIPT = """
import json, sys
from transformer.checkpoint import load_checkpoint
from transformer.tokenizer import Tokenizer
from transformer.training import translate
model, meta = load_checkpoint(sys.argv[1])
tokenizer = Tokenizer.from_str(meta["tokenizer"])
print(json.dumps(translate(model, tokenizer, json.loads(sys.argv[2]), max_len=24)))
"""


@spec(component="checkpoint", kind="equivalence")
def test_model_reloaded_in_a_fresh_process_generates_the_same_tokens(tmp_path: Path) -> None:
    """A model trained here, saved, and reloaded by another Python process decodes the same token ids for 60 inputs."""
    split = make_task("numbers", seed=3, n_train=2000, n_heldout=60)
    tokenizer = Tokenizer.train([t for pair in split.train for t in pair], vocab_size=200)
    config = ModelConfig.tiny(tokenizer.vocab_size, dropout=0.1, share_embeddings=True)
    model = build_model(config, seed=3)
    settings = TrainConfig(steps=150, batch_size=32, warmup=30, seed=3, checkpoint_every=1000)
    train(model, tokenizer, split.train, tmp_path, settings, progress=False)
    sources = [s for s, _ in split.heldout]
    in_memory = translate(model, tokenizer, sources, max_len=24)
    assert len({tuple(ids) for ids in in_memory}) > 1  # not a constant output: a real check

    done = subprocess.run(
        [sys.executable, "-c", _RELOAD_SCRIPT, str(tmp_path / "checkpoint"), json.dumps(sources)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert json.loads(done.stdout) == in_memory
