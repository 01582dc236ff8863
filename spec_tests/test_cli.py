"""The ``transformer`` command line (SPEC §7): train, generate, evaluate, demo, and its errors.

Most tests call ``transformer.cli.main(argv)`` in-process and read stdout/stderr with
``capsys``; two run ``python -m transformer`` in a subprocess to pin what a shell user
sees: the exit status and a stderr without a traceback.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from transformer.checkpoint import load_checkpoint
from transformer.cli import build_parser, main
from transformer.data import make_task
from transformer.generate import greedy_decode
from transformer.tokenizer import Tokenizer
from transformer.training import read_metrics

spec = functools.partial(pytest.mark.spec, component="cli", section="extra")

# A model small enough to train in about a second: the CLI's plumbing is under test here.
TINY = ["--d-model", "16", "--heads", "2", "--layers", "1", "--ff", "24", "--no-progress"]
TINY_RUN = ["--task", "copy", "--n-train", "64", "--n-heldout", "5", "--batch-size", "8", *TINY]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP contention costs seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    """The single stderr line of a failed command (and nothing on stdout)."""
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("transformer: error: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of ``transformer train`` shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY_RUN, "--steps", "12", "--warmup", "4", "--out", str(out)]) == 0
    return out


# --------------------------------------------------------------------------- happy paths


@spec(kind="shape")
def test_train_writes_checkpoint_metrics_and_plot(trained_run: Path) -> None:
    """`train --task copy --out DIR` writes DIR/checkpoint/, DIR/metrics.jsonl and DIR/loss.png (SPEC §7)."""
    assert (trained_run / "checkpoint").is_dir()
    assert [r["step"] for r in read_metrics(trained_run / "metrics.jsonl")] == [10, 12]
    assert (trained_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    _, meta = load_checkpoint(trained_run / "checkpoint")
    assert meta["data"] == {"task": "copy", "seed": 0, "n_train": 64, "n_heldout": 5}
    assert meta["training"]["config"]["warmup"] == 4


@spec(kind="equivalence")
def test_generate_prints_what_the_library_decodes_from_the_checkpoint(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`generate --checkpoint DIR TEXT...` prints one line per text: the greedy decode of the saved model."""
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(trained_run), "a b c", "j", "--max-len", "9"]) == 0
    printed = capsys.readouterr().out.splitlines()

    model, meta = load_checkpoint(trained_run / "checkpoint")
    model.eval()
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    expected = []
    for text in ("a b c", "j"):
        src = torch.tensor([tokenizer.encode(text)])
        ids = greedy_decode(model, src, 9, tokenizer.bos_id, tokenizer.eos_id)
        expected.append(tokenizer.decode(ids[0]))
    assert printed == expected


@spec(kind="shape")
def test_evaluate_reports_trained_and_untrained_baseline(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate --checkpoint DIR` scores the run's held-out split for the trained model and the baseline."""
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "5 held-out examples (task 'copy', seed 0)" in out
    rows = {line.split()[0]: line.split()[-2:] for line in out.splitlines()[2:]}
    assert set(rows) == {"trained", "untrained"}
    for exact, bleu in rows.values():
        assert 0.0 <= float(exact) <= 1.0 and 0.0 <= float(bleu) <= 100.0


@spec(kind="equivalence")
def test_resume_continues_with_the_stored_settings(tmp_path: Path) -> None:
    """`train --resume --steps N` needs no other flag: it keeps the run's settings and repeats the uninterrupted losses."""
    common = [*TINY_RUN, "--warmup", "3", "--lr-scale", "3", "--log-every", "2", "--seed", "4"]
    assert main(["train", *common, "--steps", "8", "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *common, "--steps", "5", "--out", str(tmp_path / "part")]) == 0
    resume = ["train", "--resume", "--steps", "8", "--no-progress", "--out", str(tmp_path / "part")]
    assert main(resume) == 0

    def curve(run: str) -> list[tuple[float, float]]:
        return [(r["loss"], r["lr"]) for r in read_metrics(tmp_path / run / "metrics.jsonl")]

    assert curve("part") == curve("full")


@spec(kind="equivalence")
def test_train_reads_a_tsv_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`train --data PATH.tsv` trains on the file's pairs, with a held-out share for evaluate."""
    corpus = tmp_path / "corpus.tsv"
    pairs = make_task("reverse", seed=1, n_train=40, n_heldout=0).train
    corpus.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--steps", "3", "--batch-size", "8", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    _, meta = load_checkpoint(out / "checkpoint")
    assert meta["data"]["tsv"] == str(corpus.resolve())
    assert "training on 36 examples" in capsys.readouterr().err  # 10% of 40 sources held out


@spec(kind="shape")
def test_python_dash_m_transformer_runs_the_cli() -> None:
    """`python -m transformer --help` lists the subcommands of SPEC §7 and exits 0."""
    done = subprocess.run(
        [sys.executable, "-m", "transformer", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("train", "generate", "evaluate", "demo"):
        assert command in done.stdout


@spec(kind="shape")
def test_every_subcommand_has_help() -> None:
    """Each subcommand parses --help (argparse exits 0)."""
    parser = build_parser()
    for command in ("train", "generate", "evaluate", "demo"):
        with pytest.raises(SystemExit) as info:
            parser.parse_args([command, "--help"])
        assert info.value.code == 0


# --------------------------------------------------------------------------- errors


@spec(kind="error")
@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--task", "french", "--out", "x"], "argument --task: invalid choice: 'french'"),
        (
            ["train", "--task", "copy", "--out", "x", "--steps", "0"],
            "--steps: must be a positive integer, got '0'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--steps", "ten"],
            "--steps: must be a positive integer, got 'ten'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--lr-scale", "-1"],
            "--lr-scale: must be a positive number",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--lr-scale", "nan"],
            "--lr-scale: must be a positive number",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--label-smoothing", "1.5"],
            r"--label-smoothing: must be a number in \[0, 1\)",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--clip-norm", "-2"],
            "--clip-norm: must be a non-negative number",
        ),
        (["train", "--task", "copy", "--data", "a.tsv", "--out", "x"], "not allowed with argument"),
        (["train", "--task", "copy"], "the following arguments are required: --out"),
        (["generate", "--checkpoint", "x"], "the following arguments are required: text"),
        (["fly"], "invalid choice: 'fly'"),
    ],
)
def test_bad_arguments_end_with_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad flag or value prints one 'transformer: error:' line naming it and exits 2, before any work."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert re.search(message, _one_line_error(capsys))


@spec(kind="error")
def test_missing_data_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --data` of a missing file exits 1 with one line naming the file."""
    missing = tmp_path / "nope.tsv"
    assert main(["train", "--data", str(missing), "--out", str(tmp_path / "o"), *TINY]) == 1
    line = _one_line_error(capsys)
    assert str(missing) in line and "No such file" in line


@spec(kind="error")
def test_malformed_tsv_line_is_reported_with_its_line_number(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A TSV line without exactly one tab exits 1 with one line giving the file and line number."""
    corpus = tmp_path / "bad.tsv"
    corpus.write_text("a b\tb a\nc d\td c\n\nno tab on this line\n", encoding="utf-8")
    assert main(["train", "--data", str(corpus), "--out", str(tmp_path / "o"), *TINY]) == 1
    assert "bad.tsv, line 4: expected 'source<TAB>target'" in _one_line_error(capsys)


@spec(kind="error")
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_missing_checkpoint_is_a_one_line_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """generate/evaluate of a directory that does not exist exit 1 with one line naming it."""
    argv = [command, "--checkpoint", str(tmp_path / "none")]
    assert main([*argv, "x"] if command == "generate" else argv) == 1
    assert f"no checkpoint at {tmp_path / 'none'}" in _one_line_error(capsys)


@spec(kind="error")
def test_directory_without_a_checkpoint_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing directory that holds no checkpoint exits 1 with one line, not a traceback."""
    (tmp_path / "junk.txt").write_text("not a checkpoint", encoding="utf-8")
    assert main(["generate", "--checkpoint", str(tmp_path), "a"]) == 1
    assert str(tmp_path) in _one_line_error(capsys)


@spec(kind="error")
def test_resume_with_another_architecture_is_refused(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume` with a --d-model other than the checkpoint's exits 1 naming both values."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    argv = ["train", "--resume", "--out", str(run), "--steps", "20", "--d-model", "32"]
    assert main(argv) == 1
    assert "d_model=16, but 32 was asked" in _one_line_error(capsys)


@spec(kind="error")
def test_checkpoint_with_weights_of_another_architecture_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Weights of a d_model=24 model in a d_model=16 checkpoint: exit 1, one line saying 'architecture mismatch'.

    The weights file is swapped and its manifest entry updated, so the file passes the
    integrity check and the loader's architecture check must catch it (SPEC §6).
    """
    other = tmp_path / "other"
    assert main(["train", *TINY_RUN, "--steps", "1", "--d-model", "24", "--out", str(other)]) == 0
    mixed = tmp_path / "mixed" / "checkpoint"
    _copy_tree(trained_run / "checkpoint", mixed)
    weights = (other / "checkpoint" / "model.safetensors").read_bytes()
    (mixed / "model.safetensors").write_bytes(weights)
    manifest = json.loads((mixed / "manifest.json").read_text(encoding="utf-8"))
    entry = manifest["files"]["model.safetensors"]
    entry.update(sha256=hashlib.sha256(weights).hexdigest(), size=len(weights))
    (mixed / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(mixed), "a b"]) == 1
    assert "architecture mismatch" in _one_line_error(capsys)

    (mixed / "model.safetensors").write_bytes(weights[:-7])  # and a damaged file says so
    assert main(["generate", "--checkpoint", str(mixed), "a b"]) == 1
    assert "damaged" in _one_line_error(capsys)


@spec(kind="error")
def test_errors_in_a_real_process_have_no_traceback(tmp_path: Path) -> None:
    """`python -m transformer train --data missing.tsv` exits non-zero with one stderr line and no traceback."""
    env = {**os.environ, "TRANSFORMER_DEBUG": ""}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "transformer",
            "train",
            "--data",
            str(tmp_path / "m.tsv"),
            "--out",
            "o",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("transformer: error: ")


def _copy_tree(src: Path, dst: Path) -> None:
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())


@spec(kind="error")
def test_tokenizer_of_another_vocabulary_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint whose stored tokenizer has another vocabulary size than the model (a tokenizer from another run) exits 1 with one line saying 'vocabulary mismatch' and both sizes, instead of decoding garbage or indexing out of range."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    ckpt = run / "checkpoint"
    meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
    model, _ = load_checkpoint(ckpt)
    vocab = model.config.tgt_vocab_size
    other = Tokenizer.train(["zz yy xx ww vv uu tt ss rr qq"] * 3, vocab_size=vocab + 20)
    assert other.vocab_size != vocab
    assert "tokenizer" in json.dumps(meta)
    text = json.dumps(meta).replace(json.dumps(meta["tokenizer"]), json.dumps(other.to_str()))
    (ckpt / "meta.json").write_text(text, encoding="utf-8")
    manifest = json.loads((ckpt / "manifest.json").read_text(encoding="utf-8"))
    data = (ckpt / "meta.json").read_bytes()
    manifest["files"]["meta.json"].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (ckpt / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run), "a b"]) == 1
    line = _one_line_error(capsys)
    assert "vocabulary mismatch" in line
    assert f"{other.vocab_size} tokens" in line and str(vocab) in line
