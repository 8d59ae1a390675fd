"""Exceptions raised by hwopt. Messages name the node, the op, the target and the fix."""
from __future__ import annotations


class HwoptError(Exception):
    """Base class of every hwopt error."""


class OptionError(HwoptError, ValueError):
    """A bad option key or value; the message lists the valid ones."""


class LoweringError(HwoptError):
    """A graph region could not be lowered or built for the target."""

    def __init__(self, message: str, *, node: str | None = None, op: str | None = None,
                 target: str | None = None):
        parts = [message]
        if node is not None:
            parts.append(f"node={node}")
        if op is not None:
            parts.append(f"op={op}")
        if target is not None:
            parts.append(f"target={target}")
        super().__init__("; ".join(parts))
        self.node, self.op, self.target = node, op, target


class PassError(HwoptError):
    """A pass failed its requires/ensures check or raised."""


def did_you_mean(value: str, valid: list[str] | tuple[str, ...]) -> str:
    """A ' Did you mean X?' suffix when a close match exists."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(v) for v in valid], n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
