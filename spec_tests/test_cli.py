"""The ``transformer`` command line: train, average, generate, evaluate, demo, and its errors.

Most tests call ``transformer.cli.main(argv)`` in-process and read stdout/stderr with
``capsys``; two run ``python -m transformer`` in a subprocess to pin what a shell user
sees: the exit status and a stderr without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import transformer as transformer_package
from transformer import cli, cli_common, cli_config, cli_decode, cli_demo
from transformer.checkpoint import load_checkpoint, save_checkpoint
from transformer.cli import build_parser, main
from transformer.data import TASKS, make_task
from transformer.generate import greedy_decode
from transformer.tokenizer import Tokenizer
from transformer.training import build_model, evaluate, read_metrics, translate

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
    """`train --task copy --out DIR` writes DIR/checkpoint/, DIR/metrics.jsonl and DIR/loss.png."""
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
    rows = {line.split()[0]: line.split()[-2:] for line in out.splitlines()[2:4]}
    assert set(rows) == {"trained", "untrained"}
    for exact, bleu in rows.values():
        assert 0.0 <= float(exact) <= 1.0 and 0.0 <= float(bleu) <= 100.0


@spec(kind="shape")
def test_evaluate_reports_exact_match_by_input_length(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate` prints exact match per input length beside BLEU: one line per length of the held-out sources, their counts adding up to the examples scored."""
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(trained_run)]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines() if line.strip().startswith("length")]
    counts = {int(parts[1].rstrip(":")): int(parts[2]) for parts in lines}
    assert sum(counts.values()) == 5
    assert all("untrained" in " ".join(parts) for parts in lines)


@spec(kind="error")
@pytest.mark.parametrize(("text", "words"), [("", "is empty"), ("\u2603\u2603", "unknown")])
def test_generate_warns_on_input_the_tokenizer_cannot_read(
    trained_run: Path, capsys: pytest.CaptureFixture[str], text: str, words: str
) -> None:
    """`generate` still answers an empty input or one of characters never seen in training, and says so on stderr."""
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(trained_run), text]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and words in err


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
    # evaluate rebuilds the same split from the stored file name, seed and fraction.
    assert main(["evaluate", "--checkpoint", str(out)]) == 0
    assert f"4 held-out examples ({corpus.resolve()}, seed 0)" in capsys.readouterr().out


@spec(kind="error")
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_a_tsv_changed_since_training_is_refused_by_evaluate_and_resume(
    tmp_path: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run stores its TSV's SHA-256: once a line is added to the file, `evaluate` and `train --resume` exit 1 with one line saying the file changed, instead of splitting the new file, whose held-out pairs would include pairs the run trained on."""
    corpus = tmp_path / "corpus.tsv"
    pairs = make_task("reverse", seed=1, n_train=40, n_heldout=0).train
    corpus.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    out = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--steps", "2", "--batch-size", "8", *TINY]
    assert main([*argv, "--out", str(out)]) == 0
    with corpus.open("a", encoding="utf-8") as f:
        f.write("one more\terom eno\n")
    capsys.readouterr()
    again = (
        ["evaluate", "--checkpoint", str(out)]
        if command == "evaluate"
        else ["train", "--out", str(out), "--resume", "--steps", "3"]
    )
    assert main(again) == 1
    assert "has changed since the run trained on it" in _one_line_error(capsys)


@spec(kind="error")
def test_generate_refuses_an_input_longer_than_the_positional_table_before_decoding_any(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`generate` with an input of more tokens than the model's positional table exits 1 naming that input, before any line is printed (sampling decodes input by input, so a late input must not fail after earlier ones printed)."""
    model, _ = load_checkpoint(trained_run / "checkpoint")
    long_text = " ".join(["a b c d e f"] * model.config.max_len)
    for flags in ([], ["--temperature", "1.0"]):
        argv = ["generate", "--checkpoint", str(trained_run), "ab", long_text, *flags]
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        assert "input 'a b c d e f" in captured.err and "positional table" in captured.err


@spec(kind="error")
@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
def test_output_into_a_closed_pipe_stops_quietly_with_sigpipes_status(
    buffered: bool, trained_run: Path
) -> None:
    """`transformer generate ... | head -1`: when the reader of stdout has gone, the command stops without an error message (no "BrokenPipeError") and exits 141, the status of a program ended by SIGPIPE, as shell tools do, with stdout buffered (a pipe's default) or not (PYTHONUNBUFFERED)."""
    argv = ["generate", "--checkpoint", str(trained_run), *("ab" for _ in range(20))]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [sys.executable, "-m", "transformer", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the first line is written
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err
    assert err == "", err


@spec(kind="shape")
def test_python_dash_m_transformer_runs_the_cli() -> None:
    """`python -m transformer --help` lists the documented subcommands and exits 0."""
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


@spec(kind="error")
def test_main_module_exits_with_the_status_of_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformer/__main__.py, what `python -m transformer` runs, passes the command line to main and exits with its status (1 and one error line for a missing checkpoint)."""
    argv = ["transformer", "generate", "--checkpoint", str(tmp_path / "none"), "x"]
    monkeypatch.setattr(sys, "argv", argv)
    # run_path, not run_module: the pytest plugin this package ships makes pytest load the
    # package through its assertion-rewriting importer, which runpy's module mode cannot use.
    main_file = Path(transformer_package.__file__).with_name("__main__.py")
    with pytest.raises(SystemExit) as info:
        runpy.run_path(str(main_file), run_name="__main__")
    assert info.value.code == 1
    assert f"no checkpoint at {tmp_path / 'none'}" in _one_line_error(capsys)


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
        (
            ["train", "--task", "copy", "--out", "x", "--seed", "-1"],
            "--seed: must be a non-negative integer, got '-1'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--seed", "one"],
            "--seed: must be a non-negative integer, got 'one'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--lr-scale", "fast"],
            "--lr-scale: must be a positive number, got 'fast'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--clip-norm", "off"],
            "--clip-norm: must be a non-negative number, got 'off'",
        ),
        (
            ["train", "--task", "copy", "--out", "x", "--dropout", "some"],
            r"--dropout: must be a number in \[0, 1\), got 'some'",
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
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--vocab-size", "2"], "--vocab-size must be at least 5"),
        (["--batch-tokens", "60", "--batch-size", "8"], "--batch-tokens 60 and --batch-size 8"),
    ],
    ids=["vocab-too-small", "tokens-and-pairs"],
)
def test_train_refuses_flags_it_cannot_honour_naming_them_before_any_work(
    flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --vocab-size 2` (below the special tokens plus one) and `--batch-tokens` together with `--batch-size` (one would be ignored) exit 1 with one line naming the flags, before the tokenizer is trained or --out is made."""
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, *flags, "--out", str(out)]) == 1
    assert message in _one_line_error(capsys)
    assert not out.exists()


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
    integrity check and the loader's architecture check must catch it.
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


def _file_bytes(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` (relative path -> contents): to show nothing changed."""
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


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


# --------------------------------------------------------------------------- more paths


def _resave(run: Path, checkpoint: Path, **meta_changes: object) -> None:
    """Save ``run``'s model again at ``checkpoint`` with its meta changed (``None`` drops a key)."""
    model, meta = load_checkpoint(run / "checkpoint")
    meta.update(meta_changes)
    save_checkpoint(checkpoint, model, **{k: v for k, v in meta.items() if v is not None})


@spec(kind="equivalence")
def test_clip_norm_zero_trains_without_clipping_and_zero_fractions_reach_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--clip-norm 0` trains without ever clipping (stored as clip_norm None), and `--label-smoothing 0 --dropout 0` reach the stored training and model configs."""

    def no_clipping(*args: object, **kwargs: object) -> None:
        raise AssertionError("--clip-norm 0 still clipped the gradients")

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", no_clipping)
    out = tmp_path / "run"
    flags = ["--clip-norm", "0", "--label-smoothing", "0", "--dropout", "0"]
    assert main(["train", *TINY_RUN, "--steps", "2", *flags, "--out", str(out)]) == 0
    model, meta = load_checkpoint(out / "checkpoint")
    config = meta["training"]["config"]
    assert (config["clip_norm"], config["label_smoothing"]) == (None, 0.0)
    assert model.config.dropout == 0.0


@spec(kind="equivalence")
def test_evaluate_on_a_file_or_another_task_prints_the_library_scores_of_the_first_n(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate --data FILE --limit N` scores the file's first N pairs exactly as the library's evaluate does (trained and untrained baseline), and `--task` scores another task's held-out split, the header saying which examples were scored."""
    pairs = list(make_task("copy", seed=5, n_train=1, n_heldout=3).heldout)
    corpus = tmp_path / "pairs.tsv"
    corpus.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(trained_run), "--max-len", "9", "--limit", "2"]
    assert main([*argv, "--data", str(corpus)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"evaluated on the first 2 of all 3 pairs of {corpus}, beam size 1"

    model, meta = load_checkpoint(trained_run / "checkpoint")
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    trained = evaluate(model, tokenizer, pairs[:2], max_len=9)
    untrained = evaluate(build_model(model.config, 0), tokenizer, pairs[:2], max_len=9)
    for line, scores in zip(lines[2:4], (trained, untrained), strict=True):
        assert line.split()[-2:] == [f"{scores.exact_match:.3f}", f"{scores.bleu:.2f}"]

    assert main([*argv, "--task", "reverse", "--seed", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert (
        header == "evaluated on the first 2 of 500 held-out examples of task 'reverse', beam size 1"
    )


@spec(kind="error")
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": None}, "does not say what it was trained on; pass --task or --data"),
        (
            {"data": {"task": "copy", "seed": 0, "n_train": 64, "n_heldout": 0}},
            "no held-out examples to evaluate",
        ),
    ],
    ids=["no-data", "no-heldout"],
)
def test_evaluate_without_examples_to_score_is_a_one_line_error(
    trained_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, object],
    message: str,
) -> None:
    """`evaluate` of a checkpoint that does not say what it was trained on, or whose run held nothing out, exits 1 with one line saying so."""
    _resave(trained_run, tmp_path / "checkpoint", **changes)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(tmp_path)]) == 1
    assert message in _one_line_error(capsys)


@spec(kind="error")
def test_evaluate_refuses_another_seed_for_the_runs_own_task(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`evaluate --task T --seed N` where the run trained on task T with another seed exits 1 naming --seed: that seed's held-out examples may be ones the run trained on, and silently scoring the run's own split instead would not be what was asked."""
    capsys.readouterr()
    argv = ["evaluate", "--checkpoint", str(trained_run), "--task", "copy", "--seed", "7"]
    assert main(argv) == 1
    line = _one_line_error(capsys)
    assert "--seed 7" in line and "seed 0" in line


@spec(kind="error")
@pytest.mark.parametrize("command", ["generate", "evaluate"])
def test_max_len_beyond_the_positional_table_is_refused_naming_the_flag(
    trained_run: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--max-len` larger than the model's positional table exits 1 with one line naming --max-len and the table's size, before any decoding."""
    capsys.readouterr()
    table = load_checkpoint(trained_run / "checkpoint")[0].config.max_len
    argv = [command, "--checkpoint", str(trained_run), "--max-len", str(table + 1)]
    assert main([*argv, *(["a b"] if command == "generate" else [])]) == 1
    line = _one_line_error(capsys)
    assert f"--max-len {table + 1}" in line and f"{table} positions" in line


@spec(kind="error")
def test_checkpoint_without_a_tokenizer_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint saved by the library without a tokenizer (not by `train`) makes generate exit 1 with one line saying so."""
    model, _ = load_checkpoint(trained_run / "checkpoint")
    save_checkpoint(tmp_path / "bare", model)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "bare"), "a b"]) == 1
    assert "holds no tokenizer (not written by 'train')" in _one_line_error(capsys)


@spec(kind="error")
def test_train_without_data_or_resume_on_other_data_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train` with neither --task nor --data exits 1 asking for one, and `train --resume --task OTHER` exits 1 naming the run's own data."""
    assert main(["train", "--out", str(tmp_path / "new"), *TINY]) == 1
    assert "one of --task or --data is required" in _one_line_error(capsys)

    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    assert main(["train", "--resume", "--task", "reverse", "--out", str(run)]) == 1
    line = _one_line_error(capsys)
    assert "--resume continues the run's own data (task 'copy', seed 0), not reverse" in line


@spec(kind="error")
def test_cuda_device_without_cuda_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --device cuda` where no CUDA device exists exits 1 with one line saying so, before training."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the error cannot occur")
    assert main(["train", *TINY_RUN, "--device", "cuda", "--out", str(tmp_path / "o")]) == 1
    assert "--device cuda: no CUDA device is available" in _one_line_error(capsys)
    assert not (tmp_path / "o" / "checkpoint").exists()


@pytest.mark.cuda
@spec(kind="equivalence")
def test_train_on_cuda_uses_the_local_rank_gpu_and_saves_a_cpu_loadable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`train --device cuda` trains on the GPU of torchrun's LOCAL_RANK (here 0) and writes a checkpoint that loads on the CPU with weights moved by training."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--steps", "3", "--device", "cuda", "--out", str(out)]) == 0
    model, meta = load_checkpoint(out / "checkpoint")
    assert next(model.parameters()).device.type == "cpu"
    start = build_model(model.config, meta["training"]["config"]["seed"])
    assert not torch.equal(model.output.weight, start.output.weight)


@spec(kind="error")
def test_interrupt_exits_130_and_debug_mode_shows_the_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in a command exits 130 with 'transformer: interrupted'; an unexpected error is one line naming its type, or its traceback with TRANSFORMER_DEBUG=1."""
    raised: list[BaseException] = []

    def command(args: object) -> int:
        raise raised[-1]

    monkeypatch.setattr(cli_decode, "_cmd_generate", command)
    monkeypatch.delenv("TRANSFORMER_DEBUG", raising=False)
    argv = ["generate", "--checkpoint", "run", "text"]

    raised.append(KeyboardInterrupt())
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "transformer: interrupted\n")

    raised.append(RuntimeError("boom\nsecond line"))
    assert main(argv) == 1
    assert _one_line_error(capsys) == "transformer: error: RuntimeError: boom second line"

    monkeypatch.setenv("TRANSFORMER_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(argv)


@spec(kind="shape")
def test_subcommand_whose_module_is_absent_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a trimmed install without transformer.bench, `bench` is not a subcommand (argparse says so) while `spec` and the core commands remain."""
    monkeypatch.setitem(cli._OPTIONAL_COMMANDS, "bench", "transformer.not_installed")
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["bench", "attention"])
    assert info.value.code == 2
    assert parser.parse_args(["spec"]).command == "spec"
    assert parser.parse_args(["demo"]).command == "demo"


@spec(kind="shape")
def test_demo_at_a_tiny_size_runs_its_four_stages_and_reports_unmet_goals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo` shrunk to a tiny model and task (2 steps) prints its four stages and the goal checklist, decodes the reloaded checkpoint as the library does, meets only the reload goal and exits 1.

    The full-size demo (about two minutes) is the slow test of test_goals.py; here the
    module-level sizes are shrunk so the command's own code runs in the default suite.
    """
    monkeypatch.setattr(
        cli_config,
        "DEFAULT_MODEL",
        {"d_model": 16, "nhead": 2, "layers": 1, "dim_feedforward": 24, "dropout": 0.1},
    )
    monkeypatch.setattr(cli_demo, "DEFAULT_VOCAB", 60)
    monkeypatch.setitem(cli_demo.DEFAULT_TRAIN, "batch_size", 16)
    small = dataclasses.replace(TASKS["numbers"], n_train=40, n_heldout=5)
    monkeypatch.setitem(TASKS, "numbers", small)
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--steps", "2", "--tiny-steps", "2", "--examples", "3"]
    assert main([*argv, "--no-progress"]) == 1
    printed = capsys.readouterr().out
    stages = [printed.index(f"[{k}/4]") for k in range(1, 5)]
    assert stages == sorted(stages)
    goals = re.findall(r"^  \[(x| )\] (\d)\. ", printed, flags=re.MULTILINE)
    assert goals == [(" ", "1"), (" ", "2"), ("x", "3")]
    for name in ("loss.png", "metrics.jsonl", "checkpoint", "tiny/checkpoint"):
        assert (out / name).exists(), name

    shown = re.findall(
        r"^      (?:ok  |MISS) +(\d+) -> (.*?)(?:   \(expected: .*\))?$", printed, re.M
    )
    heldout = make_task("numbers", seed=0).heldout
    assert [src for src, _ in shown] == [src for src, _ in heldout[:3]]
    # Run again into the same folder: an earlier demo's run is replaced without asking.
    assert main([*argv, "--no-progress"]) == 1
    assert "[4/4]" in capsys.readouterr().out
    model, meta = load_checkpoint(out / "checkpoint")
    # The shrink reached the command (a patch of the wrong module would run full size).
    assert model.d_model == 16
    assert model.output.out_features <= 60
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    max_len = meta["max_target_len"] + 8
    ids = translate(model, tokenizer, [src for src, _ in shown], max_len=max_len)
    assert [got for _, got in shown] == [tokenizer.decode(row) for row in ids]


# --------------------------------------------------------------------------- sampling


@spec(kind="equivalence")
def test_generate_samples_what_sample_decode_draws_with_the_seeded_generator(
    trained_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`generate --temperature T --top-k K --top-p P --seed N` prints, for each input, what ``sample_decode`` draws for that input alone with ``torch.Generator().manual_seed(N)``, so an input's line does not depend on the other inputs; the same seed prints the same lines, and ``--temperature 0`` prints the greedy lines."""
    from transformer.data import pad_sequences
    from transformer.generate import sample_decode

    texts = ["a b c", "j", "d e"]
    flags = ["--temperature", "1.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"]
    run = ["generate", "--checkpoint", str(trained_run), *texts, "--max-len", "9"]
    capsys.readouterr()
    assert main([*run, *flags]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert main([*run, *flags]) == 0
    assert capsys.readouterr().out.splitlines() == printed

    model, meta = load_checkpoint(trained_run / "checkpoint")
    tokenizer = Tokenizer.from_str(meta["tokenizer"])
    expected = []
    for text in texts:
        src = pad_sequences([tokenizer.encode(text)], tokenizer.pad_id)
        gen = torch.Generator().manual_seed(3)
        (row,) = sample_decode(
            model, src, 9, tokenizer.bos_id, tokenizer.eos_id,
            temperature=1.7, top_k=5, top_p=0.9, generator=gen,
        )  # fmt: skip
        expected.append(tokenizer.decode(row))
    assert printed == expected
    # The last input alone prints the line it printed after the two others.
    assert main([*run[:3], texts[-1], *run[-2:], *flags]) == 0
    assert capsys.readouterr().out.splitlines() == printed[-1:]

    assert main([*run, "--temperature", "0"]) == 0
    greedy = capsys.readouterr().out.splitlines()
    assert main(run) == 0
    assert greedy == capsys.readouterr().out.splitlines()


@spec(kind="error")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--temperature", "-1"], "--temperature: must be a non-negative number, got '-1'"),
        (["--temperature", "warm"], "--temperature: must be a non-negative number, got 'warm'"),
        (["--top-k", "0"], "--top-k: must be a positive integer, got '0'"),
        (["--top-p", "1.5"], r"--top-p: must be a number in \(0, 1\], got '1.5'"),
        (["--top-p", "0"], r"--top-p: must be a number in \(0, 1\], got '0'"),
        (["--seed", "-2"], "--seed: must be a non-negative integer, got '-2'"),
    ],
)
def test_bad_sampling_flags_end_with_one_line_and_status_2(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --temperature, --top-k, --top-p or --seed prints one 'transformer: error:' line naming the flag and the value and exits 2, before any checkpoint is read."""
    with pytest.raises(SystemExit) as info:
        main(["generate", "--checkpoint", "no/such/run", "x", *flags])
    assert info.value.code == 2
    assert re.search(message, _one_line_error(capsys))


@spec(kind="error")
def test_beam_search_with_sampling_flags_is_refused_before_reading_the_checkpoint(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`generate --beam-size 4 --top-k 5` exits 1 with one line saying that beam search does not combine with the sampling flags, before looking for the checkpoint (which does not exist)."""
    argv = ["generate", "--checkpoint", "no/such/run", "x", "--beam-size", "4", "--top-k", "5"]
    assert main(argv) == 1
    line = _one_line_error(capsys)
    assert "--beam-size cannot be combined with --temperature, --top-k or --top-p" in line


@spec(kind="shape")
def test_generate_help_documents_every_sampling_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`generate --help` lists --temperature, --top-k, --top-p and --seed, each with its help text."""
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, words in (
        ("--temperature", "0 = greedy"),
        ("--top-k", "K most probable tokens"),
        ("--top-p", "nucleus"),
        ("--seed", "the same input and seed print the same line"),
    ):
        assert flag in text and words in text, flag


# --------------------------------------------------------------------------- run directories


@spec(kind="error")
def test_resume_to_a_step_the_checkpoint_already_reached_is_refused(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--resume --steps K` with K at or below the checkpoint's step exits 1 naming --steps and that step; beyond it, resume says where it starts."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    for steps in ("12", "5"):
        assert main(["train", "--resume", "--out", str(run), "--steps", steps]) == 1
        line = _one_line_error(capsys)
        assert f"--steps {steps}" in line and "checkpoint's step 12" in line
    assert main(["train", "--resume", "--out", str(run), "--steps", "13", "--no-progress"]) == 0
    assert "resuming from step 12 of 13" in capsys.readouterr().err


@spec(kind="error")
def test_resume_of_a_run_that_records_no_data_is_a_one_line_error(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --resume` on a run whose checkpoint records no training data (one trained through the Python API) exits 1 with a line naming --resume, not a KeyError."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    _resave(run, run / "checkpoint", data=None)
    assert main(["train", "--resume", "--out", str(run), "--steps", "13"]) == 1
    line = _one_line_error(capsys)
    assert line.startswith("transformer: error: --resume") and "records no training data" in line


@spec(kind="error")
@pytest.mark.parametrize("held", ["checkpoint", "metrics.jsonl"])
def test_new_run_into_a_directory_holding_a_run_is_refused_unless_forced(
    trained_run: Path, tmp_path: Path, held: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --out DIR` where DIR holds a run's checkpoint or metrics exits 1 naming --resume and --force; `--force` replaces that run."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    for name in {"checkpoint", "metrics.jsonl"} - {held}:
        target = run / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    argv = ["train", *TINY_RUN, "--steps", "3", "--log-every", "1", "--out", str(run)]
    assert main(argv) == 1
    line = _one_line_error(capsys)
    assert "--resume" in line and "--force" in line
    assert main([*argv, "--force"]) == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    _, meta = load_checkpoint(run / "checkpoint")
    assert meta["training"]["step"] == 3


@spec(kind="error")
def test_a_torchrun_restart_continues_only_a_run_its_own_job_started(
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """torchrun --max-restarts runs a failed command again with TORCHELASTIC_RESTART_COUNT 1 and the job's TORCHELASTIC_RUN_ID. A first attempt refused because --out held another run fails, and its restart must be refused the same way (exit 1 naming --resume and --force), that run's files unchanged, not resume it. A job whose first attempt started the run and died after logging goes on: its restart replaces that attempt's metrics and trains the run, and leaves no job mark once it completes. A later job under the same id is refused in its first attempt and its restart alike, by a folder an earlier job of that id started and left."""
    theirs = tmp_path / "theirs"
    _copy_tree(trained_run, theirs)
    before = _file_bytes(theirs)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    argv = ["train", *TINY_RUN, "--steps", "14", "--log-every", "1"]
    assert main([*argv, "--out", str(theirs)]) == 1
    line = _one_line_error(capsys)
    assert "--resume" in line and "--force" in line
    assert _file_bytes(theirs) == before

    import transformer.training

    real_train = transformer.training.train

    def dies_after_logging(*args: object, **kwargs: object) -> None:
        out = Path(str(args[3]))  # train(model, tokenizer, examples, out_dir, config, ...)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n', encoding="utf-8")
        raise RuntimeError("worker died")

    ours = tmp_path / "ours"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(transformer.training, "train", dies_after_logging)
    assert main([*argv, "--steps", "3", "--out", str(ours)]) == 1
    assert "error: RuntimeError: worker died" in capsys.readouterr().err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(transformer.training, "train", real_train)
    assert main([*argv, "--steps", "3", "--out", str(ours)]) == 0
    assert [r["step"] for r in read_metrics(ours / "metrics.jsonl")] == [1, 2, 3]
    assert not (ours / ".torchrun-job").exists()  # the run is complete: no job continues it

    # A job that died for good (its restarts spent) leaves its mark; a later job under
    # the same id (torchrun's static --rdzv_id) must not take that folder for its own.
    crashed = tmp_path / "crashed"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.setattr(transformer.training, "train", dies_after_logging)
    assert main([*argv, "--steps", "3", "--out", str(crashed)]) == 1
    monkeypatch.setattr(transformer.training, "train", real_train)
    left = _file_bytes(crashed)
    capsys.readouterr()
    for attempt in ("0", "1"):  # the later job's first attempt, then its restart
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", attempt)
        assert main([*argv, "--steps", "3", "--out", str(crashed)]) == 1
        line = _one_line_error(capsys)
        assert "--resume" in line and "--force" in line
    assert {k: v for k, v in _file_bytes(crashed).items() if k in left} == {
        k: v for k, v in left.items() if k.name != ".torchrun-job"
    }


@spec(kind="error")
@pytest.mark.parametrize(
    "bad",
    [["--data", "no-such-file.tsv"], ["--device", "cuda"]],
    ids=["missing data", "cuda without a GPU"],
)
def test_forced_run_refused_by_a_later_check_leaves_the_old_run_intact(
    trained_run: Path,
    tmp_path: Path,
    bad: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`train --force` replaces a run only once every argument has been checked and the data read: refused by a later check (a missing --data file, --device cuda with no GPU) it exits 1 with one error line, and the old run's files are all still there, unchanged."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    before = _file_bytes(run)
    tiny = [a for a in TINY_RUN if a not in ("--task", "copy")] if "--data" in bad else TINY_RUN
    assert main(["train", *tiny, *bad, "--steps", "3", "--out", str(run), "--force"]) == 1
    _one_line_error(capsys)
    after = _file_bytes(run)
    assert after == before


@spec(kind="error")
def test_demo_refuses_a_training_run_in_its_out_folder_unless_forced(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`demo --out DIR` where DIR holds a run that no demo wrote (a `train` run) exits 1 before any work, naming --force, and leaves the run as it was (a folder an earlier demo wrote is replaced without asking: see the tiny demo test)."""
    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    before = _file_bytes(run)
    assert main(["demo", "--out", str(run), "--no-progress"]) == 1
    line = _one_line_error(capsys)
    assert "--force" in line and str(run) in line
    after = _file_bytes(run)
    assert after == before


@spec(kind="error")
@pytest.mark.parametrize(
    "case",
    ["train-run-beside-a-tiny-folder", "demo-folder-holding-checkpoints", "train-force-into-demo"],
)
def test_demo_replaces_without_force_only_what_an_earlier_demo_wrote(
    case: str,
    trained_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Only the demo's mark file says a demo wrote a folder, and even there only the files a demo writes are replaced without --force: a train run beside a folder named tiny/ (no mark), a checkpoints/ folder (which no demo writes) in a marked folder, and a run that `train --force` wrote into a marked folder (train removes the mark) make `demo --out DIR` exit 1 naming --force, before any work, with every file left as it was."""
    import transformer.training as training

    run = tmp_path / "run"
    _copy_tree(trained_run, run)
    if case == "train-run-beside-a-tiny-folder":
        (run / "tiny").mkdir()
    elif case == "demo-folder-holding-checkpoints":
        (run / cli_common.DEMO_MARK).write_text("a demo", encoding="utf-8")
        (run / "checkpoints").mkdir()
        (run / "checkpoints" / "keep.txt").write_text("mine", encoding="utf-8")
    else:
        (run / cli_common.DEMO_MARK).write_text("a demo", encoding="utf-8")
        assert main(["train", *TINY_RUN, "--steps", "2", "--out", str(run), "--force"]) == 0
        assert not (run / cli_common.DEMO_MARK).exists()
    capsys.readouterr()
    before = _file_bytes(run)

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started training")

    monkeypatch.setattr(training, "train", no_work)
    assert main(["demo", "--out", str(run), "--no-progress"]) == 1
    line = _one_line_error(capsys)
    assert "--force" in line and str(run) in line
    assert _file_bytes(run) == before


@spec(kind="error")
@pytest.mark.parametrize("where", ["file", "under-a-file"])
@pytest.mark.parametrize(
    "argv",
    [
        ["train", *TINY_RUN, "--out"],
        ["demo", "--out"],
        ["bench", "attention", "--seq-lens", "16", "--out"],
        ["bench", "torch-wrapper", "--seq-lens", "16", "--out"],
    ],
    ids=["train", "demo", "bench-attention", "bench-torch-wrapper"],
)
def test_output_directory_that_cannot_be_one_is_refused_before_any_work(
    argv: list[str],
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--out FILE` (a file where the command writes a directory) or `--out FILE/sub` (a folder that cannot be made under a file) is one error line naming --out and the file, before any training or timing starts."""
    import transformer.bench as bench
    import transformer.training as training

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the --out check")

    for module, name in [(training, "train"), (bench, "run_attention_bench")]:
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.setattr(bench, "run_wrapper_bench", no_work)
    file = tmp_path / "a-file"
    file.write_text("in the way", encoding="utf-8")
    target = file if where == "file" else file / "sub"
    assert main([*argv, str(target)]) != 0
    err = capsys.readouterr().err.strip()
    assert f"--out {target}" in err and str(file) in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- averaging


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny `train --keep-last 3` run saving every 3 of 12 steps: it keeps steps 6, 9 and 12."""
    out = tmp_path_factory.mktemp("keep") / "run"
    argv = ["train", *TINY_RUN, "--steps", "12", "--warmup", "4", "--checkpoint-every", "3"]
    assert main([*argv, "--keep-last", "3", "--out", str(out)]) == 0
    return out


@spec(kind="equivalence")
def test_average_of_the_kept_checkpoints_is_their_mean_and_generates(
    kept_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --keep-last 3` keeps the last three saves; `average` of them writes a checkpoint holding the float64 mean of their weights (paper §6.1 averaging) and the run's seed, that `generate` decodes with and `evaluate` scores as "averaged (3 checkpoints)"."""
    kept = sorted((kept_run / "checkpoints").iterdir())
    assert [p.name for p in kept] == ["step-00000006", "step-00000009", "step-00000012"]
    out = tmp_path / "averaged"
    assert main(["average", *map(str, kept), "--out", str(out)]) == 0
    assert f"averaged 3 checkpoints into {out}" in capsys.readouterr().out
    averaged, meta = load_checkpoint(out)
    models = [load_checkpoint(p)[0].state_dict() for p in kept]
    for name, tensor in averaged.state_dict().items():
        expected = (sum(m[name].double() for m in models) / 3).to(tensor.dtype)
        assert torch.equal(tensor, expected), name
    assert meta["averaged_from"] == [str(p) for p in kept]
    assert main(["generate", "--checkpoint", str(out), "abc", "ab"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # one output line per input
    # evaluate says what it scores, against the run's own initial model as the baseline.
    assert meta["init_seed"] == load_checkpoint(kept[-1])[1]["training"]["config"]["seed"]
    assert main(["evaluate", "--checkpoint", str(out), "--limit", "3"]) == 0
    assert "averaged (3 checkpoints)" in capsys.readouterr().out


@spec(kind="error")
def test_average_refuses_an_existing_out_unless_forced_and_another_architecture(
    kept_run: Path, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`average --out DIR` with DIR present exits 1 naming --force, and `--force` replaces it; a checkpoint of another architecture exits 1 naming it."""
    kept = [str(p) for p in sorted((kept_run / "checkpoints").iterdir())]
    out = tmp_path / "taken"
    out.mkdir()
    assert main(["average", *kept, "--out", str(out)]) == 1
    line = _one_line_error(capsys)
    assert f"--out {out} already exists" in line and "--force" in line
    assert main(["average", *kept, "--out", str(out), "--force"]) == 0
    load_checkpoint(out)
    capsys.readouterr()
    other = tmp_path / "other"
    argv = ["train", *TINY_RUN, "--steps", "1", "--ff", "32", "--out", str(other)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["average", kept[0], str(other), "--out", str(tmp_path / "mixed")]) == 1
    line = _one_line_error(capsys)
    assert "architecture mismatch" in line and str(other / "checkpoint") in line
    assert not (tmp_path / "mixed").exists()


@spec(kind="error")
def test_average_warns_when_a_checkpoint_is_given_twice_and_counts_it_twice(
    kept_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`average A A B` writes the mean with A counted twice, (2 A + B) / 3, and says on stderr that A is given 2 times (a weighted mean may be meant, a mistake more often)."""
    a, b = sorted((kept_run / "checkpoints").iterdir())[:2]
    out = tmp_path / "weighted"
    assert main(["average", str(a), str(a), str(b), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {a.resolve()} is given 2 times" in err
    assert str(b.resolve()) not in err
    averaged, _ = load_checkpoint(out)
    sa, sb = load_checkpoint(a)[0].state_dict(), load_checkpoint(b)[0].state_dict()
    for name, tensor in averaged.state_dict().items():
        expected = ((2 * sa[name].double() + sb[name].double()) / 3).to(tensor.dtype)
        assert torch.equal(tensor, expected), name


@spec(kind="error")
@pytest.mark.parametrize("out", ["the-run-dir", "a-folder-of-notes"])
def test_average_force_replaces_only_a_checkpoint_and_never_its_inputs(
    out: str,
    kept_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`average --force --out DIR` where DIR holds the input checkpoints (their run directory) or holds files but no checkpoint exits 1 naming --out and deletes nothing; `--out .` in an empty folder writes the checkpoint there."""
    run = tmp_path / "run"
    _copy_tree(kept_run, run)
    kept = [str(p) for p in sorted((run / "checkpoints").iterdir())]
    target = run
    if out == "a-folder-of-notes":
        target = tmp_path / "notes"
        target.mkdir()
        (target / "notes.txt").write_text("mine", encoding="utf-8")
    before = _file_bytes(target)
    assert main(["average", *kept, "--out", str(target), "--force"]) == 1
    assert f"--out {target}" in _one_line_error(capsys)
    assert _file_bytes(target) == before
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["average", *kept, "--out", ".", "--force"]) == 0
    load_checkpoint(here)


@spec(kind="shape")
def test_train_accumulates_and_batches_by_tokens_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`train --accumulate 2 --batch-tokens 60` runs, stores both settings, and a `--resume` keeps them."""
    out = tmp_path / "run"
    by_pairs = TINY_RUN.index("--batch-size")
    tiny = TINY_RUN[:by_pairs] + TINY_RUN[by_pairs + 2 :]  # batches counted in tokens instead
    argv = ["train", *tiny, "--steps", "3", "--log-every", "1", "--out", str(out)]
    assert main([*argv, "--accumulate", "2", "--batch-tokens", "60"]) == 0
    _, meta = load_checkpoint(out / "checkpoint")
    saved = meta["training"]["config"]
    assert (saved["accumulate"], saved["batch_tokens"]) == (2, 60)
    assert main(["train", "--resume", "--out", str(out), "--steps", "4", "--no-progress"]) == 0
    _, meta = load_checkpoint(out / "checkpoint")
    assert meta["training"]["step"] == 4
    assert meta["training"]["config"]["accumulate"] == 2


# --------------------------------------------------------------------------- threads


@spec(kind="shape")
def test_threads_flag_sets_torch_threads_before_the_command_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`transformer --threads N COMMAND` calls torch.set_num_threads(N) before the command runs."""
    seen: list[int] = []

    def command(args: object) -> int:
        seen.append(torch.get_num_threads())
        return 0

    monkeypatch.setattr(cli_decode, "_cmd_generate", command)
    assert main(["--threads", "3", "generate", "--checkpoint", "run", "text"]) == 0
    assert seen == [3]


@spec(kind="shape")
def test_default_threads_follow_omp_num_threads_else_one_on_two_cores(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without --threads: $OMP_NUM_THREADS when set, else 1 on at most 2 cores, else torch's own default (None)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert cli.default_threads() == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert cli.default_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert cli.default_threads() is None


# --------------------------------------------------------------------------- help


def _actions(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    """Every (command path, action) of ``parser`` and its subcommands, help actions left out."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _actions(child, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


@spec(kind="shape")
def test_every_flag_of_every_command_has_help() -> None:
    """Each argument of each (sub)command, -h aside, carries a help text."""
    missing = [
        f"{path} {'/'.join(a.option_strings) or a.dest}"
        for path, a in _actions(build_parser(), "transformer")
        if not a.help
    ]
    assert missing == []


@spec(kind="shape")
def test_top_level_help_names_every_command_and_train_help_lists_the_tasks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`transformer --help` names every command; `train --help` lists each built-in task with its description."""
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for command in ("train", "generate", "evaluate", "bench", "spec", "conform", "demo"):
        assert re.search(rf"\b{command}\b", top.split("positional arguments")[0]), command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for task in TASKS.values():
        assert f"{task.name} {' '.join(task.description.split())}" in text


@spec(kind="shape")
def test_version_prints_the_installed_distribution_version(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`transformer --version` prints 'transformer <version of transformer-spec>' and exits 0."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"transformer {version('transformer-spec')}"


@spec(kind="error")
def test_bare_command_prints_the_command_list_and_exits_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bare `transformer` prints the help with every command and exits 2 with one error line."""
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "generate" in err and "conform" in err
    assert err.strip().splitlines()[-1].startswith("transformer: error: a command is required")


@spec(kind="error")
def test_heads_that_do_not_divide_d_model_are_named_as_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--heads 3` with the default d_model 64 exits 1 saying '--heads 3 does not divide --d-model 64', before any work."""
    assert main(["train", "--task", "copy", "--heads", "3", "--out", str(tmp_path / "r")]) == 1
    assert "--heads 3 does not divide --d-model 64" in _one_line_error(capsys)
    assert not (tmp_path / "r").exists()


@spec(kind="error")
def test_long_architecture_mismatch_is_summarised_with_a_count() -> None:
    """An architecture-mismatch error with many differences shows the first three and how many there are."""
    items = [f"missing layer{i}.weight" for i in range(10)]
    err = ValueError(
        "architecture mismatch: the weights in d do not fit (" + "; ".join(items) + ")"
    )
    text = cli._describe_error(err)
    assert "layer2.weight" in text and "layer3.weight" not in text
    assert "and 7 more, 10 in all" in text
