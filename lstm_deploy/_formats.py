"""What a weights file is, from its content alone: nothing in it is run or unpickled.

An extension says only what a file was meant to be; `lstm_deploy.weights` names what it is
(an ONNX model, a TorchScript archive, a pickled module...) when it is not what a loader takes.
"""

from __future__ import annotations

import json
import pickletools
import zipfile
from pathlib import Path
from typing import IO

# ModelProto's top-level fields (onnx.proto) and their protobuf wire types: 0 varint, 2 bytes.
_ONNX_FIELDS = {1: 0, 5: 0, 2: 2, 3: 2, 4: 2, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2, 26: 2}


def pickled_globals(path: Path) -> tuple[list[str], bool]:
    """The classes and functions a checkpoint's pickle names, in order, and whether it pickles an
    nn.Module.

    An object's class comes before its state, and a module's state holds `_parameters` and
    `_modules`. pickletools only disassembles the opcodes: nothing in the file runs.
    """
    names: list[str] = []
    strings: list[str] = []

    def scan(f: IO[bytes]) -> None:
        for op, arg, _ in pickletools.genops(f):
            if op.name == "GLOBAL":  # protocol 2 spells builtins the Python 2 way
                names.append(str(arg).replace(" ", ".").replace("__builtin__.", "builtins."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(".".join(strings[-2:]))
            elif isinstance(arg, str):
                strings.append(arg)

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next(n for n in z.namelist() if n.rsplit("/", 1)[-1] == "data.pkl")
                with z.open(member) as f:
                    scan(f)
        else:  # torch.save's legacy format: magic number, protocol, sys info, then the object
            with path.open("rb") as f:
                for _ in range(4):
                    scan(f)
    except Exception:  # not a pickle, or past its end: keep what was read
        pass
    return names, "_parameters" in strings and "_modules" in strings


def file_format(path: Path, config_key: str) -> str | None:
    """What the file is, or None if none of these: "onnx", "torchscript", "torch.export",
    "torch" (a torch.save pickle), "safetensors", or "lstm-deploy safetensors" (with `config_key`
    in its metadata)."""
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                members = {n.rsplit("/", 1)[-1] for n in z.namelist()}
        except (zipfile.BadZipFile, OSError):
            return None
        # torch's own test for TorchScript (serialization._is_torchscript_zip).
        for member, kind in (
            ("constants.pkl", "torchscript"),
            ("archive_format", "torch.export"),
            ("data.pkl", "torch"),
        ):
            if member in members:
                return kind
        return None
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        # safetensors: an 8-byte little-endian header length, then a JSON header.
        n = int.from_bytes(head, "little")
        if 2 <= n <= min(size - 8, 100 << 20):
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                header = None
            if isinstance(header, dict):
                metadata = header.get("__metadata__") or {}
                return "lstm-deploy safetensors" if config_key in metadata else "safetensors"
        if head[0] == 0x80 and 2 <= head[1] <= 5:  # a pickle's PROTO opcode
            return "torch"
        return "onnx" if _is_onnx_model(f, size) else None


def _is_onnx_model(f: IO[bytes], size: int) -> bool:
    """Whether the file parses, to its end, as ONNX ModelProto's top-level fields, with a graph.

    ONNX files have no magic number; a protobuf's field tags are all there is.
    """
    f.seek(0)
    seen: set[int] = set()
    for _ in range(10_000):  # a model has a few dozen top-level fields: opsets, metadata
        if f.tell() == size:
            return {1, 7} <= seen  # ir_version and graph
        tag, value = _varint(f), _varint(f)
        if tag is None or value is None or _ONNX_FIELDS.get(tag >> 3) != tag & 7:
            return False
        if tag & 7 == 2:
            if f.tell() + value > size:
                return False
            f.seek(value, 1)
        seen.add(tag >> 3)
    return False


def _varint(f: IO[bytes]) -> int | None:
    value = 0
    for shift in range(0, 70, 7):
        byte = f.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
    return None
