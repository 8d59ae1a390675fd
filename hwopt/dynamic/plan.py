"""The host plan: a compiled graph's control flow as data (JSON), its interpreter, and `load`.

Sits in the *run* step and in ``Artifact.save`` (hwopt.aot). `to_plan` walks the lowered module
(an FX graph whose ``call_module`` nodes are TVM regions, PyTorch fallbacks and the control-flow
modules of hwopt.dynamic.control) and writes each node as a step: ``region`` (a saved TVM
library, by its manifest name), ``aten`` (an op left on the host, by its ATen name), ``getitem``,
``cond`` / ``while`` (nested plans or regions per branch), ``bucketed`` (padded sizes -> region),
``call`` (a nested plan), ``const`` (a tensor in host_consts.pt), ``host`` (a function of
hwopt.dynamic.grouped, by name). An artifact compiled for
dynamic input shapes has instead a ``shape_variants`` entry (hwopt.dynamic.variants): the
buckets, the input axes to pad and a sub-folder per variant. No model code is needed to run
it: `load(folder)` reads manifest.json, host_plan.json and the region libraries and returns a
callable that picks branches from the plan.
"""
from __future__ import annotations

import json
import logging
import operator
from pathlib import Path

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from hwopt.dynamic.buckets import Bucketed, padded
from hwopt.dynamic.control import CondOp, IslandOp, WhileOp
from hwopt.dynamic.grouped import HOST_FUNCTIONS
from hwopt.errors import HwoptError
from hwopt.host_threads import single_torch_thread

log = logging.getLogger("hwopt")
PLAN_VERSION = 1
_PY_OPS = {f"operator.{k}": getattr(operator, k) for k in
           ("getitem", "ge", "le", "gt", "lt", "eq", "ne", "add", "sub", "mul", "floordiv")}


class PlanError(HwoptError):
    """A graph node that the host plan cannot express (the artifact still runs in Python)."""


def _enc(v):
    if isinstance(v, fx.Node):
        return {"ref": v.name}
    if isinstance(v, (list, tuple)):
        return [_enc(x) for x in v]
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.layout):
        return {"layout": str(v).removeprefix("torch.")}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise PlanError(f"cannot serialize argument {v!r} ({type(v).__name__})")


def _dec(v, env):
    if isinstance(v, list):
        return [_dec(x, env) for x in v]
    if isinstance(v, dict):
        if "ref" in v:
            return env[v["ref"]]
        (kind, name), = v.items()
        return getattr(torch, name)
    return v


def to_plan(module, prefix: str = "", consts: dict | None = None) -> tuple[dict, dict]:
    """(plan, constants) of a lowered module; region names are the manifest's dotted names."""
    consts = {} if consts is None else consts
    from hwopt.lowering.region import TVMRegion

    if isinstance(module, TVMRegion):
        return {"inputs": None, "steps": [], "region": _region(module, prefix or
                                                               "hwopt_region_0")}, consts
    if not isinstance(module, fx.GraphModule):
        raise PlanError(f"{prefix or 'graph'}: {type(module).__name__} is not a graph or region")
    inputs, steps, outputs = [], [], None
    for n in module.graph.nodes:
        if n.op == "placeholder":
            inputs.append(n.name)
        elif n.op == "get_attr":
            key = f"{prefix}{n.target}"
            from hwopt.graph import constant_value

            consts[key] = constant_value(module, n).detach().contiguous()
            steps.append({"op": "const", "key": key, "out": n.name})
        elif n.op == "call_function":
            steps.append(_function_step(n))
        elif n.op == "call_module":
            sub = module.get_submodule(str(n.target))
            step = _module_step(sub, f"{prefix}{n.target}", consts)
            step.update(args=_enc(list(n.args)), out=n.name)
            steps.append(step)
        elif n.op == "output":
            outputs = _enc(n.args[0])
    return {"inputs": inputs, "steps": steps, "outputs": outputs}, consts


def _region(region, name: str) -> dict:
    return {"name": name, "single": bool(region.single_output)}


def _function_step(n: fx.Node) -> dict:
    if isinstance(n.target, torch._ops.OpOverload):
        target = f"{n.target.namespace}::{n.target._opname}.{n.target._overloadname}"
        return {"op": "aten", "target": target, "args": _enc(list(n.args)),
                "kwargs": {k: _enc(v) for k, v in n.kwargs.items()}, "out": n.name}
    fn = getattr(n.target, "__name__", "")
    if HOST_FUNCTIONS.get(fn) is n.target:
        return {"op": "host", "target": fn, "args": _enc(list(n.args)), "out": n.name}
    name = f"operator.{fn}"
    if name in _PY_OPS:
        return {"op": "py", "target": name, "args": _enc(list(n.args)), "out": n.name}
    raise PlanError(f"node {n.name}: {n.target} has no host-plan form (only ATen ops and "
                    "operator.* run on the host)")


def _callee(mod, name: str, consts: dict) -> dict:
    from hwopt.lowering.region import TVMRegion

    if isinstance(mod, TVMRegion):
        return {"region": _region(mod, name)}
    return {"plan": to_plan(mod, name + ".", consts)[0]}


def _module_step(sub, name: str, consts: dict) -> dict:
    from hwopt.lowering.region import TVMRegion

    if isinstance(sub, TVMRegion):
        return {"op": "region", "region": _region(sub, name)}
    if isinstance(sub, CondOp):
        return {"op": "cond", "true": _callee(sub.true_branch, f"{name}.true_branch", consts),
                "false": _callee(sub.false_branch, f"{name}.false_branch", consts)}
    if isinstance(sub, WhileOp):
        return {"op": "while", "n_carried": sub.n_carried, "max_iterations": sub.max_iterations,
                "cond": _callee(sub.cond_fn, f"{name}.cond_fn", consts),
                "body": _callee(sub.body_fn, f"{name}.body_fn", consts)}
    if isinstance(sub, IslandOp):
        return {"op": "call", "plan": to_plan(sub.graph, f"{name}.graph.", consts)[0]}
    if isinstance(sub, Bucketed):
        # buckets PyTorch measured faster are left out: they run the eager plan, unpadded
        compiled = {str(b): _callee(getattr(sub, f"b{b}"), f"{name}.b{b}", consts)
                    for b in sub.buckets if hasattr(sub, f"b{b}")
                    and sub._runs_tvm(b, getattr(sub, f"b{b}"))}
        return {"op": "bucketed", "dyn_in": list(sub.dyn_in), "dyn_out": list(sub.dyn_out),
                "eager": to_plan(sub.sub, f"{name}.sub.", consts)[0], "compiled": compiled,
                "sizes": [b for b in sub.buckets if hasattr(sub, f"b{b}")]}
    if isinstance(sub, fx.GraphModule):
        return {"op": "call", "plan": to_plan(sub, f"{name}.", consts)[0]}
    raise PlanError(f"module {name} ({type(sub).__name__}) has no host-plan form")


class PlanRunner:
    """Runs a host plan; `regions` maps manifest names to callables (TVM regions)."""

    def __init__(self, plan: dict, consts: dict, regions: dict):
        self.plan, self.consts, self.regions = plan, consts, regions
        self.calls: dict[str, int] = {}  # per branch taken / loop iterations, for tests

    def __call__(self, *inputs) -> tuple:
        # host steps between TVM regions: one PyTorch thread (see hwopt.host_threads)
        mixed = bool(self.regions) and "region" not in self.plan
        with torch.no_grad(), single_torch_thread(mixed):
            return _flat(self.run(self.plan, list(inputs)))

    def _count(self, key: str, k: int = 1) -> None:
        self.calls[key] = self.calls.get(key, 0) + k

    def _region(self, spec: dict, args: list) -> tuple:
        out = self.regions[spec["name"]](*args)
        return (out,) if spec["single"] else tuple(out)

    def _invoke(self, callee: dict, args: list) -> tuple:
        if "region" in callee:
            return self._region(callee["region"], args)
        return _flat(self.run(callee["plan"], args))

    def run(self, plan: dict, args: list) -> tuple:
        if "region" in plan:
            return self._region(plan["region"], args)
        env = dict(zip(plan["inputs"], args))
        for step in plan["steps"]:
            env[step["out"]] = self._step(step, env)
        out = _dec(plan["outputs"], env)  # a tuple when the graph returns one, else a tensor
        return tuple(out) if isinstance(out, list) else out

    def _step(self, step: dict, env: dict):
        op = step["op"]
        if op == "const":
            return self.consts[step["key"]]
        args = _dec(step.get("args", []), env)
        if op == "aten":
            ns, rest = step["target"].split("::")
            name, overload = rest.split(".")
            fn = getattr(getattr(getattr(torch.ops, ns), name), overload)
            return fn(*args, **{k: _dec(v, env) for k, v in step["kwargs"].items()})
        if op == "py":
            return _PY_OPS[step["target"]](*args)
        if op == "host":
            return HOST_FUNCTIONS[step["target"]](*args)
        if op == "region":
            out = self._region(step["region"], args)
            return out[0] if step["region"]["single"] else out
        if op == "call":
            return self.run(step["plan"], args)
        if op == "cond":
            take = bool(args[0])
            self._count(f"{step['out']}:{'true' if take else 'false'}")
            return self._invoke(step["true" if take else "false"], args[1:])
        if op == "while":
            return self._while(step, args)
        if op == "bucketed":
            return self._bucketed(step, args)
        raise PlanError(f"unknown host-plan step {op!r} (plan version {PLAN_VERSION})")

    def _while(self, step: dict, args: list) -> tuple:
        k = step["n_carried"]
        carried, extra = list(args[:k]), list(args[k:])
        steps = 0
        while bool(self._invoke(step["cond"], carried + extra)[0]):
            carried = list(self._invoke(step["body"], carried + extra))
            steps += 1
            if steps > step["max_iterations"]:
                raise HwoptError(f"while_loop {step['out']} ran more than "
                                 f"{step['max_iterations']} iterations")
        self._count(f"{step['out']}:iterations", steps)
        return tuple(carried)

    def _bucketed(self, step: dict, args: list) -> tuple:
        dyn_in, dyn_out = tuple(step["dyn_in"]), tuple(step["dyn_out"])
        n = args[dyn_in[0]].shape[0]
        sizes = sorted(int(b) for b in step.get("sizes", step["compiled"]))
        b = next((s for s in sizes if s >= n), None)
        if n == 0 or b is None or str(b) not in step["compiled"]:
            return _flat(self.run(step["eager"], args))
        out = self._invoke(step["compiled"][str(b)], padded(args, dyn_in, b))
        return tuple(o[:n] if i in dyn_out else o for i, o in enumerate(out))


def _flat(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def save_plan(artifact, folder: Path) -> list[str]:
    """Write host_plan.json and host_consts.pt for `artifact` into `folder`; returns the file
    names ([] with a warning when the graph has a node the plan cannot express)."""
    try:
        plan, consts = to_plan(artifact.compiled.module)
    except PlanError as e:
        log.warning("hwopt: no host plan saved: %s", e)
        return []
    def dump(spec):
        return pytree.treespec_dumps(spec) if spec is not None else None

    doc = {"version": PLAN_VERSION, "plan": plan, "in_spec": dump(artifact.in_spec),
           "out_spec": dump(artifact.out_spec)}
    (folder / "host_plan.json").write_text(json.dumps(doc, indent=1))
    torch.save(consts, folder / "host_consts.pt")
    return ["host_plan.json", "host_consts.pt"]


class LoadedArtifact:
    """A saved artifact, run from its files: TVM libraries + host plan (see `load`)."""

    def __init__(self, folder: Path, manifest: dict, runner: PlanRunner, in_spec, out_spec):
        self.folder, self.manifest, self.runner = folder, manifest, runner
        self.in_spec, self.out_spec = in_spec, out_spec
        self.input_shapes = [tuple(s) for s in manifest.get("inputs", [])]

    def __call__(self, *args, **kwargs):
        flat, _ = pytree.tree_flatten((args, kwargs))
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        got = [tuple(t.shape) for t in tensors]
        if self.input_shapes and got != self.input_shapes:
            raise HwoptError(f"inputs of shapes {got} do not match the shapes the artifact in "
                             f"{self.folder} was compiled for, {self.input_shapes}")
        out = self.runner(*tensors)
        return pytree.tree_unflatten(list(out), self.out_spec) if self.out_spec is not None else out


def load(folder):
    """Load an artifact saved by ``Artifact.save`` on the machine its target runs on."""
    import hwopt.lowering.grouped  # noqa: F401 - registers hwopt::grouped_mm for eager steps
    from hwopt.lowering.region import TVMRegion
    from hwopt.target import get_target

    folder = Path(folder)
    if not (folder / "host_plan.json").exists():
        raise HwoptError(f"{folder} has no host_plan.json: save it with hwopt.compile(model, "
                         "inputs).save(folder) (a graph the plan cannot express has none)")
    manifest = json.loads((folder / "manifest.json").read_text())
    doc = json.loads((folder / "host_plan.json").read_text())
    if doc.get("version") != PLAN_VERSION:
        raise HwoptError(f"{folder}/host_plan.json has version {doc.get('version')}, this "
                         f"hwopt reads version {PLAN_VERSION}; compile the model again")
    if "shape_variants" in doc:  # one variant per shape bucket (hwopt.dynamic.variants)
        from hwopt.dynamic.variants import load_variants

        return load_variants(folder, doc)
    target = get_target(manifest["target"])
    if not target.runs_here():
        raise HwoptError(f"{folder} holds code for target {target.name!r}, which does not run "
                         "on this machine")
    low = target.lowering
    regions = {}
    for r in manifest["regions"]:
        if r.get("files"):
            vm = low.load(folder, r["files"])
            regions[r["name"]] = TVMRegion(vm, False, low, files=(folder, r["files"]),
                                           target_name=target.name,
                                           index_checks=r.get("index_checks", ()))
    _single_outputs(doc["plan"], regions)
    consts = torch.load(folder / "host_consts.pt", weights_only=True)
    runner = PlanRunner(doc["plan"], consts, regions)
    spec = pytree.treespec_loads
    return LoadedArtifact(folder, manifest, runner,
                          spec(doc["in_spec"]) if doc.get("in_spec") else None,
                          spec(doc["out_spec"]) if doc.get("out_spec") else None)


def _single_outputs(node, regions: dict) -> None:
    """Set each loaded region's output form (one tensor or a tuple) from the plan."""
    if isinstance(node, dict):
        if "name" in node and "single" in node and node["name"] in regions:
            regions[node["name"]].single_output = node["single"]
        for v in node.values():
            _single_outputs(v, regions)
    elif isinstance(node, list):
        for v in node:
            _single_outputs(v, regions)
