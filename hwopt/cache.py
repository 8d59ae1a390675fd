"""On-disk compile cache, keyed by content: graph code, constants, shapes, target, options and
versions.

Sits at the end of the *lower* step: a built region is stored as a TVM shared library plus a
``meta.json``; compiling the same model again (in a new process too) loads it instead of building.
Entries are written atomically and checked on load (sha256 of the library, recorded in meta.json):
a corrupt or partial entry is ignored with a warning and rebuilt, never loaded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.fx as fx

log = logging.getLogger("hwopt")
FORMAT = 1


def versions() -> dict:
    import tvm

    from hwopt import __version__

    return {"hwopt": __version__, "torch": torch.__version__, "tvm": tvm.__version__,
            "format": FORMAT}


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(t.shape)}{t.dtype}".encode())
    if t.numel():
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def graph_key(gm: fx.GraphModule, example_inputs, extra: dict) -> str:
    """Content key of a graph region: code, constant values, input shapes/dtypes, `extra`."""
    h = hashlib.sha256()
    h.update(gm.code.encode())
    for name, buf in sorted(gm.state_dict(keep_vars=True).items()):
        h.update(name.encode())
        h.update(tensor_digest(buf).encode())
    for x in example_inputs:
        h.update(f"{tuple(x.shape)}:{x.dtype};".encode())
    h.update(json.dumps({**extra, **versions()}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class CompileCache:
    def __init__(self, root: Path | None):
        self.root = Path(root) if root else None

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, key: str) -> tuple[dict, Path | None] | None:
        """(meta, library path or None) for a valid entry, else None (corrupt ones are dropped)."""
        if self.root is None:
            return None
        d = self._dir(key)
        meta_path = d / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            lib = d / meta["library"] if meta.get("library") else None
            if lib is not None and _sha(lib) != meta["library_sha256"]:
                raise ValueError("library checksum mismatch")
            if meta.get("key") != key:
                raise ValueError("key mismatch")
            return meta, lib
        except Exception as e:
            warnings.warn(f"hwopt: ignoring corrupt compile-cache entry {d} ({e}); rebuilding",
                          stacklevel=2)
            shutil.rmtree(d, ignore_errors=True)
            return None

    def store(self, key: str, meta: dict, executable=None) -> Path | None:
        """Write an entry atomically; returns the library path (or None). Never raises."""
        if self.root is None:
            return None
        d = self._dir(key)
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
            meta = dict(meta, key=key)
            if executable is not None:  # a TVM executable, or anything with .export(path)
                if hasattr(executable, "export_library"):
                    executable.export_library(str(tmp / "lib.so"))
                else:
                    executable.export(tmp / "lib.so")
                meta["library"] = "lib.so"
                meta["library_sha256"] = _sha(tmp / "lib.so")
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
            return d / "lib.so" if executable is not None else None
        except OSError as e:
            log.warning("hwopt: could not write compile cache %s: %s", d, e)
            return None
