"""The files of a checkpoint directory: where it is, its JSON documents and its safetensors shards.

``resolve_checkpoint`` turns a path or a hub id already in the local Hugging Face cache into a
directory, ``read_config`` and ``read_json`` read its UTF-8 JSON with an error that names the
file, and ``safetensors_files`` lists the weight files (the shards its index names, or every
``*.safetensors``). A model is also planned from its config.json alone, with no weights at hand
(``engine/planning.config_spec``), so these stand apart from ``index``, which lays the tensors out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tierflow.errors import CheckpointError


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; expected a model directory holding config.json and *.safetensors")
    text = str(path_or_hub_id)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(text, local_files_only=True))
        except Exception as exc:  # huggingface_hub raises several unrelated types here
            raise CheckpointError(
                f"{text!r} is neither a local directory nor a model in the local Hugging Face cache ({exc}). "
                f"Download it first (for example `hf download {text}`) or pass the model directory.") from exc
    raise CheckpointError(f"model directory {str(path)!r} does not exist; pass a directory holding config.json "
                          "and *.safetensors, or a hub id already in the local Hugging Face cache")


def read_config(path: Path) -> dict[str, Any]:
    """A config.json as a dict: CheckpointError if it is missing, unreadable, not UTF-8, not
    JSON (or nested too deep to parse), or not a JSON object. Its keys are checked later, by
    ``adapters.model_from_config``."""
    try:
        config = read_json(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path.parent} has no config.json; expected a Hugging Face model directory") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(config).__name__}; the file is corrupt "
                              "or not a Hugging Face config.json")
    return config


def read_json(path: Path) -> Any:
    """A UTF-8 JSON file's document; CheckpointError naming the file for anything else
    (FileNotFoundError passes through, for the caller to say what is missing)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                              "the file is corrupt — download it again") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
                              "the file is corrupt — download it again") from exc
    except (ValueError, RecursionError) as exc:     # an integer of over 4300 digits; arrays nested too deep
        raise CheckpointError(f"{path} cannot be parsed as JSON ({exc}); the file is corrupt") from exc


def safetensors_files(directory: Path) -> list[Path]:
    index_path = directory / "model.safetensors.index.json"
    if index_path.exists():
        doc = read_json(index_path)
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_path} is not a valid safetensors index: expected an object whose "
                                  "'weight_map' maps tensor names to shard file names; download the checkpoint again")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory}: shard(s) {missing} named in {index_path.name} are missing; "
                                  "download the checkpoint again")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in directory.iterdir())[:10]
        raise CheckpointError(f"{directory} holds no *.safetensors files (found {found}); tierflow reads "
                              "safetensors checkpoints in place — convert .bin/.gguf checkpoints first")
    return files
