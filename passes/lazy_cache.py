"""lazy_cache: reuse the residuals of repeated transformer blocks between denoising steps (lossy).

A diffusion sampler calls the same transformer once per step, and consecutive steps differ little
(LazyDiT, DeepCache, FORA). This pass finds the repeated blocks of the captured ATen graph from
``node.meta["nn_module_stack"]`` (recorded by torch.export, kept by hwopt.capture): the children
``<list>.0 .. <list>.N`` of one ModuleList, of one type, called in order. Each block's nodes move
into a submodule behind a `hwopt.step_cache.LazyBlock`; a ``hwopt::step_begin`` custom op on the
timestep input resets the shared `StepCache` when a new sampling run starts. At run time a block
whose input moved less than its threshold (relative L1) since it was last computed returns
``input + cached residual``.

Thresholds are calibrated from ``calibration`` (model inputs of a few sampling runs, in step
order; a timestep that does not go down starts a new run): per block, the median step-to-step
input change is measured, and one scale on those medians is searched so that the outputs over each
run keep the quality target (PSNR or cosine vs full compute) and no single call exceeds the pass
tolerance. Without calibration, a conservative fixed threshold is used.

Lowering: LazyBlocks are ``call_module`` nodes and ``step_begin`` has no TVM converter, so the
partitioner leaves both in PyTorch and the code around them goes to TVM. Runs after ``fuse``.
A graph without repeated blocks is returned unchanged with a note.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.fx as fx

from hwopt.errors import OptionError
from hwopt.pass_base import Pass, PassContext, PassResult, register_pass, relative_error
from hwopt.step_cache import LazyBlock, StepCache, step_begin  # noqa: F401 (registers the op)

log = logging.getLogger("hwopt")
_INDEXED = re.compile(r"^(.*)\.(\d+)$")
_TIMESTEP = re.compile(r"(^|_)(t|ts|timesteps?|sigmas?|time)(_\d+)?(_|$)", re.IGNORECASE)


@dataclass(frozen=True)
class LazyCacheConfig:
    metric: str = "psnr"  # quality target measure over a calibration run: "psnr" | "cosine"
    target: float = 30.0  # dB for psnr, similarity (e.g. 0.999) for cosine
    default_threshold: float = 0.02  # relative L1 input change, used without calibration
    scales: tuple = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # searched on the medians
    # No threshold above this: an input that moved by as much as its own size is a different
    # input, however insensitive the calibration runs made the block look.
    max_threshold: float = 1.0
    # Calibration keeps every call within this share of the pass tolerance, leaving headroom
    # for inputs it has not seen (the observer checks the tolerance again after the pass).
    tolerance_share: float = 0.9
    refine: int = 3  # bisection steps between the last scale that passed and the first that failed
    # Then, block by block, the threshold is doubled while the target still holds (the blocks
    # of one kind differ in how much their reuse costs): at most this many extra trials.
    block_trials: int = 64
    max_bytes: int = 1 << 30  # bound on the cached tensors
    reset_on_repeat: bool = True  # a repeated timestep also starts a new run
    timestep_input: int | None = None  # index of the timestep input; None = found by name
    min_blocks: int = 2


@register_pass("lazy_cache", lossless=False, tolerance=0.1, after=("fuse",))
class LazyCache(Pass):
    def __init__(self, **config):
        self.config = LazyCacheConfig(**config)
        if self.config.metric not in ("psnr", "cosine"):
            raise OptionError(f"pass_config['lazy_cache']['metric'] must be 'psnr' or 'cosine', "
                              f"got {self.config.metric!r}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        blocks = sorted((b for group in find_block_groups(gm, cfg.min_blocks) for b in group),
                        key=lambda b: min(order[n] for n in b[1]))
        if not blocks:
            return PassResult(gm, False, ["no repeated blocks found (nn_module_stack): unchanged"])
        ts = _timestep_node(gm, cfg.timestep_input)
        notes = []
        if ts is None:
            notes.append("no timestep input found: the cache resets only via hwopt.reset_cache "
                         "or a shape change (set pass_config timestep_input)")
        plans = []
        for path, nodes in blocks:
            plan = _plan_block(gm, nodes, ts, outputs_ok=True)
            if isinstance(plan, str):
                notes.append(f"block {path} left as is: {plan}")
            else:
                plans.append((path, plan))
        if not plans:  # checked before any rewrite: an unsupported graph is left untouched
            return PassResult(gm, False, notes + ["no block could be cached"])
        cache = StepCache([cfg.default_threshold] * len(plans), cfg.max_bytes,
                          cfg.reset_on_repeat)
        gm.add_submodule("_hwopt_step_cache", cache)
        token = _insert_step_begin(gm, ts, cache)
        for index, (_, plan) in enumerate(plans):
            call = _rewrite_block(gm, plan, token, cache, index)
            for _, later in plans[index + 1:]:  # a block's output is the next one's input
                later.inputs = [call if a is plan.out else a for a in later.inputs]
        gm.graph.eliminate_dead_code()
        gm.recompile()
        notes.append(f"cached {len(plans)} block(s): {', '.join(p for p, _ in plans)}")
        tol = ctx.tolerance if ctx.tolerance is not None else self.tolerance
        if ctx.calibration:
            kinds = [0 if plan.residual else 1 for _, plan in plans]
            notes.append(calibrate(gm, cache, ctx.calibration, ts, cfg, tol, kinds))
        else:
            notes.append(f"no calibration: threshold {cfg.default_threshold} for every block")
        cache.reset()
        cache.stats.__init__()
        return PassResult(gm, True, notes)


def find_blocks(gm: fx.GraphModule, min_blocks: int = 2) -> list[tuple[str, list[fx.Node]]]:
    """The repeated blocks: (module path, its nodes in graph order), of the ModuleList whose
    same-typed children ``.0 .. .N`` cover the most nodes."""
    groups = find_block_groups(gm, min_blocks)
    return groups[0] if groups else []


def find_block_groups(gm: fx.GraphModule, min_blocks: int = 2) -> list[list]:
    """Every ModuleList of same-typed children ``.0 .. .N`` (N + 1 >= min_blocks), largest first,
    keeping only lists that share no node with a larger one: a DiT has one (its transformer
    blocks), a UNet one per up/down/mid block (their resnets and attentions)."""
    groups: dict[tuple[str, str], dict[int, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for path, typ in stack.values():
            m = _INDEXED.match(str(path))
            if m:
                groups.setdefault((m.group(1), str(typ)), {}).setdefault(
                    int(m.group(2)), []).append(node)
    found = []
    for (prefix, _), members in groups.items():
        if len(members) < min_blocks or sorted(members) != list(range(len(members))):
            continue
        found.append((sum(len(v) for v in members.values()), prefix, members))
    found.sort(key=lambda f: (-f[0], f[1]))
    taken: set = set()
    out = []
    for _, prefix, members in found:
        nodes = {n for v in members.values() for n in v}
        if nodes & taken:
            continue
        taken |= nodes
        out.append([(f"{prefix}.{i}", members[i]) for i in sorted(members)])
    return out


def _timestep_node(gm: fx.GraphModule, index: int | None) -> fx.Node | None:
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if index is not None:
        return phs[index]
    for n in phs:
        val = n.meta.get("val")
        small = isinstance(val, torch.Tensor) and val.dim() <= 1
        if small and _TIMESTEP.search(n.name.strip("_").removeprefix("l_")):
            return n
    return None


def _insert_step_begin(gm: fx.GraphModule, ts: fx.Node | None, cache: StepCache) -> fx.Node:
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(ts if ts is not None else last_ph):
        if ts is None:  # still a token, so the blocks have an input to order them
            ts = gm.graph.call_function(torch.ops.aten.zeros.default, ([0],),
                                        {"dtype": torch.float32})
    with gm.graph.inserting_after(ts):
        node = gm.graph.call_function(torch.ops.hwopt.step_begin.default, (ts, cache.cache_id))
    node.meta["val"] = torch.empty((), dtype=torch.int64, device="meta")
    node.meta["hwopt_keep_in_torch"] = True
    return node


@dataclass
class _Plan:
    nodes: list  # the block's nodes, in graph order
    inputs: list  # its non-constant inputs
    out: fx.Node  # its one output
    primary: int  # the input whose change decides reuse (the residual's base, if residual)
    exact: list  # integer inputs (other than the timestep) that must match for reuse
    residual: bool = True  # cache output - input; False: cache the output itself


def _plan_block(gm: fx.GraphModule, nodes: list[fx.Node], ts: fx.Node | None,
                outputs_ok: bool = False) -> _Plan | str:
    """How to cut `nodes` out as one block, or why it cannot be. The block's residual is cached
    when an input has the output's shape and dtype; otherwise, with `outputs_ok`, its output,
    reused while its largest floating-point input (e.g. the concatenated skip connection of a
    UNet up-block resnet) barely moved (DeepCache)."""
    inside = set(nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(order[n] for n in nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        return f"{len(outputs)} outputs (one expected)"
    out = outputs[0]
    if any(order[u] < last for u in out.users if u not in inside):
        return "its output is used between its nodes (not a contiguous region)"
    inputs = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
    val = out.meta.get("val")
    primary = next((i for i, a in enumerate(inputs) if _same(a.meta.get("val"), val)), None)
    residual = primary is not None
    if not residual and outputs_ok:
        floats = [(v.numel(), -i) for i, a in enumerate(inputs)
                  if isinstance(v := a.meta.get("val"), torch.Tensor) and v.is_floating_point()]
        primary = -max(floats)[1] if floats else None
    if primary is None:
        return "no input with the output's shape and dtype (no residual to cache)"
    exact = [i for i, a in enumerate(inputs) if a is not ts and _is_int(a.meta.get("val"))]
    return _Plan(sorted(nodes, key=order.__getitem__), inputs, out, primary, exact, residual)


def _rewrite_block(gm: fx.GraphModule, plan: _Plan, token: fx.Node, cache: StepCache,
                   index: int) -> fx.Node:
    """Move the block's nodes into a LazyBlock submodule called where the block ended."""
    sub = _subgraph(gm, plan.nodes, plan.inputs, plan.out)
    name = f"_hwopt_lazy_block_{index}"
    gm.add_submodule(name, LazyBlock(sub, cache, index, plan.primary, plan.exact,
                                         plan.residual))
    with gm.graph.inserting_after(plan.nodes[-1]):
        call = gm.graph.call_module(name, (token, *plan.inputs))
    call.meta["val"] = plan.out.meta.get("val")
    call.meta["hwopt_keep_in_torch"] = True
    plan.out.replace_all_uses_with(call)
    for n in reversed(plan.nodes):
        gm.graph.erase_node(n)
    return call


def _is_int(v) -> bool:
    return isinstance(v, torch.Tensor) and not v.dtype.is_floating_point and not v.is_complex()


def _same(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.shape == b.shape and a.dtype == b.dtype)


def _subgraph(gm: fx.GraphModule, nodes, inputs, out) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in env and a.op == "get_attr":
                env[a] = graph.get_attr(a.target)
                env[a].meta = dict(a.meta)
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output((env[out],))  # canonical form: a flat tuple out
    return fx.GraphModule(gm, graph, class_name="DiTBlock")


# -- calibration ------------------------------------------------------------------------------
def _runs(batches: list, ts_index: int | None) -> list[list[tuple]]:
    """Split calibration batches into sampling runs where the timestep does not go down."""
    runs, last = [], None
    for b in batches:
        b = tuple(b)
        t = float(b[ts_index].reshape(-1)[0]) if ts_index is not None else None
        if not runs or (t is not None and last is not None and t >= last):
            runs.append([])
        runs[-1].append(b)
        last = t
    return runs


def quality(got: list, want: list, metric: str) -> float:
    """PSNR (dB, peak = range of the reference) or cosine similarity over a whole run."""
    g = torch.cat([_first(o).reshape(-1) for o in got]).double()
    w = torch.cat([_first(o).reshape(-1) for o in want]).double()
    if metric == "cosine":
        return float(torch.nn.functional.cosine_similarity(g, w, dim=0))
    mse = float(((g - w) ** 2).mean())
    peak = float(w.max() - w.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _first(o):
    return o[0] if isinstance(o, (tuple, list)) else o


def _sampler_steps(run: list[tuple], ref: list, lat: int) -> list | None:
    """Per step k, (a, b) with x[k+1] = a*x[k] + b*out[k] fitted by least squares over the
    elements: exact for deterministic first-order samplers (DDIM, Euler, DPM-Solver-1). None
    when the fit is poor (a stochastic or higher-order sampler): replays are then open-loop."""
    coeffs = []
    for k in range(len(run) - 1):
        x, e, nxt = (run[k][lat].double().reshape(-1), _first(ref[k]).double().reshape(-1),
                     run[k + 1][lat].double().reshape(-1))
        sol = torch.linalg.lstsq(torch.stack([x, e], 1), nxt[:, None]).solution[:, 0]
        fit = sol[0] * x + sol[1] * e
        if float((fit - nxt).norm() / nxt.norm().clamp_min(1e-30)) > 1e-3:
            return None
        coeffs.append((float(sol[0]), float(sol[1])))
    return coeffs


def _replay(gm, cache, run: list[tuple], lat: int | None, coeffs) -> tuple[list, list]:
    """Run a calibration run through `gm` from a fresh cache: (outputs, latents seen)."""
    cache.reset()
    outs, lats = [], []
    x = run[0][lat] if lat is not None else None
    for k, batch in enumerate(run):
        if coeffs is not None:
            batch = batch[:lat] + (x,) + batch[lat + 1:]
        lats.append(batch[lat] if lat is not None else None)
        outs.append(gm(*batch))
        if coeffs is not None and k < len(coeffs):
            a, b = coeffs[k]
            x = (a * x.double() + b * _first(outs[-1]).double()).to(x.dtype)
    return outs, lats


def _latent_index(gm: fx.GraphModule) -> int | None:
    """The input the sampler updates: the placeholder with the output's shape and dtype."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    val = _first(out).meta.get("val") if isinstance(_first(out), fx.Node) else None
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return next((i for i, n in enumerate(phs) if _same(n.meta.get("val"), val)), None)


def _score(gm, cache, runs, refs, lat, coeffs, metric) -> tuple[float, float]:
    """(worst run quality, worst single-call relative error) of the cached model."""
    q, err = math.inf, 0.0
    for run, ref, c in zip(runs, refs, coeffs):
        outs, lats = _replay(gm, cache, run, lat, c)
        if c is not None:  # closed loop: the latents the sampler reached, vs full compute
            q = min(q, quality(lats[-1:], [run[-1][lat]], metric))
        else:
            q = min(q, quality(outs, ref, metric))
        err = max([err] + [relative_error(a, b) for a, b in zip(outs, ref)])
    return q, err


@torch.no_grad()
def calibrate(gm: fx.GraphModule, cache: StepCache, batches, ts: fx.Node | None,
              cfg: LazyCacheConfig, tolerance: float | None, kinds: list | None = None) -> str:
    """Set per-block thresholds: scale * (block's median step-to-step input change), with the
    largest scale whose replays of the calibration runs keep the quality target. `kinds[i]`
    groups the blocks (residual caches, output caches): one scale per kind, searched in turn
    with the later kinds off, so that the lossier kind does not hold the other one back; then
    each block's threshold is doubled while the target holds (`block_trials` trials in all)."""
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    runs = _runs(list(batches), phs.index(ts) if ts is not None else None)
    lat = _latent_index(gm)
    n = len(cache.thresholds)
    kinds = kinds or [0] * n
    cache.enabled, cache.record = False, [[] for _ in range(n)]
    refs = [_replay(gm, cache, run, None, None)[0] for run in runs]
    medians = [float(torch.tensor(r).median()) if r else 0.0 for r in cache.record]
    cache.enabled, cache.record = True, None
    coeffs = [_sampler_steps(r, o, lat) if lat is not None and len(r) > 1 else None
              for r, o in zip(runs, refs)]
    scale = {k: 0.0 for k in kinds}
    mult = [1.0] * n

    def thresholds():
        return [min(scale[k] * f * m, cfg.max_threshold)
                for k, f, m in zip(kinds, mult, medians)]

    def trial():
        cache.thresholds = thresholds()
        cache.stats.__init__()
        q, err = _score(gm, cache, runs, refs, lat, coeffs, cfg.metric)
        log.debug("hwopt: lazy_cache scales %s: quality %.3g, max call error %.3g, skipped "
                  "%.0f%%", scale, q, err, 100 * cache.stats.skipped_share)
        ok = q >= cfg.target and (tolerance is None or err <= cfg.tolerance_share * tolerance)
        return ok, (q, err, cache.stats.skipped_share)

    best_q = None
    for kind in sorted(set(kinds)):
        best, failed = None, None
        for s in cfg.scales:
            scale[kind] = s
            ok, score = trial()
            if not ok:
                failed = s
                break
            best, best_q = s, score
        for _ in range(cfg.refine if best is not None and failed is not None else 0):
            scale[kind] = (best + failed) / 2
            ok, score = trial()
            if ok:
                best, best_q = scale[kind], score
            else:
                failed = scale[kind]
        scale[kind] = best or 0.0
    budget = cfg.block_trials
    for i in sorted(range(n), key=lambda i: (kinds[i], i)):
        while budget > 0 and scale[kinds[i]] > 0 and thresholds()[i] < cfg.max_threshold:
            budget -= 1
            mult[i] *= 2
            ok, score = trial()
            if not ok:
                mult[i] /= 2
                break
            best_q = score
    loop = "closed-loop" if all(c is not None for c in coeffs) else "open-loop"
    cache.thresholds = thresholds()
    if best_q is None:
        return (f"calibration on {len(runs)} {loop} run(s): no scale meets {cfg.metric} >= "
                f"{cfg.target}; caching off (thresholds 0)")
    q, err, skipped = best_q
    scales = ", ".join(f"{scale[k]:.3g}" for k in sorted(scale))
    return (f"calibration on {len(runs)} {loop} run(s): scale {scales} on per-block median input "
            f"changes, {cfg.metric} {q:.3g} (target {cfg.target}), max call error {err:.3g}, "
            f"{100 * skipped:.0f}% of block evaluations skipped; thresholds "
            f"{[round(t, 4) for t in cache.thresholds]}")
