"""Checkpoints: safetensors weights + JSON, written atomically, verified on load.

A checkpoint is a directory::

    model.safetensors      every distinct weight tensor once (tied/shared weights are aliases)
    config.json            ModelConfig, checkpoint format version, package version
    meta.json              the caller's ``**meta`` (JSON; tensors go to meta.safetensors)
    optimizer.json/.safetensors, scheduler.json/.safetensors   training state, if given
    manifest.json          sha256 and size of every other file

No file is a pickle: tensors live in safetensors, everything else in JSON, so loading
runs no code from the checkpoint.

Atomicity: the files are written and fsynced in a temporary sibling directory, which then
replaces ``path`` by renames (old -> ``<path>.old``, new -> ``path``, remove the old).
A crash at any moment leaves a complete checkpoint at ``path`` or, between the two
renames, at ``<path>.old``, which :func:`load_checkpoint` falls back to.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from transformer.model import ModelConfig, Seq2SeqTransformer

__all__ = ["FORMAT_VERSION", "CheckpointError", "load_checkpoint", "save_checkpoint"]

#: Version of the directory layout; a loader refuses versions it does not know.
FORMAT_VERSION = 1

_MODEL = "model.safetensors"
_CONFIG = "config.json"
_META = "meta"
_OPTIMIZER = "optimizer"
_SCHEDULER = "scheduler"
_MANIFEST = "manifest.json"
# Config fields that do not change the weights: a checkpoint loads into a model that
# differs only in these.
_NON_ARCHITECTURE = frozenset({"dropout"})


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the model it is loaded into."""


# --------------------------------------------------------------------------- JSON + tensors


def _encode(obj: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """JSON-ready form of ``obj``; tensors are moved to ``tensors`` and referenced by name.

    Tuples and dicts with non-str keys (an optimizer's ``{param_index: state}``) are
    tagged so that :func:`_decode` rebuilds them exactly.
    """
    if isinstance(obj, Tensor):
        name = f"{len(tensors)}"
        tensors[name] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": name}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in obj)
        if plain:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, f"{where}<key>"), _encode(v, tensors, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise TypeError(
        f"cannot store {type(obj).__name__} at {where} in a checkpoint: only JSON values "
        "(dict, list, tuple, str, int, float, bool, None) and tensors are allowed"
    )


def _decode(obj: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {"__tensor__"}:
        return tensors[obj["__tensor__"]]
    if set(obj) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if set(obj) == {"__items__"}:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


# --------------------------------------------------------------------------- files


def _write_bytes(path: Path, data: bytes) -> None:
    """Write and fsync, so the bytes are on disk before the directory is renamed in."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    _write_bytes(path, safetensors_bytes(tensors, metadata=metadata))


def _write_state(directory: Path, stem: str, state: Any) -> None:
    """``state`` as ``<stem>.json`` plus ``<stem>.safetensors`` for its tensors."""
    tensors: dict[str, Tensor] = {}
    encoded = _encode(state, tensors, stem)
    if tensors:  # safetensors cannot read back a file without tensors
        _write_tensors(directory / f"{stem}.safetensors", tensors, {})
    _write_json(directory / f"{stem}.json", encoded)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _distinct_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The ``state_dict`` with each shared tensor stored once: ``(tensors, alias -> name)``.

    safetensors refuses tensors that share memory; tied weights (section 3.4) are the
    same Parameter under several names, so later names become aliases of the first.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, tensor in model.state_dict().items():
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tuple(tensor.stride()),
            tensor.dtype,
        )
        if tensor.numel() > 0 and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous().clone()
    return tensors, aliases


# --------------------------------------------------------------------------- save


def _model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise TypeError(
            f"save_checkpoint: model must carry a ModelConfig as .config (a "
            f"Seq2SeqTransformer), got {type(model).__name__}"
        )
    return config


def _write_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    meta: dict[str, Any],
) -> None:
    """Write every file of a checkpoint into the (empty, new) ``directory``."""
    from transformer import __version__

    tensors, aliases = _distinct_tensors(model)
    _write_tensors(directory / _MODEL, tensors, {"aliases": json.dumps(aliases, sort_keys=True)})
    _write_json(
        directory / _CONFIG,
        {
            "format_version": FORMAT_VERSION,
            "package_version": __version__,
            "model": _model_config(model).to_dict(),
        },
    )
    _write_state(directory, _META, meta)
    if optimizer is not None:
        _write_state(directory, _OPTIMIZER, optimizer.state_dict())
    if scheduler is not None:
        _write_state(directory, _SCHEDULER, scheduler.state_dict())
    files = sorted(p.name for p in directory.iterdir())
    _write_json(
        directory / _MANIFEST,
        {
            "format_version": FORMAT_VERSION,
            "files": {
                name: {
                    "sha256": _sha256(directory / name),
                    "size": (directory / name).stat().st_size,
                }
                for name in files
            },
        },
    )
    _fsync_dir(directory)


def _backup(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    **meta: Any,
) -> None:
    """Write a checkpoint directory at ``path`` atomically, replacing any older one.

    Args:
        path: the checkpoint directory (its parent is created if needed).
        model: a :class:`~transformer.Seq2SeqTransformer` (anything with a ``ModelConfig``
            as ``.config``).
        optimizer: its ``state_dict`` is saved (tensors in safetensors, the rest in JSON).
        scheduler: anything with ``state_dict()`` (e.g. ``LambdaLR``; its functions are
            not stored, as torch does not store them either).
        **meta: JSON values (dicts, lists, numbers, strings) or tensors, returned by
            :func:`load_checkpoint`.

    Raises:
        TypeError: ``model`` has no config, or ``meta`` holds a value that is neither JSON
            nor a tensor.
    """
    _model_config(model)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temporary directories of writers that crashed are garbage; a complete checkpoint
    # never lives in one.
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, model, optimizer, scheduler, dict(meta))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = _backup(path)
    if path.exists():
        # ``path`` is complete, so a backup left by an interrupted swap is obsolete.
        if backup.exists():
            shutil.rmtree(backup)
        os.replace(path, backup)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if backup.exists():
        shutil.rmtree(backup)


# --------------------------------------------------------------------------- load


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"damaged: {path.name} in {path.parent} ({err})") from None


def _verify(directory: Path) -> set[str]:
    """Check every file against the manifest; return the names of the files present."""
    manifest_path = directory / _MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: missing {_MANIFEST}")
    manifest = _read_json(manifest_path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"damaged: {_MANIFEST} in {directory} (no file list)")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory} has checkpoint format version {version!r}; this version of the "
            f"package reads version {FORMAT_VERSION}"
        )
    files: dict[str, Any] = manifest["files"]
    for required in (_MODEL, _CONFIG, f"{_META}.json"):
        if required not in files:
            raise CheckpointError(f"damaged: {_MANIFEST} in {directory} does not list {required}")
    for name, entry in files.items():
        # A manifest names plain files of its own directory; anything else ("../x",
        # "/etc/passwd", "sub/dir") is not one we wrote and must not be read.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(
                f"damaged: {_MANIFEST} in {directory} lists {name!r}, not a file of the checkpoint"
            )
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"damaged: {name} is missing from {directory}")
        if not isinstance(entry, dict) or _sha256(file) != entry.get("sha256"):
            raise CheckpointError(
                f"damaged: {name} in {directory} (its sha256 differs from the manifest)"
            )
    return set(files)


def _read_state(directory: Path, stem: str, present: set[str]) -> Any:
    """Inverse of :func:`_write_state`; only files the manifest lists (and verified) are read."""
    file = directory / f"{stem}.safetensors"
    tensors = load_file(str(file)) if file.name in present else {}
    return _decode(_read_json(directory / f"{stem}.json"), tensors)


def _read_config(directory: Path) -> ModelConfig:
    saved = _read_json(directory / _CONFIG)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"damaged: {_CONFIG} in {directory} (no model config)")
    try:
        return ModelConfig.from_dict(saved["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"damaged: {_CONFIG} in {directory} ({err})") from None


def _read_weights(directory: Path) -> dict[str, Tensor]:
    """The full ``state_dict`` (aliases of tied weights restored)."""
    file = str(directory / _MODEL)
    try:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(file)
        aliases = json.loads(metadata.get("aliases", "{}"))
        if not isinstance(aliases, dict):
            raise ValueError("the aliases metadata is not a mapping")
        for alias, name in aliases.items():
            tensors[alias] = tensors[name]
    except Exception as err:  # SafetensorError, JSON, a missing alias target
        # The manifest hash matched, so these bytes were written by someone else (or
        # by a different safetensors): still a damaged checkpoint, not a crash.
        raise CheckpointError(
            f"damaged: {_MODEL} in {directory} cannot be read ({type(err).__name__}: {err})"
        ) from None
    return tensors


def _check_config(saved: ModelConfig, config: ModelConfig, directory: Path) -> None:
    differ = [
        f"{f.name}: checkpoint {getattr(saved, f.name)!r}, model {getattr(config, f.name)!r}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in _NON_ARCHITECTURE and getattr(saved, f.name) != getattr(config, f.name)
    ]
    if differ:
        raise CheckpointError(
            f"architecture mismatch: {directory} holds another model (" + "; ".join(differ) + ")"
        )


def _check_weights(model: nn.Module, weights: Mapping[str, Tensor], directory: Path) -> None:
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in weights.items()}
    problems = [f"missing {n}" for n in sorted(set(expected) - set(found))]
    problems += [f"unexpected {n}" for n in sorted(set(found) - set(expected))]
    problems += [
        f"{n}: checkpoint {found[n]}, model {expected[n]}"
        for n in sorted(set(expected) & set(found))
        if expected[n] != found[n]
    ]
    if problems:
        raise CheckpointError(
            f"architecture mismatch: the weights in {directory} do not fit the model ("
            + "; ".join(problems)
            + ")"
        )


def load_checkpoint(
    path: str | os.PathLike[str],
    model: Seq2SeqTransformer | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> tuple[Seq2SeqTransformer, dict[str, Any]]:
    """Load a checkpoint written by :func:`save_checkpoint`: ``(model, meta)``.

    Every file is checked against the manifest first. With ``model=None`` a
    :class:`~transformer.Seq2SeqTransformer` is built from the saved config (returned in
    eval mode); otherwise the weights are loaded into ``model`` in place, after checking
    that its architecture is the saved one (all config fields but ``dropout``).
    ``optimizer`` and ``scheduler``, when given, get their saved state.

    Raises:
        CheckpointError: no checkpoint at ``path``; a file is missing or damaged (the
            message names it); the model's architecture differs (the message names the
            fields or weights); optimizer/scheduler state is absent or does not fit.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    directory = Path(path)
    if not directory.is_dir() and _backup(directory).is_dir():
        # A save was interrupted between its two renames: the backup is the last
        # complete checkpoint.
        directory = _backup(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: the directory does not exist")
    present = _verify(directory)
    config = _read_config(directory)
    weights = _read_weights(directory)
    if model is None:
        model = Seq2SeqTransformer.from_config(config)
        model.eval()
    else:
        _check_config(config, _model_config(model), directory)
    _check_weights(model, weights, directory)
    model.load_state_dict(weights, strict=True)
    for stem, target in ((_OPTIMIZER, optimizer), (_SCHEDULER, scheduler)):
        if target is None:
            continue
        if f"{stem}.json" not in present:
            raise CheckpointError(f"{directory} holds no {stem} state ({stem}.json is absent)")
        try:
            target.load_state_dict(_read_state(directory, stem, present))
        except (KeyError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"the {stem} state in {directory} does not fit the given {stem}: {err}"
            ) from None
    meta = _read_state(directory, _META, present)
    if not isinstance(meta, dict):
        raise CheckpointError(f"damaged: {_META}.json in {directory} (not an object)")
    return model, meta
