"""Small facts computed once per machine and TVM version, kept as JSON in the cache dir.

Asking LLVM about the host CPU or listing the ops TVM's importer converts needs TVM's compiler
library, which takes 1.5 s to load; a compile-cache hit otherwise never loads it (see
hwopt.lowering.runtime). Used by targets/cpu.py and hwopt.lowering.partition.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable


def disk_memo(name: str, key: str, compute: Callable[[], Any], valid=lambda v: True) -> Any:
    """``compute()``, stored as ``<cache dir>/memo/<name>-<hash of key>.json``; a file that is
    unreadable or fails `valid` is computed again and replaced."""
    from hwopt.cache import versions
    from hwopt.options import default_cache_dir

    digest = hashlib.sha256((key + json.dumps(versions(), sort_keys=True)).encode())
    path = default_cache_dir() / "memo" / f"{name}-{digest.hexdigest()[:16]}.json"
    try:
        value = json.loads(path.read_text())
        if valid(value):
            return value
    except (OSError, ValueError):
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(value))
        os.replace(tmp, path)
    except OSError:
        pass
    return value
