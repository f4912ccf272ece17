"""Adapters in and out as zip files: an uploaded zip is read member by member under limits into fixed file
names (no member name ever becomes a path), and an adapter is zipped from memory as a stock PEFT folder."""

from __future__ import annotations

import io
import json
import posixpath
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO

from loramint.adapters import CONFIG_FILE, PICKLE_SUFFIXES, WEIGHTS_FILE, LoraAdapter, serialize
from loramint.errors import AdapterError

ALLOWED = {CONFIG_FILE, WEIGHTS_FILE, "README.md"}
"""Files a PEFT folder may hold; the README is read (within limits) and dropped."""
MAX_MEMBERS = 16
MAX_RATIO = 200
"""Largest decompressed/compressed ratio of a member: safetensors of float factors compress barely at all."""
CHUNK = 1 << 16


def extract_adapter(fileobj: BinaryIO, folder: Path, max_bytes: int) -> Path:
    """Check an uploaded zip and write its adapter_config.json and adapter_model.safetensors into `folder`.

    Refused (AdapterError): not a zip; more than MAX_MEMBERS entries; absolute names, '..', backslashes,
    symlinks or other special files; a file other than a PEFT folder's (pickles named as such); nested folders;
    members together over `max_bytes` decompressed or compressed over MAX_RATIO (zip bombs), counted while
    reading, not trusted from the headers.
    """
    try:
        archive = zipfile.ZipFile(fileobj)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise AdapterError(f"the upload is not a readable zip file: {exc}") from exc
    with archive:
        members = archive.infolist()
        if len(members) > MAX_MEMBERS:
            raise AdapterError(f"the zip holds {len(members)} entries; a PEFT adapter needs 2")
        files: dict[str, zipfile.ZipInfo] = {}
        for info in members:
            name = _check_name(info)
            if info.is_dir():
                continue
            leaf = posixpath.basename(name)
            if leaf.lower().endswith(PICKLE_SUFFIXES):
                raise AdapterError(
                    f"the zip holds {name!r}, a pickle-format file: loramint never loads pickles; send "
                    f"{WEIGHTS_FILE} (safetensors)"
                )
            if leaf not in ALLOWED:
                raise AdapterError(
                    f"unexpected file {name!r} in the zip: send {CONFIG_FILE} and {WEIGHTS_FILE}"
                )
            if leaf in files:
                raise AdapterError(f"the zip holds {leaf} twice")
            files[leaf] = info
        parents = {posixpath.dirname(i.filename.rstrip("/")) for i in files.values()}
        if len(parents) > 1 or any(p.count("/") for p in parents):
            raise AdapterError("the adapter files must sit at the zip's top level or in one folder")
        for needed in (CONFIG_FILE, WEIGHTS_FILE):
            if needed not in files:
                raise AdapterError(f"the zip has no {needed}: not a PEFT adapter")
        budget = max_bytes
        for leaf, info in files.items():
            data = _read_limited(archive, info, budget)
            budget -= len(data)
            if leaf != "README.md":
                (folder / leaf).write_bytes(data)
    return folder


def _check_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    mode = info.external_attr >> 16
    if "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise AdapterError(f"refusing zip entry {name!r}: absolute or non-POSIX path")
    if any(part == ".." for part in name.split("/")):
        raise AdapterError(f"refusing zip entry {name!r}: '..' in its path")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: no type recorded (a plain file)
        raise AdapterError(f"refusing zip entry {name!r}: links and special files are not allowed")
    if info.flag_bits & 0x1:
        raise AdapterError(f"refusing zip entry {name!r}: encrypted")
    return name


def _read_limited(archive: zipfile.ZipFile, info: zipfile.ZipInfo, budget: int) -> bytes:
    limit = min(budget, max(info.compress_size, 1) * MAX_RATIO)
    out = io.BytesIO()
    try:
        with archive.open(info) as src:
            while chunk := src.read(CHUNK):
                if out.tell() + len(chunk) > limit:
                    raise AdapterError(
                        f"zip entry {info.filename!r} decompresses to more than {limit} bytes "
                        f"(limit {budget} in all, ratio {MAX_RATIO}): refused"
                    )
                out.write(chunk)
    except AdapterError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise AdapterError(f"zip entry {info.filename!r} is corrupt: {exc}") from exc
    return out.getvalue()


def zip_adapter(adapter: LoraAdapter, folder: str) -> bytes:
    """A zip holding `<folder>/adapter_config.json` + `<folder>/adapter_model.safetensors` (stock PEFT:
    `base_model_name_or_path` set, LoRA factors only)."""
    config = adapter.config.to_peft(adapter.modules)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/{CONFIG_FILE}", json.dumps(config, indent=2))
        archive.writestr(f"{folder}/{WEIGHTS_FILE}", serialize(adapter.state_dict()))
    return buffer.getvalue()
