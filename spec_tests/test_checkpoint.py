"""Spec of checkpoints: ``save_checkpoint`` / ``load_checkpoint`` (our guarantee).

A checkpoint is a directory of safetensors and JSON files with a manifest of sha256
hashes. The suite pins: a round trip reproduces the model's outputs, its tied and
shared weights, the optimizer and scheduler state (training continues identically) and
the metadata; a fresh Python process generates the same tokens from it; a damaged or
missing file and a model of another architecture raise ``CheckpointError`` naming the
file or the field; a crash at any point of a save leaves the previous checkpoint
loadable; and no file is a pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from transformer import checkpoint as checkpoint_module
from transformer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from transformer.generate import greedy_decode
from transformer.model import ModelConfig, Seq2SeqTransformer
from transformer.training import make_optimizer, make_scheduler

spec = functools.partial(pytest.mark.spec, component="checkpoint", section="extra")

PAD, BOS, EOS = 0, 1, 2
V = 19


def make_model(seed: int = 0, **overrides: object) -> Seq2SeqTransformer:
    config = ModelConfig.tiny(V, **{"d_model": 24, "nhead": 3, "dim_feedforward": 40, **overrides})
    torch.manual_seed(seed)
    return Seq2SeqTransformer.from_config(config)


def batch(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(src, tgt_in, tgt_out)`` ``(3, 7)``, ``(3, 6)``, ``(3, 6)`` with some padding."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(3, V, (3, 7), generator=gen)
    src[1, 4:] = PAD
    tgt = torch.randint(3, V, (3, 7), generator=gen)
    tgt[:, 0] = BOS
    tgt[2, 5:] = PAD
    return src, tgt[:, :-1], tgt[:, 1:]


def train_steps(
    model: Seq2SeqTransformer, optimizer: torch.optim.Optimizer, scheduler: object, seeds: range
) -> None:
    """A few steps of the training loop: cross-entropy, Adam, the warmup schedule."""
    model.train()
    for seed in seeds:
        src, tgt_in, tgt_out = batch(seed)
        logits = model(src, tgt_in)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, V), tgt_out.reshape(-1), ignore_index=PAD
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


def eval_logits(model: Seq2SeqTransformer) -> Tensor:
    model.eval()
    src, tgt_in, _ = batch(99)
    with torch.no_grad():
        return model(src, tgt_in)


# --------------------------------------------------------------------------------------
# Round trips.
# --------------------------------------------------------------------------------------


@spec(kind="equivalence")
@pytest.mark.parametrize("share", [False, True])
def test_round_trip_reproduces_outputs_and_keeps_weights_tied(tmp_path: Path, share: bool) -> None:
    """A model rebuilt from its checkpoint gives bit-identical logits and keeps its tied output weight and shared embeddings as one Parameter."""
    model = make_model(1, share_embeddings=share)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, make_scheduler(optimizer, 24, 5), range(2))
    save_checkpoint(tmp_path / "ckpt", model)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {}
    assert loaded.config == model.config
    assert torch.equal(eval_logits(loaded), eval_logits(model))
    assert loaded.output.weight is loaded.tgt_embedding.weight
    assert (loaded.src_embedding is loaded.tgt_embedding) == share


@spec(kind="equivalence")
def test_round_trip_restores_optimizer_and_scheduler_so_training_continues_identically(
    tmp_path: Path,
) -> None:
    """Loading model, Adam state and learning-rate schedule into fresh objects and training on gives bit-identical weights to never having stopped."""
    model = make_model(2)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, 24, 3)
    train_steps(model, optimizer, scheduler, range(3))
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, step=3)

    resumed = make_model(77)  # other initial weights: everything must come from the file
    resumed_optimizer = make_optimizer(resumed)
    resumed_scheduler = make_scheduler(resumed_optimizer, 24, 3)
    _, meta = load_checkpoint(tmp_path / "ckpt", resumed, resumed_optimizer, resumed_scheduler)
    assert meta == {"step": 3}
    assert resumed_scheduler.state_dict() == scheduler.state_dict()
    assert resumed_optimizer.param_groups[0]["betas"] == (0.9, 0.98)

    train_steps(model, optimizer, scheduler, range(3, 5))
    train_steps(resumed, resumed_optimizer, resumed_scheduler, range(3, 5))
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@spec(kind="equivalence")
def test_metadata_round_trips_nested_json_tuples_and_tensors(tmp_path: Path) -> None:
    """``**meta`` comes back equal: nested dicts and lists, tuples, None, floats, non-str keys and tensors."""
    meta = {
        "training": {
            "step": 12,
            "window": {"loss": 1.5, "tokens": 10},
            "rng": [1, 2, 3],
            "gauss": None,
        },
        "tokenizer": '{"model": "bpe"}',
        "pair": (1, "a"),
        "by_id": {3: "x", 4: [0.25]},
        "table": torch.arange(6.0).view(2, 3),
    }
    save_checkpoint(tmp_path / "ckpt", make_model(), **meta)
    _, loaded = load_checkpoint(tmp_path / "ckpt")
    table = loaded.pop("table")
    assert torch.equal(table, meta.pop("table"))  # type: ignore[arg-type]
    assert loaded == meta


@spec(kind="equivalence")
def test_fresh_process_reload_generates_the_same_tokens(tmp_path: Path) -> None:
    """A new Python process that loads the checkpoint decodes exactly the tokens the saving process decodes."""
    model = make_model(3)
    src, _, _ = batch(4)
    expected = greedy_decode(model, src, 10, BOS, EOS).tolist()
    save_checkpoint(tmp_path / "ckpt", model)
    script = (
        "import json, sys, torch\n"
        "from transformer import load_checkpoint, greedy_decode\n"
        "model, _ = load_checkpoint(sys.argv[1])\n"
        "src = torch.tensor(json.loads(sys.argv[2]))\n"
        f"print(json.dumps(greedy_decode(model, src, 10, {BOS}, {EOS}).tolist()))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "ckpt"), json.dumps(src.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == expected


@spec(kind="equivalence")
def test_no_file_is_a_pickle_and_loading_unpickles_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every file of a checkpoint is JSON or safetensors, and loading it (model, optimizer and scheduler state) never calls ``pickle`` or ``torch.load``."""
    model = make_model(5)
    optimizer = make_optimizer(model)
    scheduler = make_scheduler(optimizer, 24, 3)
    train_steps(model, optimizer, scheduler, range(1))
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, note="x")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "model.safetensors" in names and "manifest.json" in names
    for name in names:
        path = tmp_path / "ckpt" / name
        if name.endswith(".json"):
            json.loads(path.read_text())
        else:
            assert name.endswith(".safetensors"), name
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint load unpickled something")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh = make_model(6)
    fresh_optimizer = make_optimizer(fresh)
    load_checkpoint(
        tmp_path / "ckpt", fresh, fresh_optimizer, make_scheduler(fresh_optimizer, 24, 3)
    )


# --------------------------------------------------------------------------------------
# Damage and mismatches.
# --------------------------------------------------------------------------------------


@spec(kind="error")
@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "config.json", "meta.json", "optimizer.safetensors", "optimizer.json"],
)
def test_damaged_file_raises_checkpoint_error_naming_it(tmp_path: Path, name: str) -> None:
    """Flipping one byte of any file makes loading raise ``CheckpointError`` (a ``ValueError``) that says ``damaged: <file>``."""
    model = make_model(7)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, make_scheduler(optimizer, 24, 3), range(1))
    save_checkpoint(tmp_path / "ckpt", model, optimizer, meta={"a": 1})
    path = tmp_path / "ckpt" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"damaged: {re.escape(name)}"):
        load_checkpoint(tmp_path / "ckpt")
    assert issubclass(CheckpointError, ValueError)


@spec(kind="error")
def test_missing_checkpoint_or_file_raises_checkpoint_error_naming_it(tmp_path: Path) -> None:
    """A missing directory, a missing file listed in the manifest and a missing manifest each raise ``CheckpointError`` that names what is missing."""
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "ckpt", make_model())
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"damaged: config\.json is missing"):
        load_checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing manifest\.json"):
        load_checkpoint(tmp_path / "ckpt")


@spec(kind="error")
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"d_model": 30}, "d_model: checkpoint 24, model 30"),
        ({"num_decoder_layers": 3}, "num_decoder_layers: checkpoint 2, model 3"),
        ({"tie_output": False}, "tie_output: checkpoint True, model False"),
        (
            {"d_model": 30, "num_decoder_layers": 3},
            "d_model: checkpoint 24, model 30.*num_decoder_layers: checkpoint 2, model 3",
        ),
    ],
)
def test_loading_into_another_architecture_raises_naming_the_field(
    tmp_path: Path, overrides: dict[str, object], match: str
) -> None:
    """Loading into a model of another architecture raises ``CheckpointError`` listing each differing config field with both values."""
    save_checkpoint(tmp_path / "ckpt", make_model())
    other = make_model(**overrides)
    with pytest.raises(CheckpointError, match=f"architecture mismatch.*{match}"):
        load_checkpoint(tmp_path / "ckpt", other)


@spec(kind="error")
def test_requested_state_that_was_not_saved_raises(tmp_path: Path) -> None:
    """Asking for optimizer state from a checkpoint saved without one raises ``CheckpointError``; meta that is not JSON or tensors raises ``TypeError`` naming its key."""
    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "ckpt", model, make_optimizer(model))
    with pytest.raises(TypeError, match=r"cannot store object at meta\.extra\.when"):
        save_checkpoint(tmp_path / "other", model, extra={"when": object()})
    assert not (tmp_path / "other").exists()


# --------------------------------------------------------------------------------------
# Atomic writes.
# --------------------------------------------------------------------------------------


def leftovers(directory: Path) -> list[str]:
    """Names beside the checkpoint other than the checkpoint itself."""
    return sorted(p.name for p in directory.iterdir() if p.name != "ckpt")


@spec(kind="equivalence")
@pytest.mark.parametrize("fail_at", [1, 2, 4])
def test_crash_while_writing_leaves_the_old_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """A save that dies while writing its files (n-th file write raises) leaves the previous checkpoint complete and loadable, and no temporary directory behind."""
    old = make_model(8)
    save_checkpoint(tmp_path / "ckpt", old, version=1)
    real = checkpoint_module._write_bytes
    calls = 0

    def failing_write(path: Path, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            path.write_bytes(data[: len(data) // 2])  # half a file, then the "crash"
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_bytes", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", make_model(9), version=2)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"version": 1}
    assert torch.equal(eval_logits(loaded), eval_logits(old))
    assert leftovers(tmp_path) == []


@spec(kind="equivalence")
def test_crash_between_the_two_renames_leaves_the_backup_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a save dies after moving the old checkpoint aside but before moving the new one in, loading falls back to the old one, and the next save cleans up."""
    old = make_model(10)
    save_checkpoint(tmp_path / "ckpt", old, version=1)
    real = os.replace
    calls = 0

    def failing_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("power cut")
        real(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path / "ckpt", make_model(11), version=2)
    monkeypatch.setattr(checkpoint_module.os, "replace", real)
    assert not (tmp_path / "ckpt").exists()
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"version": 1}
    assert torch.equal(eval_logits(loaded), eval_logits(old))

    new = make_model(12)
    save_checkpoint(tmp_path / "ckpt", new, version=3)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"version": 3}
    assert torch.equal(eval_logits(loaded), eval_logits(new))
    assert leftovers(tmp_path) == []


@spec(kind="equivalence")
def test_saving_again_replaces_the_checkpoint_completely(tmp_path: Path) -> None:
    """A second save replaces every file (an optimizer file of the first save does not linger) and leaves nothing beside the checkpoint."""
    model = make_model(13)
    optimizer = make_optimizer(model)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, version=1)
    save_checkpoint(tmp_path / "ckpt", model, version=2)
    assert not (tmp_path / "ckpt" / "optimizer.json").exists()
    _, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"version": 2}
    assert leftovers(tmp_path) == []


@spec(kind="shape")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_every_tensor_comes_back_with_its_name_shape_and_dtype(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    """Every state_dict entry is stored under its own name with its shape, dtype and value (read back from the safetensors file itself), and every state_dict entry and optimizer state tensor is restored by loading with its saved shape, dtype and value (nothing reshaped, cast or dropped)."""
    model = make_model(3).to(dtype)
    optimizer = make_optimizer(model)
    train_steps(model, optimizer, make_scheduler(optimizer, 24, 5), range(1))
    save_checkpoint(tmp_path / "ckpt", model, optimizer=optimizer)
    saved = model.state_dict()
    # On disk: every entry under its name, shape, dtype and value (read by safetensors
    # itself, so a cast on the way in or out cannot hide behind load_state_dict's copy).
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    for name, tensor in saved.items():
        if name not in stored:
            # Only a tied weight (section 3.4) is stored once, under its first name.
            assert any(saved[other].data_ptr() == tensor.data_ptr() for other in stored), (
                f"{name} is missing from the file and shares no stored tensor"
            )
            continue
        on_disk = stored[name]
        assert (on_disk.shape, on_disk.dtype) == (tensor.shape, tensor.dtype), name
        assert torch.equal(on_disk, tensor), name
    fresh = make_model(4).to(dtype)
    fresh_optimizer = make_optimizer(fresh)
    loaded, _ = load_checkpoint(tmp_path / "ckpt", fresh, optimizer=fresh_optimizer)
    assert list(loaded.state_dict()) == list(saved)
    for name, tensor in loaded.state_dict().items():
        assert (tensor.shape, tensor.dtype) == (saved[name].shape, saved[name].dtype), name
        assert torch.equal(tensor, saved[name]), name
    before, after = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert sorted(before) == sorted(after)
    for index, entries in before.items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                restored = after[index][key]
                assert (restored.shape, restored.dtype) == (value.shape, value.dtype), key
                assert torch.equal(restored, value), key


def _resign(directory: Path, name: str) -> None:
    """Make the manifest agree with ``name``'s current bytes (damage behind a valid hash)."""
    manifest = json.loads((directory / "manifest.json").read_text())
    data = (directory / name).read_bytes()
    manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


@spec(kind="error")
@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
        bytes(range(256)),
        # Valid safetensors whose alias table is a list, not a name -> name mapping.
        safetensors_bytes({"w": torch.zeros(1)}, metadata={"aliases": "[]"}),
    ],
    ids=["empty", "no-tensors", "noise", "aliases-not-a-mapping"],
)
def test_unreadable_weights_behind_a_valid_hash_raise_checkpoint_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    """A model.safetensors that safetensors cannot parse, even when the manifest was rewritten to match it, raises CheckpointError naming model.safetensors (never SafetensorError)."""
    save_checkpoint(tmp_path / "ckpt", make_model())
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(content)
    _resign(tmp_path / "ckpt", "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


@spec(kind="error")
@pytest.mark.parametrize("name", ["../outside.json", "/etc/hostname", "sub/file.json", ".."])
def test_manifest_naming_a_file_outside_the_checkpoint_is_refused(
    tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest that lists a path outside the checkpoint directory raises CheckpointError quoting that entry; no file outside the directory is hashed (read) on the way."""
    save_checkpoint(tmp_path / "ckpt", make_model())
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "size": 2}
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    hashed: list[Path] = []
    real_sha256 = checkpoint_module._sha256

    def spy(path: Path) -> str:
        hashed.append(Path(path))
        return real_sha256(path)

    monkeypatch.setattr(checkpoint_module, "_sha256", spy)
    with pytest.raises(CheckpointError, match="not a file of the checkpoint"):
        load_checkpoint(tmp_path / "ckpt")
    inside = (tmp_path / "ckpt").resolve()
    assert all(inside in p.resolve().parents for p in hashed), hashed


@spec(kind="error")
@pytest.mark.parametrize("path", [3, None, b"ckpt"], ids=["int", "None", "bytes"])
def test_a_path_that_is_not_a_path_raises_type_error_naming_path(path: object) -> None:
    """save_checkpoint and load_checkpoint given something other than a str or os.PathLike raise TypeError naming path."""
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        load_checkpoint(path)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike"):
        save_checkpoint(path, make_model())  # type: ignore[arg-type]


@spec(kind="error")
def test_saving_a_model_without_a_model_config_raises_type_error(tmp_path: Path) -> None:
    """save_checkpoint of a module that carries no ModelConfig (a plain nn.Linear) raises TypeError naming its type, and writes nothing."""
    with pytest.raises(TypeError, match=r"must carry a ModelConfig as \.config.*got Linear"):
        save_checkpoint(tmp_path / "ckpt", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


@spec(kind="equivalence")
def test_a_stale_backup_beside_a_complete_checkpoint_is_ignored_then_removed(
    tmp_path: Path,
) -> None:
    """A ``<path>.old`` left beside a complete checkpoint (a save that died after its second rename) is not loaded, and the next save removes it."""
    save_checkpoint(tmp_path / "ckpt", make_model(15), version=1)
    save_checkpoint(tmp_path / "ckpt.old", make_model(14), version=0)  # the stale backup
    assert load_checkpoint(tmp_path / "ckpt")[1] == {"version": 1}
    new = make_model(16)
    save_checkpoint(tmp_path / "ckpt", new, version=2)
    loaded, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"version": 2}
    assert torch.equal(eval_logits(loaded), eval_logits(new))
    assert leftovers(tmp_path) == []


def _edit_json(directory: Path, name: str, edit: object) -> None:
    """Replace ``name``'s JSON by ``edit(json)`` and re-sign it (damage behind a valid hash)."""
    path = directory / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))  # type: ignore[operator]
    if name != "manifest.json":
        _resign(directory, name)


@spec(kind="error")
@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("manifest.json", lambda m: [m], r"damaged: manifest\.json .*\(no file list\)"),
        (
            "manifest.json",
            lambda m: {**m, "files": None},
            r"damaged: manifest\.json .*no file list",
        ),
        (
            "manifest.json",
            lambda m: {**m, "format_version": 99},
            r"format version 99; this version of the package reads version 1",
        ),
        (
            "manifest.json",
            lambda m: {**m, "files": {k: v for k, v in m["files"].items() if k != "config.json"}},
            r"manifest\.json in .* does not list config\.json",
        ),
        ("config.json", lambda c: {**c, "model": None}, r"damaged: config\.json .*no model config"),
        (
            "config.json",
            lambda c: {**c, "model": {**c["model"], "colour": "red"}},
            r"damaged: config\.json .*colour",
        ),
        ("meta.json", lambda m: [1, 2], r"damaged: meta\.json .*not an object"),
    ],
    ids=[
        "manifest-not-object",
        "manifest-files-not-object",
        "unknown-format-version",
        "config-not-listed",
        "config-without-model",
        "config-unknown-field",
        "meta-not-object",
    ],
)
def test_well_formed_json_with_the_wrong_content_raises_checkpoint_error_naming_the_file(
    tmp_path: Path, name: str, edit: object, match: str
) -> None:
    """Valid JSON that is not what the loader expects (a manifest without a file list, of an unknown format version or not listing config.json; a config without a valid model; meta that is not an object) raises CheckpointError naming the file, even behind a matching hash."""
    save_checkpoint(tmp_path / "ckpt", make_model(), note="x")
    _edit_json(tmp_path / "ckpt", name, edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(tmp_path / "ckpt")


@spec(kind="error")
def test_optimizer_state_that_does_not_fit_the_given_optimizer_raises(tmp_path: Path) -> None:
    """Loading Adam state saved for all parameters into an optimizer over only some of them raises CheckpointError naming the optimizer, not torch's ValueError."""
    model = make_model()
    save_checkpoint(tmp_path / "ckpt", model, make_optimizer(model))
    partial = torch.optim.Adam(model.output.parameters())
    with pytest.raises(
        CheckpointError, match=r"the optimizer state in .* does not fit the given optimizer"
    ):
        load_checkpoint(tmp_path / "ckpt", make_model(), optimizer=partial)
