"""Hand-written s_tir schedule rules for the PrimFuncs of a prepared Relax module.

Input: a module from ``hwopt.lowering.relax_import.prepare`` (fused, legalized, conv2d in
NHWC/HWIO).  float32 exp/erf/tanh and small integer powers are first rewritten into vectorizable
code (``fastmath``).  Each PrimFunc is scheduled by the first rule in ``RULES`` that matches
it; a rule offers a few parameter sets (best first by an analytic estimate) and ``pick`` may
choose among them, e.g. by measuring (``hwopt.schedules.measure``).  A rule that fails falls back
to its next candidate, then the next rule; a func no rule can schedule is returned unchanged.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import tvm
from tvm import tirx

from .conv2d import Conv2dNHWC
from .dense import Dense, GroupedDense
from .fastmath import use_fast_math
from .injective import Injective
from .int8 import I16, VNNI, Conv2dNHWCDot, DenseDot, prepack_weights
from .measure import measure_func, measuring_pick
from .reduction import Reduction
from .sparse import SparseIndexed
from .sparse_block import SparseBlockConv, SparseBlockLinear

log = logging.getLogger("hwopt")

__all__ = ["RULES", "Choice", "Rule", "measure_func", "measuring_pick", "schedule_func",
           "schedule_module"]


@dataclass(frozen=True)
class Choice:
    """What was chosen for one PrimFunc (JSON-serialisable via ``dataclasses.asdict``)."""

    rule: str
    params: tuple = ()

    @staticmethod
    def of(rule: str, params: dict) -> Choice:
        return Choice(rule, tuple(sorted((str(k), int(v)) for k, v in params.items())))


class Rule(Protocol):
    name: str

    def match(self, func: tirx.PrimFunc) -> bool: ...

    def candidates(self, func: tirx.PrimFunc, lanes: int) -> list[dict]: ...

    def apply(self, func: tirx.PrimFunc, params: dict, lanes: int) -> tirx.PrimFunc: ...


# The sparse rules match only the kernels of pruned layers (hwopt.lowering.sparse,
# sparse_block), the integer rules only int16 x int16 or uint8 x int8 -> int32 blocks (quantized
# layers), the grouped rule only grouped matmuls (hwopt.lowering.grouped, mixtures of experts);
# they come before the general rules.
RULES: list[Rule] = [SparseBlockConv(), SparseBlockLinear(), SparseIndexed(), Conv2dNHWCDot(VNNI),
                     DenseDot(VNNI), Conv2dNHWCDot(I16), DenseDot(I16), Conv2dNHWC(),
                     GroupedDense(), Dense(), Reduction(), Injective()]

Pick = Callable[[str, tirx.PrimFunc, Rule, list], dict | None]


def _matches(rule: Rule, func: tirx.PrimFunc) -> bool:
    try:
        return rule.match(func)
    except Exception:  # noqa: BLE001 - an odd func simply does not match
        return False


def _try(rule: Rule, func: tirx.PrimFunc, params: dict, lanes: int):
    try:
        return rule.apply(func, params, lanes)
    except Exception as err:  # noqa: BLE001 - fall back to the next candidate
        log.debug("schedule rule %s%s failed: %s", rule.name, params,
                  str(err).splitlines()[0][:200])
        return None


def schedule_func(func: tirx.PrimFunc, lanes: int = 16, params: dict | None = None,
                  rule_name: str | None = None) -> tuple[tirx.PrimFunc, Choice]:
    """Schedule one PrimFunc with the first rule that applies. Never raises.

    float32 exp/erf/tanh are first replaced by vectorizable polynomials (``fastmath``).
    """
    try:
        func = use_fast_math(func)
    except Exception as err:  # noqa: BLE001 - keep the libm calls
        log.debug("fast math rewrite failed: %s", str(err).splitlines()[0][:200])
    for rule in RULES:
        if rule_name is not None and rule.name != rule_name:
            continue
        if not _matches(rule, func):
            continue
        try:
            cands = rule.candidates(func, lanes)
        except Exception:  # noqa: BLE001
            cands = []
        for p in ([params] if params else []) + [c for c in cands if c != params]:
            out = _try(rule, func, p, lanes)
            if out is not None:
                return out, Choice.of(rule.name, p)
    if rule_name is not None:
        return schedule_func(func, lanes, None)
    return func, Choice("none", ())


def schedule_module(mod: tvm.IRModule, lanes: int = 16, pick: Pick | None = None,
                    override: dict | None = None) -> tuple[tvm.IRModule, dict[str, Choice]]:
    """Schedule every PrimFunc of ``mod``.

    ``pick(name, func, rule, candidates)`` may choose the params of each func. ``override``
    maps func names to PrimFuncs scheduled elsewhere (MetaSchedule, hwopt.schedules.metaschedule),
    used as they are.
    """
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    choices: dict[str, Choice] = {}
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc):
            continue
        if override and gv.name_hint in override:
            mod[gv] = override[gv.name_hint]
            choices[gv.name_hint] = Choice("metaschedule", ())
            continue
        params, rule_name = None, None
        try:
            func = use_fast_math(func)
        except Exception as err:  # noqa: BLE001 - keep the libm calls
            log.debug("fast math rewrite of %s failed: %s", gv.name_hint, err)
        if pick is not None:
            rule = next((r for r in RULES if _matches(r, func)), None)
            if rule is not None:
                try:
                    params = pick(gv.name_hint, func, rule, rule.candidates(func, lanes))
                    rule_name = rule.name
                except Exception as err:  # noqa: BLE001
                    log.warning("schedule pick for %s failed: %s", gv.name_hint, err)
        scheduled, choice = schedule_func(func, lanes, params, rule_name)
        if choice.rule == "none":
            log.warning("no schedule rule applies to %s; it stays unscheduled (slow)", gv.name_hint)
        mod[gv] = scheduled
        choices[gv.name_hint] = choice
    return prepack_weights(mod, choices)  # int8 kernels: weights packed at compile time
