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
FORMAT = 2  # 2: regions record their index checks (hwopt.lowering.guards)


def tvm_version() -> str:
    """TVM's version without importing it (its compiler library takes 1.5 s to load)."""
    import sys

    if "tvm" in sys.modules:
        return sys.modules["tvm"].__version__
    try:
        from importlib.metadata import version

        return version("apache-tvm")
    except Exception:  # a TVM built from source, not installed as the apache-tvm wheel
        import tvm

        return tvm.__version__


def versions() -> dict:
    from hwopt import __version__

    return {"hwopt": __version__, "torch": torch.__version__, "tvm": tvm_version(),
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
        """(meta, entry folder) for a valid entry, else None (corrupt ones are dropped).

        The folder holds the files listed in ``meta["files"]`` (checked against their sha256).
        """
        if self.root is None:
            return None
        d = self._dir(key)
        meta_path = d / "meta.json"
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("key") != key:
                raise ValueError("key mismatch")
            for name, digest in meta.get("files", {}).items():
                if _sha(d / name) != digest:
                    raise ValueError(f"checksum mismatch for {name}")
            return meta, d
        except Exception as e:
            warnings.warn(f"hwopt: ignoring corrupt compile-cache entry {d} ({e}); rebuilding",
                          stacklevel=2)
            shutil.rmtree(d, ignore_errors=True)
            return None

    def store(self, key: str, meta: dict, export=None) -> Path | None:
        """Write an entry atomically; returns its folder (or None). Never raises.

        `export(folder) -> [file names]` writes the compiled code into the entry's folder.
        """
        if self.root is None:
            return None
        d = self._dir(key)
        try:
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
            meta = dict(meta, key=key)
            names = list(export(tmp)) if export is not None else []
            meta["files"] = {n: _sha(tmp / n) for n in names}
            meta["file_order"] = names
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)
            os.replace(tmp, d)
            return d
        except OSError as e:
            log.warning("hwopt: could not write compile cache %s: %s", d, e)
            return None
