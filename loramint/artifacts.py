"""The default artifacts: an expert library and a generator checkpoint packed as small, checksummed files for
git, and restored from them on a fresh machine (`loramint pack-defaults` / `loramint setup`).

Layout of an artifacts folder (every file below 40 MB by default, so no git host refuses one):

    MANIFEST.json                  sha256 and size of every other file, and what each bundle restores to
    library-<name>/library.json    every expert's metadata (id, name, description, family, metrics, adapter
                                   config, ...) and the library's settings (embedding model, dimension)
    library-<name>/experts*.safetensors
                                   the experts' LoRA factors in fp16 ("<id>/<module>.lora_A" / ".lora_B"),
                                   plus each description's embedding ("<id>/embedding", fp16) for a check
    generator-<name>/pack.json     how each checkpoint file is restored
    generator-<name>/...           generator.json and the other small files as they are; model.safetensors
                                   in fp16; bank.safetensors without the experts' factors when the packed
                                   library reproduces them (derived again on restore); any safetensors file
                                   above the limit split into shards

No SQLite, FAISS or pickle files: `setup` rebuilds the library through `ExpertLibrary.add` (factors back to
float32, description embeddings recomputed with the library's encoder) and writes the checkpoint files back
(fp16 model weights to float32). A tensor too large for one file is split along dim 0 into keys
"<name>@0", "<name>@1", ... and concatenated again on restore.

`setup` checks every file against MANIFEST.json before it writes anything, builds each target in a temp
folder next to it and renames it into place, and refuses to replace a non-empty target it did not set up
from these same artifacts unless `force=True`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramint import __version__
from loramint.adapters import FP16_MAX, AdapterConfig, LoraAdapter, values_within
from loramint.errors import LoramintError
from loramint.paths import DEFAULT_GENERATOR, DEFAULT_LIBRARY, file_lock, sha256_file, staged_dir

FORMAT = "loramint-artifacts"
VERSION = 1
MANIFEST = "MANIFEST.json"
LIBRARY_INDEX = "library.json"
GENERATOR_INDEX = "pack.json"
MARKER = ".loramint-setup.json"
"""Written into each restored target: the digest of the bundle it came from (a rerun of setup skips it, also
when the manifest gained or changed another bundle)."""
MAX_FILE_BYTES = 40_000_000
"""Largest artifact file pack writes (GitHub warns at 50 MB and refuses 100 MB)."""
KEEP_FP32_NUMEL = 4096
"""Generator tensors this small stay float32 in a pack (the residual mixing rule's per-module gains: a few
hundred numbers whose rounding would move every mixture)."""
HEADER_BASE = 4096
HEADER_PER_TENSOR = 160
"""A shard's budget for its safetensors JSON header: HEADER_BASE + HEADER_PER_TENSOR + len(key) per tensor
(an entry takes ~70 bytes plus its key); the written file's size is checked anyway."""
MIN_EMBEDDING_COSINE = 0.99
"""Recomputed description embeddings below this cosine to the packed ones get a warning."""
BANK_FROM_LIBRARY_TOLERANCE = 1e-2
"""A residual generator's bank holds its experts' canonical factors: the library's experts again. When the
packed library reproduces every bank expert's ΔW (from its fp16 factors) within this relative error, the bank
is packed without them and `setup` derives them from the restored library: the factors are stored once."""

Log = Callable[[str], None]


class ArtifactError(LoramintError):
    """An artifacts folder is missing, corrupt or inconsistent, or a target cannot be written."""


def _quiet(_message: str) -> None:
    pass


# ---- shards -------------------------------------------------------------------------------------------------
def _cost(key: str, tensor: torch.Tensor) -> int:
    """Bytes a tensor adds to a shard: its data and its header entry."""
    return tensor.nbytes + HEADER_PER_TENSOR + len(key.encode())


def _split(name: str, tensor: torch.Tensor, budget: int) -> list[tuple[str, torch.Tensor]]:
    """`tensor` as it goes into shards: whole, or cut along dim 0 into "<name>@<i>" parts that each fit
    `budget` bytes (header entry included)."""
    if _cost(name, tensor) <= budget:
        return [(name, tensor)]
    room = budget - HEADER_PER_TENSOR - len(name.encode()) - 12  # the data of one part ("@" + index)
    row = tensor.nbytes // tensor.shape[0] if tensor.ndim and tensor.shape[0] else tensor.nbytes
    if tensor.ndim == 0 or tensor.shape[0] < 2 or row > room:
        raise ArtifactError(
            f"tensor {name!r} ({tensor.nbytes} bytes) cannot be split along dim 0 into parts of at most "
            f"{max(room, 0)} bytes: raise the per-file limit"
        )
    rows = room // row
    return [
        (f"{name}@{i}", tensor[start : start + rows].contiguous())
        for i, start in enumerate(range(0, tensor.shape[0], rows))
    ]


def write_shards(
    tensors: dict[str, torch.Tensor], folder: Path, stem: str, max_bytes: int = MAX_FILE_BYTES
) -> list[str]:
    """Write `tensors` (in their order) into safetensors files of at most `max_bytes` each; returns their
    names: `<stem>.safetensors` if one file is enough, else `<stem>-00001-of-0000N.safetensors`, ..."""
    budget = max_bytes - HEADER_BASE
    if budget <= HEADER_PER_TENSOR:
        raise ArtifactError(f"max_bytes must exceed {HEADER_BASE + HEADER_PER_TENSOR}, got {max_bytes}")
    groups: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, tensor in tensors.items():
        if "@" in name:
            raise ArtifactError(f"tensor name {name!r} contains '@', which marks split parts in shards")
        for key, part in _split(name, tensor.detach().cpu().contiguous(), budget):
            if groups[-1] and used + _cost(key, part) > budget:
                groups.append({})
                used = 0
            groups[-1][key] = part
            used += _cost(key, part)
    n = len(groups)
    names = (
        [f"{stem}.safetensors"]
        if n == 1
        else [f"{stem}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    )
    for name, group in zip(names, groups, strict=True):
        save_file(group, str(folder / name))
        if (size := (folder / name).stat().st_size) > max_bytes:
            raise ArtifactError(f"{name} came out at {size} bytes, above the limit {max_bytes}")
    return names


def read_shards(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors `write_shards` wrote into `paths`, split parts concatenated again."""
    whole: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for path in paths:
        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc
        for key, tensor in state.items():
            name, _, index = key.partition("@")
            if index:
                if not index.isdigit() or int(index) in parts.setdefault(name, {}):
                    raise ArtifactError(f"{path.name}: bad or repeated part key {key!r}")
                parts[name][int(index)] = tensor
            elif key in whole:
                raise ArtifactError(f"{path.name}: tensor {key!r} appears in two shards")
            else:
                whole[key] = tensor
    for name, pieces in parts.items():
        if name in whole or sorted(pieces) != list(range(len(pieces))):
            raise ArtifactError(f"tensor {name!r}: its parts are incomplete or clash with a whole tensor")
        whole[name] = torch.cat([pieces[i] for i in range(len(pieces))])
    return whole


def _to_fp16(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """fp16 copy of a float32 tensor; refuses values fp16 cannot hold."""
    if not values_within(tensor, FP16_MAX):
        if not values_within(tensor, math.inf):
            raise ArtifactError(f"{name} holds NaN or infinite values")
        raise ArtifactError(
            f"{name} holds values above fp16's range ({FP16_MAX}); it cannot be packed in fp16"
        )
    return tensor.to(torch.float16)


def _relative_error(exact: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(exact.float().norm())
    return float((exact.float() - approx.float()).norm()) / norm if norm > 0 else 0.0


# ---- pack -----------------------------------------------------------------------------------------------------
def pack_library(
    library: Path, out: Path, max_bytes: int = MAX_FILE_BYTES, log: Log = _quiet
) -> dict[str, Any]:
    """Write the library at `library` into the empty folder `out` (library.json + fp16 shards)."""
    from loramint.index import ExpertLibrary

    records, tensors, errors = [], {}, []
    with ExpertLibrary.open(library, create=False) as lib:
        experts = lib.list()
        ids, vectors = lib.embeddings()
        by_id = dict(zip(ids, vectors, strict=True))
        settings = {"embedding_model": lib.embedding_model, "dim": lib.dim}
        from tqdm.auto import tqdm

        for n, expert in enumerate(tqdm(experts, desc="packing experts", unit="expert"), 1):
            adapter = expert.load_adapter()
            for module, (a, b) in adapter.weights.items():
                a16 = _to_fp16(f"expert {expert.id}: {module}.lora_A", a)
                b16 = _to_fp16(f"expert {expert.id}: {module}.lora_B", b)
                tensors[f"{expert.id}/{module}.lora_A"] = a16
                tensors[f"{expert.id}/{module}.lora_B"] = b16
                exact = adapter.delta(module)
                errors.append(
                    _relative_error(exact, adapter.config.scaling(module) * (b16.float() @ a16.float()))
                )
            tensors[f"{expert.id}/embedding"] = torch.from_numpy(np.asarray(by_id[expert.id])).half()
            record = expert.to_dict()
            record.pop("path")
            record["adapter_config"] = asdict(adapter.config)
            record["modules"] = list(adapter.modules)
            records.append(record)
            if n % 10 == 0 or n == len(experts):
                log(f"  library: read {n}/{len(experts)} experts")
    shards = write_shards(tensors, out, "experts", max_bytes)
    index = {
        "format": "loramint-library-pack",
        "version": VERSION,
        **settings,
        "factors_dtype": "float16",
        "fp16_max_relative_delta_error": max(errors, default=0.0),
        "shards": shards,
        "experts": records,
    }
    (out / LIBRARY_INDEX).write_text(json.dumps(index, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    return {
        "experts": len(records),
        "shards": shards,
        "fp16_max_relative_delta_error": index["fp16_max_relative_delta_error"],
    }


def pack_generator(
    generator: Path,
    out: Path,
    max_bytes: int = MAX_FILE_BYTES,
    log: Log = _quiet,
    library: Path | None = None,
) -> dict[str, Any]:
    """Write the checkpoint folder `generator` into the empty folder `out`: model.safetensors' float32 tensors
    in fp16 (those of at most KEEP_FP32_NUMEL numbers as they are), every other file as it is (a safetensors
    file above `max_bytes` split into shards).

    An ensemble (gen/ensemble.py) packs each member the same way under its folder name ("member-0/...",
    flattened to "member-0--..." in `out`), except that the members of a bfloat16-decoding ensemble keep the
    tensors minting reads exactly: its decoding linear layers in bfloat16 (which is all minting reads of
    them), the other decoding tensors in float32; and a member's bank tensors equal to member 0's are stored
    once (the library's factors, ~48 MB, are the same in every member). With `library` (the library packed
    beside it), a bank's expert factors that the packed library reproduces are not stored at all
    (`BANK_FROM_LIBRARY_TOLERANCE`)."""
    meta_file = generator / "generator.json"
    if not meta_file.is_file():
        raise ArtifactError(f"{generator} is not a generator checkpoint (no generator.json)")
    meta = json.loads(meta_file.read_text())
    files: dict[str, dict[str, Any]] = {}
    errors: dict[str, float] = {}
    if meta.get("format") == "loramint-generator-ensemble":
        shutil.copyfile(meta_file, out / "generator.json")
        files["generator.json"] = {"copy": "generator.json"}
        bf16 = meta.get("decode_dtype") == "bfloat16"
        shared_from = f"{meta['members'][0]}/bank.safetensors"
        reference: dict[str, torch.Tensor] | None = None  # member 0's bank, read once for the others
        for i, rel in enumerate(meta["members"]):
            if not _safe_relative(rel) or "/" in rel:
                raise ArtifactError(f"{meta_file}: bad member folder {rel!r}")
            _pack_checkpoint(
                generator / rel,
                out,
                f"{rel}/",
                files,
                errors,
                max_bytes,
                log,
                bf16,
                reference,
                shared_from,
                library if i == 0 else None,
            )
            if i == 0:
                reference = load_file(str(generator / rel / "bank.safetensors"))
    else:
        _pack_checkpoint(generator, out, "", files, errors, max_bytes, log, library=library)
    index = {
        "format": "loramint-generator-pack",
        "version": VERSION,
        "files": files,
        "fp16_max_relative_error": max(errors.values(), default=0.0),
    }
    (out / GENERATOR_INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return {"files": sorted(files), "fp16_max_relative_error": index["fp16_max_relative_error"]}


def _bf16_decoding_keys(checkpoint: Path) -> set[str]:
    """model.safetensors keys of the linear layers a generator's decoding path runs in bfloat16 under a
    bfloat16-decoding ensemble (`LoraCVAE.decoding_linears`, as gen/ensemble.py converts them)."""
    from loramint.gen.layout import Layout
    from loramint.gen.model import GeneratorConfig, LoraCVAE

    meta = json.loads((checkpoint / "generator.json").read_text())
    model = LoraCVAE(Layout.from_json(meta["layout"]), GeneratorConfig.from_dict(meta["model"]))
    return {f"{name}.{p}" for name, layer in model.decoding_linears() for p, _ in layer.named_parameters()}


def library_bank_factors(
    library: Path, names: list[str], layout: Any, fp16: bool = False
) -> dict[str, torch.Tensor] | None:
    """The bank tensors {"factors.<group>": [N, L, dim] fp16} of the experts `names` of `library` (their
    canonical factors as layout tokens, as training stores them), or None when a name is missing or not unique.
    `fp16`: round the factors to fp16 first, as the packed library holds them."""
    from loramint.gen.canonical import canonicalize
    from loramint.index import ExpertLibrary

    with ExpertLibrary.open(library, create=False) as lib:
        by_name: dict[str, list] = {}
        for expert in lib.list():
            by_name.setdefault(expert.name, []).append(expert)
        if any(len(by_name.get(name, [])) != 1 for name in names):
            return None
        tokens = []
        for name in names:
            adapter = by_name[name][0].load_adapter()
            if fp16:
                weights = {m: (a.half().float(), b.half().float()) for m, (a, b) in adapter.weights.items()}
                adapter = LoraAdapter(adapter.config, weights)
            tokens.append(layout.to_tokens(canonicalize(adapter)))
    return {f"factors.{g}": torch.stack([t[g] for t in tokens]).half() for g in layout.groups}


def _bank_from_library(
    checkpoint: Path, state: dict[str, torch.Tensor], library: Path, log: Log
) -> dict[str, Any] | None:
    """{"keys", "max_relative_error"} when the packed `library` reproduces the bank's experts (their ΔW), else
    None."""
    from loramint.gen.layout import Layout

    meta = json.loads((checkpoint / "generator.json").read_text())
    keys = sorted(k for k in state if k.startswith("factors."))
    if not keys:
        return None
    layout = Layout.from_json(meta["layout"])
    derived = library_bank_factors(library, list(meta["bank"]), layout, fp16=True)
    if derived is None or sorted(derived) != keys:
        log(f"  generator: {checkpoint.name}: the library does not hold the bank's experts; bank kept whole")
        return None

    def adapter(tensors: dict[str, torch.Tensor], i: int) -> LoraAdapter:
        return layout.from_tokens({g: tensors[f"factors.{g}"][i].float() for g in layout.groups})

    # what minting uses is each expert's ΔW = B·A (canonical factors of a nearly repeated singular value are
    # not unique, so the factors themselves may differ by a rotation that leaves ΔW as it is)
    error = 0.0
    for i in range(len(meta["bank"])):
        stored, again = adapter(state, i), adapter(derived, i)
        error = max(error, *(_relative_error(stored.delta(m), again.delta(m)) for m in stored.modules))
    if error > BANK_FROM_LIBRARY_TOLERANCE:
        log(f"  generator: the library reproduces the bank's factors only to {error:.2e}; bank kept whole")
        return None
    log(f"  generator: bank factors derived from the packed library on restore (relative error {error:.1e})")
    return {"keys": keys, "max_relative_error": error}


def _pack_checkpoint(
    checkpoint: Path,
    out: Path,
    prefix: str,
    files: dict[str, dict[str, Any]],
    errors: dict[str, float],
    max_bytes: int,
    log: Log,
    bf16_decoding: bool = False,
    reference: dict[str, torch.Tensor] | None = None,
    shared_from: str = "",
    library: Path | None = None,
) -> None:
    decoding = _bf16_decoding_keys(checkpoint) if bf16_decoding else set()
    for path in sorted(checkpoint.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue  # setup markers, temp files of a writer
        name = prefix + path.name
        flat = name.replace("/", "--")
        model = path.name == "model.safetensors"
        shared = reference is not None and path.name == "bank.safetensors"
        derived = library is not None and path.name == "bank.safetensors"
        if not model and not shared and not derived and path.stat().st_size <= max_bytes:
            shutil.copyfile(path, out / flat)
            files[name] = {"copy": flat}
            continue
        if not name.endswith(".safetensors"):
            raise ArtifactError(
                f"{path} has {path.stat().st_size} bytes, above the per-file limit {max_bytes}"
            )
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata()
        state = load_file(str(path))
        entry: dict[str, Any] = {"metadata": metadata}
        upcast = []
        if model:
            for key, tensor in state.items():
                if tensor.dtype != torch.float32:
                    continue
                if key in decoding:  # exactly what minting reads
                    state[key] = tensor.to(torch.bfloat16)
                    upcast.append(key)
                elif bf16_decoding and key.split(".")[0] not in ("enc_in", "enc_out"):
                    continue  # read at full precision by the decoding path: as it is
                elif tensor.numel() > KEEP_FP32_NUMEL:
                    half = _to_fp16(f"{name}: {key}", tensor)
                    errors[key] = _relative_error(tensor, half)
                    state[key] = half
                    upcast.append(key)
        if derived and (found := _bank_from_library(checkpoint, state, library, log)):
            state = {k: t for k, t in state.items() if k not in found["keys"]}
            entry["from_library"] = found
        if shared:
            same = [k for k, t in state.items() if k in reference and torch.equal(t, reference[k])]
            state = {k: t for k, t in state.items() if k not in same}
            entry["shared"] = {"from": shared_from, "keys": same}
        shards = write_shards(state, out, flat.removesuffix(".safetensors"), max_bytes) if state else []
        if any(s in {e.get("copy") for e in files.values()} for s in shards):
            raise ArtifactError(f"{checkpoint}: shard names of {name} clash with another file")
        files[name] = {**entry, "shards": shards, "upcast": upcast}
        log(
            f"  generator: {name} -> {', '.join(shards) or '(all shared)'}"
            + (" (fp16/bf16)" if upcast else "")
        )


def pack_defaults(
    library: str | Path = DEFAULT_LIBRARY,
    generator: str | Path | None = DEFAULT_GENERATOR,
    out: str | Path = "artifacts",
    data: str | Path = "data",
    max_bytes: int = MAX_FILE_BYTES,
    force: bool = False,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Pack a library and a generator checkpoint (None: the library alone) into `out` (+ MANIFEST.json);
    returns a summary.

    Each bundle restores (`setup`) to its path relative to `data` (e.g. data/library-corpus ->
    "library-corpus"), or to its folder name when it lies outside `data`.
    """
    library, out, data = Path(library), Path(out), Path(data)
    generator = Path(generator) if generator is not None else None
    if out.exists() and any(out.iterdir()) and not force:
        raise ArtifactError(f"{out} exists and is not empty; pass force=True (--force) to replace it")
    bundles = {"library": {"dir": _prefixed("library", library), "target": _relative_target(library, data)}}
    if generator is not None:
        bundles["generator"] = {
            "dir": _prefixed("generator", generator),
            "target": _relative_target(generator, data),
        }
    started = time.perf_counter()
    with staged_dir(out, replace=True) as tmp:
        summary: dict[str, Any] = {}
        for kind, bundle in bundles.items():
            folder = tmp / bundle["dir"]
            folder.mkdir()
            log(f"packing {kind} {library if kind == 'library' else generator} -> {out / bundle['dir']}")
            if kind == "library":
                summary[kind] = pack_library(library, folder, max_bytes, log)
            else:
                summary[kind] = pack_generator(generator, folder, max_bytes, log, library)
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            path.chmod(0o644)  # safetensors writes 0600
            files[path.relative_to(tmp).as_posix()] = {
                "sha256": sha256_file(path),
                "bytes": path.stat().st_size,
            }
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "loramint": __version__,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "max_file_bytes": max_bytes,
            "bundles": bundles,
            "total_bytes": sum(f["bytes"] for f in files.values()),
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    missing = _check_bank(generator, library, log) if generator is not None else []
    return {
        "bank_missing": missing,
        **summary,
        "out": str(out),
        "files": files,
        "total_bytes": manifest["total_bytes"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _prefixed(kind: str, path: Path) -> str:
    """The bundle's folder in the artifacts: data/library-corpus -> library-corpus,
    data/generator/corpus -> generator-corpus."""
    return path.name if path.name.startswith(kind) else f"{kind}-{path.name}"


def _relative_target(path: Path, data: Path) -> str:
    try:
        return path.absolute().relative_to(data.absolute()).as_posix()
    except ValueError:
        return path.name


def _check_bank(generator: Path, library: Path, log: Log) -> list[str]:
    """Warn when the generator's bank names experts (by id or name) the packed library lacks."""
    from loramint.index import ExpertLibrary

    try:
        bank = json.loads((generator / "generator.json").read_text()).get("bank") or []
    except (OSError, ValueError):
        return []
    with ExpertLibrary.open(library, create=False) as lib:
        known = {key for e in lib.list() for key in (e.id, e.name)}
    missing = [name for name in bank if name not in known]
    if missing:
        log(
            f"warning: the generator's bank names {len(missing)} experts the library lacks, e.g. {missing[:3]}"
        )
    return missing


# ---- verify ---------------------------------------------------------------------------------------------------
def read_manifest(artifacts: str | Path) -> tuple[dict[str, Any], str]:
    """(MANIFEST.json of `artifacts`, its sha256), with its structure checked."""
    path = Path(artifacts) / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"no {MANIFEST} in {Path(artifacts).absolute()}: run `loramint setup` from the repository root, "
            "or pass --artifacts <folder>"
        )
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a loramint artifacts manifest")
    if manifest.get("version") != VERSION:
        raise ArtifactError(
            f"{path} has version {manifest.get('version')!r}; this loramint reads version {VERSION}"
        )
    files, bundles = manifest.get("files"), manifest.get("bundles")
    if not isinstance(files, dict) or not isinstance(bundles, dict) or not bundles:
        raise ArtifactError(f"{path} lists no files or no bundles")
    for name in files:
        if not _safe_relative(name):
            raise ArtifactError(f"{path} lists an unsafe path {name!r}")
    for kind, bundle in bundles.items():
        if (
            kind not in ("library", "generator")
            or not _safe_relative(bundle.get("dir", ""))
            or not _safe_relative(bundle.get("target", ""))
        ):
            raise ArtifactError(f"{path}: bad bundle {kind!r}: {bundle}")
    return manifest, hashlib.sha256(raw).hexdigest()


def bundle_digest(manifest: dict[str, Any], kind: str) -> str:
    """sha256 of one bundle: its target and the names and sha256 of its files (not of the whole manifest, so
    packing another bundle next to it does not make a restored one stale)."""
    bundle = manifest["bundles"][kind]
    prefix = bundle["dir"].rstrip("/") + "/"
    lines = [f"{kind}\t{bundle['target']}"]
    lines += [f"{n}\t{e['sha256']}" for n, e in sorted(manifest["files"].items()) if n.startswith(prefix)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _safe_relative(name: str) -> bool:
    parts = Path(name).parts
    return bool(parts) and isinstance(name, str) and not Path(name).is_absolute() and ".." not in parts


def verify(artifacts: str | Path, manifest: dict[str, Any], log: Log = _quiet) -> int:
    """Check every file of the manifest (size, then sha256); raises naming every bad file. Returns bytes."""
    artifacts = Path(artifacts)
    bad = []
    total = 0
    for name, entry in manifest["files"].items():
        path = artifacts / name
        if not path.is_file():
            bad.append(f"{name}: missing")
            continue
        size = path.stat().st_size
        total += size
        if size != entry["bytes"]:
            hint = ""
            with open(path, "rb") as f:
                if f.read(40).startswith(b"version https://git-lfs"):
                    hint = " (a Git LFS pointer: run `git lfs pull`)"
            bad.append(f"{name}: {size} bytes, the manifest says {entry['bytes']}{hint}")
        elif sha256_file(path) != entry["sha256"]:
            bad.append(f"{name}: sha256 mismatch")
    if bad:
        raise ArtifactError(
            f"{len(bad)} artifact file(s) in {artifacts} fail verification, nothing was written: "
            + "; ".join(bad)
        )
    log(f"verified {len(manifest['files'])} files ({total / 1e6:.1f} MB) against {MANIFEST}")
    return total


# ---- setup ----------------------------------------------------------------------------------------------------
def setup(
    artifacts: str | Path = "artifacts",
    data: str | Path = "data",
    force: bool = False,
    log: Log = _quiet,
    progress: bool = False,
) -> dict[str, Any]:
    """Verify `artifacts` and restore each bundle under `data`; see the module docstring. Returns a summary."""
    artifacts, data = Path(artifacts), Path(data)
    started = time.perf_counter()
    manifest, digest = read_manifest(artifacts)
    verify(artifacts, manifest, log)
    _plan(manifest, data, force)  # refuse before touching `data` at all
    data.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"manifest_sha256": digest}
    encoder = None
    with file_lock(data / ".setup.lock"):
        plan = _plan(manifest, data, force)  # again under the lock: another setup may have run
        for kind, bundle in manifest["bundles"].items():
            target, state = plan[kind]
            if state == "current":
                log(f"{kind}: {target} is already set up from these artifacts, skipped")
                summary[kind] = {"target": str(target), "status": "up to date"}
                continue
            t0 = time.perf_counter()
            source = artifacts / bundle["dir"]
            with staged_dir(target, replace=True) as tmp:
                if kind == "library":
                    info, encoder = _restore_library(source, tmp, manifest, bundle["dir"], log, progress)
                else:
                    library = plan["library"][0] if "library" in plan else None
                    info = _restore_generator(source, tmp, manifest, bundle["dir"], encoder, log, library)
                marker = {
                    "bundle_sha256": bundle_digest(manifest, kind),
                    "manifest_sha256": digest,
                    "bundle": bundle["dir"],
                    "restored_at": time.time(),
                }
                (tmp / MARKER).write_text(json.dumps(marker) + "\n")
            status = "restored" if state == "absent" else "replaced"
            summary[kind] = {
                "target": str(target),
                "status": status,
                **info,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            log(f"{kind}: {status} {target} in {summary[kind]['seconds']:.1f}s")
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _plan(manifest: dict[str, Any], data: Path, force: bool) -> dict[str, tuple[Path, str]]:
    """Each bundle's target and state; raises if one must not be replaced (before anything is written)."""
    plan = {}
    for kind, bundle in manifest["bundles"].items():
        target = data / bundle["target"]
        plan[kind] = (target, _state(target, bundle_digest(manifest, kind)))
        if plan[kind][1] in ("stale", "other") and not force:
            why = (
                "was set up from other artifacts" if plan[kind][1] == "stale" else "exists and was not set up"
            )
            raise ArtifactError(
                f"{target} {why}; pass --force to replace it with these artifacts (its contents will be deleted)"
            )
    return plan


def _state(target: Path, digest: str) -> str:
    """One of "absent" (missing or empty), "current" (set up from this bundle `digest`), "stale" (set up
    from another) and "other" (not written by setup)."""
    if not target.exists():
        return "absent"
    if target.is_dir() and (not any(target.iterdir()) or _empty_library(target)):
        return "absent"
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return "other"
    if not isinstance(marker, dict):
        return "other"
    return "current" if marker.get("bundle_sha256") == digest else "stale"


def _empty_library(folder: Path) -> bool:
    """Whether `folder` is an expert library holding no expert and nothing else (what `loramint serve` or
    `ExpertLibrary.open` leaves when run before setup): nothing is lost by replacing it."""
    from loramint.index.library import DB_FILE, EXPERTS_DIR

    allowed = {DB_FILE, f"{DB_FILE}-wal", f"{DB_FILE}-shm", EXPERTS_DIR, "index.faiss", "index.json", ".lock"}
    names = {p.name for p in folder.iterdir()}
    if DB_FILE not in names or not names <= allowed:
        return False
    if (folder / EXPERTS_DIR).is_dir() and any((folder / EXPERTS_DIR).iterdir()):
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{(folder / DB_FILE).as_uri()}?mode=ro", uri=True)) as conn:
            return conn.execute("SELECT COUNT(*) FROM experts").fetchone()[0] == 0
    except sqlite3.Error:
        return False


def _member(manifest: dict[str, Any], folder: Path, bundle_dir: str, name: str) -> Path:
    """An artifact file a bundle index refers to: it must be one the manifest lists (hence verified)."""
    if not _safe_relative(name) or f"{bundle_dir}/{name}" not in manifest["files"]:
        raise ArtifactError(f"{bundle_dir}: refers to {name!r}, which {MANIFEST} does not list")
    return folder / name


def _read_index(
    manifest: dict[str, Any], folder: Path, bundle_dir: str, name: str, fmt: str
) -> dict[str, Any]:
    path = _member(manifest, folder, bundle_dir, name)
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != fmt or index.get("version") != VERSION:
        raise ArtifactError(f"{path} is not a {fmt} version {VERSION} file")
    return index


def _restore_library(
    source: Path, tmp: Path, manifest: dict[str, Any], bundle_dir: str, log: Log, progress: bool
) -> tuple[dict[str, Any], Any]:
    from tqdm.auto import tqdm

    from loramint.encoders import Encoder
    from loramint.index import ExpertLibrary
    from loramint.models import canonical_name, prepare

    index = _read_index(manifest, source, bundle_dir, LIBRARY_INDEX, "loramint-library-pack")
    experts = index["experts"]
    tensors = read_shards([_member(manifest, source, bundle_dir, s) for s in index["shards"]])
    for base in sorted({canonical_name(e["base_model"]) for e in experts}):
        log(f"library: preparing base model {base} (the first time: download and conversion)")
        prepare(base)
    log(f"library: loading encoder {index['embedding_model']}")
    encoder = Encoder(index["embedding_model"])
    if encoder.dim != index["dim"]:
        raise ArtifactError(
            f"encoder {index['embedding_model']!r} gives {encoder.dim}-d vectors, the library has {index['dim']}"
        )
    log(f"library: embedding {len(experts)} descriptions")
    vectors = encoder.encode([e["description"] for e in experts]) if experts else np.zeros((0, encoder.dim))
    cosines = []
    with ExpertLibrary.open(tmp, encoder=encoder) as lib:
        for record, vector in tqdm(
            list(zip(experts, vectors, strict=True)), desc="experts", unit="expert", disable=not progress
        ):
            eid = record["id"]
            try:
                weights = {
                    m: (tensors[f"{eid}/{m}.lora_A"].float(), tensors[f"{eid}/{m}.lora_B"].float())
                    for m in record["modules"]
                }
            except KeyError as exc:
                raise ArtifactError(f"{bundle_dir}: the shards lack tensor {exc} of expert {eid!r}") from exc
            adapter = LoraAdapter(AdapterConfig(**record["adapter_config"]), weights)
            lib.add(
                adapter,
                id=eid,
                name=record["name"],
                description=record["description"],
                family=record.get("family", ""),
                metrics=record.get("metrics") or {},
                embedding=vector,
                created_at=record.get("created_at"),  # as packed: a repack of a restore is byte-identical
            )
            if (packed := tensors.get(f"{eid}/embedding")) is not None:
                cosines.append(
                    float(
                        np.dot(vector, packed.float().numpy())
                        / max(np.linalg.norm(packed.float().numpy()), 1e-12)
                    )
                )
        n = len(lib)
    min_cos = min(cosines, default=1.0)
    if min_cos < MIN_EMBEDDING_COSINE:
        log(
            f"warning: recomputed description embeddings differ from the packed library's (min cosine "
            f"{min_cos:.4f}): is the encoder or sentence-transformers a different version?"
        )
    return {"experts": n, "min_embedding_cosine": round(min_cos, 6)}, encoder


def _restore_generator(
    source: Path,
    tmp: Path,
    manifest: dict[str, Any],
    bundle_dir: str,
    encoder: Any,
    log: Log,
    library: Path | None = None,
) -> dict[str, Any]:
    from loramint.gen.layout import Layout
    from loramint.gen.minter import Minter

    index = _read_index(manifest, source, bundle_dir, GENERATOR_INDEX, "loramint-generator-pack")
    for name, entry in index["files"].items():  # an ensemble's member files: "member-0/model.safetensors"
        if not _safe_relative(name) or name.count("/") > 1:
            raise ArtifactError(f"{bundle_dir}/{GENERATOR_INDEX}: bad file name {name!r}")
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        if "copy" in entry:
            shutil.copyfile(_member(manifest, source, bundle_dir, entry["copy"]), tmp / name)
            continue
        state = read_shards([_member(manifest, source, bundle_dir, s) for s in entry["shards"]])
        if shared := entry.get("shared"):  # tensors equal to another member's file, restored before this one
            if not _safe_relative(shared["from"]) or not (tmp / shared["from"]).is_file():
                raise ArtifactError(f"{bundle_dir}/{GENERATOR_INDEX}: {name} shares from {shared['from']!r}")
            other = load_file(str(tmp / shared["from"]))
            state = {**{k: other[k] for k in shared["keys"]}, **state}
        if derived := entry.get("from_library"):  # the bank's factors, from the library restored before it
            folder = name.rpartition("/")[0]
            meta_entry = index["files"].get(f"{folder}/generator.json" if folder else "generator.json", {})
            if "copy" not in meta_entry or library is None or not (library / MARKER).is_file():
                raise ArtifactError(f"{bundle_dir}: {name} needs the library restored beside it")
            meta = json.loads(_member(manifest, source, bundle_dir, meta_entry["copy"]).read_text())
            factors = library_bank_factors(library, list(meta["bank"]), Layout.from_json(meta["layout"]))
            if factors is None or sorted(factors) != sorted(derived["keys"]):
                raise ArtifactError(f"{bundle_dir}: the restored library lacks experts of {name}")
            state = {**state, **factors}
            log(f"generator: {name}: {len(meta['bank'])} experts' factors from the library")
        for key in entry.get("upcast", []):
            state[key] = state[key].float()
        save_file(state, str(tmp / name), metadata=entry.get("metadata"))
        log(f"generator: wrote {name}" + (" (fp16/bf16 -> float32)" if entry.get("upcast") else ""))
    meta = json.loads((tmp / "generator.json").read_text())
    same = encoder is not None and meta.get("encoder", "").lower() == str(encoder.name).lower()
    minter = Minter.from_pretrained(tmp, encoder=encoder if same else None)
    probe = minter.mint("Answer the question about the text.")
    probe.validate()
    log(f"generator: loads and mints (bank of {len(minter.bank)} experts, rank {probe.config.r})")
    return {"bank": len(minter.bank), "files": sorted(index["files"])}
