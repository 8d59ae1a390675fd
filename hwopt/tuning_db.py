"""Tuning database: the schedule parameters chosen per kernel, persisted across runs.

Used in the *lower* step. A kernel is keyed by the structural hash of its PrimFunc, the TVM target
and the vector width. Choices measured once (``tune="measure"``) are reused by every later compile,
measured or not. Stored as one JSON file in the cache directory; a corrupt file is ignored.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("hwopt")


class TuningDB:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path else None
        self.records: dict[str, dict] = {}
        if self.path and self.path.exists():
            try:
                self.records = json.loads(self.path.read_text())
                if not isinstance(self.records, dict):
                    raise ValueError("not a JSON object")
            except Exception as e:
                log.warning("hwopt: ignoring unreadable tuning database %s (%s)", self.path, e)
                self.records = {}

    @staticmethod
    def key(func, target: str, lanes: int) -> str:
        import tvm_ffi

        return f"{tvm_ffi.structural_hash(func) & (2**64 - 1):x}:{target}:{lanes}"

    def get(self, key: str) -> dict | None:
        rec = self.records.get(key)
        return dict(rec["params"]) if rec else None

    def put(self, key: str, rule: str, params: dict, seconds: float) -> None:
        self.records[key] = {"rule": rule, "params": params, "seconds": seconds}
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tuning-")
            with os.fdopen(fd, "w") as f:
                json.dump(self.records, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as e:
            log.warning("hwopt: could not save tuning database %s: %s", self.path, e)
