"""Shadow copies of model folders, for timing on a machine that cannot receive the real weights.

The GPU machine lent to this project (the `device` tool) takes at most 64 MiB per call and reaches no
model hub, while SmolLM2-135M (540 MB), all-MiniLM-L6-v2 (91 MB) and the default generator (100 MB)
are larger. Latency and throughput do not depend on the values of the weights, only on their names,
shapes and dtypes, so:

    python benchmarks/shadow.py pack SRC DEST      # here: DEST/shadow.json + the small files, copied
    python benchmarks/shadow.py unpack DEST OUT    # there: OUT = SRC with every large tensor random

`pack` copies every file up to --max-copy bytes as it is; a larger `.safetensors` file becomes its
manifest (each tensor's shape, dtype, mean and standard deviation) plus its small tensors (up to
--keep elements, e.g. gates and mixing rules) kept exactly; any other large file is left out and listed.
`unpack` writes each large tensor as mean + std * N(0, 1) (seeded) in its own dtype, so a loader sees
the same folder and every code path does the same work. Numbers measured on shadows are timings only:
anything about quality needs the real weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

MANIFEST = "shadow.json"
SMALL_SUFFIX = ".small.safetensors"


def pack(src: Path, dest: Path, max_copy: int = 4 << 20, keep: int = 65536) -> dict:
    """Write the shadow of folder `src` into `dest` (created); returns the manifest."""
    if not src.is_dir():
        raise SystemExit(f"{src} is not a folder")
    dest.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"source": str(src), "copied": [], "tensors": {}, "left_out": []}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src).as_posix()
        if path.stat().st_size <= max_copy:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
            manifest["copied"].append(rel)
        elif path.suffix == ".safetensors":
            manifest["tensors"][rel] = _pack_tensors(path, dest / (rel + SMALL_SUFFIX), keep)
        else:
            manifest["left_out"].append(rel)
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _pack_tensors(path: Path, small_file: Path, keep: int) -> dict:
    entries, small = {}, {}
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            t = f.get_tensor(name)
            if t.numel() <= keep or not t.is_floating_point():
                small[name] = t.contiguous()
                entries[name] = {"kept": True}
                continue
            x = t.float()
            entries[name] = {
                "shape": list(t.shape),
                "dtype": str(t.dtype).removeprefix("torch."),
                "mean": float(x.mean()),
                "std": float(x.std()),
            }
    small_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(small, str(small_file))
    return {"metadata": metadata, "entries": entries}


def unpack(shadow: Path, out: Path, seed: int = 0) -> Path:
    """Rebuild the folder packed into `shadow` at `out`, large tensors random."""
    manifest = json.loads((shadow / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    for rel in manifest["copied"]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shadow / rel, out / rel)
    for rel, spec in manifest["tensors"].items():
        small = load_file(str(shadow / (rel + SMALL_SUFFIX)))
        tensors = {}
        for name, entry in spec["entries"].items():
            if entry.get("kept"):
                tensors[name] = small[name]
                continue
            digest = int.from_bytes(hashlib.sha256(f"{seed}:{rel}:{name}".encode()).digest()[:4], "little")
            g = torch.Generator().manual_seed(digest)
            x = torch.randn(entry["shape"], generator=g) * entry["std"] + entry["mean"]
            tensors[name] = x.to(getattr(torch, entry["dtype"]))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / rel), metadata=spec["metadata"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="folder -> its shadow (manifest + small files)")
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--max-copy", type=int, default=4 << 20, help="files up to this many bytes are copied")
    p.add_argument("--keep", type=int, default=65536, help="tensors up to this many elements are kept")
    u = sub.add_parser("unpack", help="shadow -> a loadable folder with random large tensors")
    u.add_argument("shadow", type=Path)
    u.add_argument("out", type=Path)
    u.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "pack":
        m = pack(args.src, args.dest, args.max_copy, args.keep)
        size = sum(f.stat().st_size for f in args.dest.rglob("*") if f.is_file())
        print(
            f"{args.src} -> {args.dest}: {len(m['copied'])} files copied, {len(m['tensors'])} shadowed, "
            f"{len(m['left_out'])} left out {m['left_out']}; {size / 2**20:.1f} MiB"
        )
    else:
        print(f"wrote {unpack(args.shadow, args.out, args.seed)}")


if __name__ == "__main__":
    main()
