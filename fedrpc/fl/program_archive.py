"""Read and write ``torch.export`` programs (``.pt2`` archives) as bytes.

``torch.export.load`` is not a safe parser: besides the JSON graph and raw
weight buffers, a ``.pt2`` archive may carry pickled tensors, pickled custom
objects, sample inputs it unpickles with ``weights_only=False`` after a
failed weights-only attempt, and AOTInductor shared libraries it loads into
the process. Programs therefore come only from authenticated org admins,
never from devices. As defence in depth, :func:`load_program` first reads the
archive with :mod:`zipfile` and refuses anything but the plain layout that
``torch.export.save`` writes for a model without custom objects: stored (not
compressed) entries under one root, JSON configs, raw weight and constant
buffers, and sample inputs that load with ``weights_only=True``. That closes
the unpickling routes of torch 2.13's loader. The graph deserializer itself
is not made safe here: the server calls this only in its sandbox process,
under memory and time limits (:mod:`fedrpc.services.artifact_sandbox`).
"""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from typing import Any

from fedrpc.fl._errors import InvalidInput

__all__ = ["load_program", "save_program"]

# Entries torch.export.save (torch 2.13) writes for the model named "model",
# relative to the archive's root folder.
_ALLOWED_ENTRY = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
    r"|models/model\.json|data/sample_inputs/model\.pt"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+"
)
_REQUIRED = (
    "archive_format",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
)


def _refuse(reason: str) -> InvalidInput:
    return InvalidInput(f"program_data is not a plain torch.export.save archive: {reason}")


def _entries(data: bytes) -> dict[str, bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise _refuse("not a zip archive") from exc
    roots = {info.filename.split("/", 1)[0] for info in infos}
    if len(roots) != 1 or len({info.filename for info in infos}) != len(infos):
        raise _refuse("entries must sit under one root folder, each name once")
    root = roots.pop() + "/"
    entries: dict[str, bytes] = {}
    for info in infos:
        relative = info.filename.removeprefix(root)
        if not _ALLOWED_ENTRY.fullmatch(relative):
            raise _refuse(f"unexpected entry {relative[:80]!r}")
        # torch writes stored entries; refusing compression rules out zip bombs.
        if info.compress_type != zipfile.ZIP_STORED:
            raise _refuse("compressed entries are not accepted")
        try:
            entries[relative] = archive.read(info)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise _refuse("an entry cannot be read") from exc
    for name in _REQUIRED:
        if name not in entries:
            raise _refuse(f"missing entry {name!r}")
    if entries["archive_format"] != b"pt2":
        raise _refuse("unknown archive format")
    return entries


def _payload_config(entries: dict[str, bytes], name: str) -> dict[str, Any]:
    try:
        config = json.loads(entries[name])["config"]
    except (ValueError, KeyError, TypeError) as exc:
        raise _refuse(f"{name} is not a payload config") from exc
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise _refuse(f"{name} is not a payload config")
    return config


def _check_archive(data: bytes) -> None:
    import torch

    entries = _entries(data)
    weights = _payload_config(entries, "data/weights/model_weights_config.json")
    constants = _payload_config(entries, "data/constants/model_constants_config.json")
    for meta in (*weights.values(), *constants.values()):
        if meta.get("use_pickle", True) is not False:
            raise _refuse("pickled weights or constants are not accepted")
    for meta in constants.values():
        if not str(meta.get("path_name", "")).startswith("tensor_"):
            raise _refuse("custom-object constants are not accepted")
    try:
        torch.load(io.BytesIO(entries["data/sample_inputs/model.pt"]), weights_only=True)
    except Exception as exc:  # torch would retry with weights_only=False: refuse instead
        raise _refuse("sample inputs are not plain tensors") from exc


# torch.export's (de)serializer and exporter keep process-global state
# (``_CURRENT_DESERIALIZER``): two threads loading programs at once fail with
# "_CURRENT_DESERIALIZER is already set" (seen with two aggregations at once).
# Every torch.export call of this package holds this lock.
TORCH_EXPORT_LOCK = threading.RLock()


def load_program(data: bytes) -> Any:
    """Load an ``ExportedProgram`` saved by ``torch.export.save``.

    Raises
    ------
    InvalidInput
        The bytes are not a plain ``.pt2`` archive (see the module docstring)
        or torch cannot deserialize the program.
    """
    import torch

    _check_archive(data)
    try:
        with TORCH_EXPORT_LOCK:
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # deserializer errors of every kind
        raise InvalidInput(
            "program_data cannot be loaded by torch.export.load (saved by another torch version?)"
        ) from exc


def save_program(program: Any) -> bytes:
    """Serialize an ``ExportedProgram`` with ``torch.export.save``."""
    import torch

    buffer = io.BytesIO()
    with TORCH_EXPORT_LOCK:
        torch.export.save(program, buffer)
    return buffer.getvalue()
