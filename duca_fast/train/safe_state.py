"""Trainer state on disk without pickle: loading a checkpoint never runs code from it.

A nested state (optimizer and scheduler ``state_dict``s, RNG states) is split into its tensors (written
with safetensors) and everything else (written as JSON), with a few tags for what JSON lacks: tuples,
dicts with non-string keys, NumPy arrays and the tensors' places. Reading parses JSON and safetensors
only; an unknown tag is an error, never a lookup of a Python name.

torch.distributed.checkpoint (the sharded checkpoints of multi-rank runs) pickles its ``.metadata``
and the non-tensor leaves of a state dict; ``SafeReader`` unpickles the metadata with an allow-list of
the checkpoint library's own record classes, and ``SafeLoadPlanner`` loads the leaves with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

TAG = "__duca_state__"
"""Key of a tagged JSON object; a plain dict that holds this key is itself written tagged."""


class StateFormatError(ValueError):
    """A state file holds something this format does not produce (edited or foreign)."""


def encode_state(state: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Split ``state`` into its JSON document and its tensors (fresh contiguous CPU copies).

    Raises TypeError naming the place of any value that is not a tensor, NumPy array, number, string,
    bool, None, list, tuple or dict.
    """
    tensors: dict[str, torch.Tensor] = {}
    document = {"format": 1, "state": _encode(state, tensors, "state")}
    # Copies: safetensors refuses tensors that share storage (views of one buffer).
    return document, {k: t.detach().cpu().contiguous().clone() for k, t in tensors.items()}


def decode_state(document: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state ``encode_state`` split into ``document`` (parsed JSON) and ``tensors`` (safetensors)."""
    if not isinstance(document, dict) or document.get("format") != 1 or "state" not in document:
        raise StateFormatError("not a duca_fast trainer state (format 1)")
    return _decode(document["state"], tensors, "state")


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value
        return {TAG: "tensor", "key": key}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"{where}: NumPy arrays of kind {value.dtype.kind!r} are not supported")
        key = f"t{len(tensors)}"
        # torch has no unsigned 32/64-bit tensors everywhere; int64 holds every uint32 (the MT19937 state).
        wide = value.astype(np.int64) if value.dtype.kind in "u" else value
        tensors[key] = torch.from_numpy(np.ascontiguousarray(wide))
        return {TAG: "ndarray", "key": key, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return _encode(value.item(), tensors, where)
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and TAG not in value:
            return {k: _encode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} is not supported")
            pairs.append([k, _encode(v, tensors, f"{where}[{k!r}]")])
        return {TAG: "dict", "items": pairs}
    raise TypeError(f"{where}: a {type(value).__name__} cannot be stored in a trainer state")


def _decode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    tag = value.get(TAG)
    if tag is None:
        return {k: _decode(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
    if tag == "tensor":
        return _tensor(value, tensors, where)
    if tag == "ndarray":
        dtype = np.dtype(str(value["dtype"]))
        if dtype.kind not in "biuf":
            raise StateFormatError(f"{where}: NumPy dtype {dtype} is not one this format writes")
        return _tensor(value, tensors, where).numpy().astype(dtype)
    if tag == "tuple":
        return tuple(_decode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value["items"]))
    if tag == "dict":
        return {k: _decode(v, tensors, f"{where}[{k!r}]") for k, v in value["items"]}
    raise StateFormatError(f"{where}: unknown tag {tag!r}")


def _tensor(value: dict, tensors: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    key = value.get("key")
    if key not in tensors:
        raise StateFormatError(f"{where}: tensor {key!r} is not in the .safetensors file")
    return tensors[key]


# --- torch.distributed.checkpoint without arbitrary unpickling ---------------------------------------

_DCP_RECORD_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the record classes a torch.distributed.checkpoint ``.metadata`` file refers to."""

    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if self._allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(
                f"the checkpoint's .metadata refers to {module}.{name}, which a torch.distributed.checkpoint "
                "metadata file never needs; refusing to load it"
            )
        return found

    @staticmethod
    def _allowed(module: str, name: str) -> bool:
        if (module, name) in _ALLOWED_GLOBALS:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module in _DCP_RECORD_MODULES:
            import importlib

            obj = getattr(importlib.import_module(module), name, None)
            return isinstance(obj, type) and obj.__module__ == module
        return False


def safe_reader(path: Path):
    """A ``FileSystemReader`` whose metadata goes through the allow-listed unpickler."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            # FileSystemReader.read_metadata with pickle.load swapped for the allow-listed unpickler.
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"the .metadata file holds a {type(metadata).__name__}")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def safe_load_planner():
    """A ``DefaultLoadPlanner`` whose non-tensor leaves load with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            leaf = torch.load(value, weights_only=True)
            fqn = read_item.dest_index.fqn
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], leaf)
            else:
                self.state_dict[fqn] = leaf

    return SafeLoadPlanner()
