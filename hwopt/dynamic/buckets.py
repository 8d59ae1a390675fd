"""Shape buckets for a dynamic dimension: which sizes to compile, and padding to them.

Sits between the ``split`` pass (which finds sub-networks whose leading dimension depends on data,
e.g. the tokens routed to one expert) and the *run* step. A `Bucketed` sub-network is compiled
once per bucket size; at run time its dynamic inputs are zero-padded to the smallest bucket that
holds them and its outputs sliced back, so recompiles are bounded by the number of buckets.
A bucket whose build chose PyTorch (measured faster) runs the sub-network at the exact size:
padding only pays where it buys a TVM kernel.

Padding is only used where it cannot change the real rows: every op of the sub-network must be
row-independent along the padded dimension (checked on the graph by `row_independent`, and on
numbers when the buckets are built). Bucket sizes are chosen with the cost model: the symbolic
cost (hwopt.cost_symbolic) as a function of the dynamic size, evaluated at each candidate, and the
set of at most ``max_buckets`` sizes that minimises the expected latency over sizes 1..N
(uniform unless observed sizes are given) is kept.
"""
from __future__ import annotations

import copy
import itertools
import logging

import torch
import torch.fx as fx

log = logging.getLogger("hwopt")

# Ops that treat each row (leading dimension) on its own: padded rows never touch real rows.
ROW_OPS = {"addmm", "mm", "linear", "matmul", "relu", "gelu", "silu", "sigmoid", "tanh", "add",
           "sub", "mul", "div", "neg", "exp", "erf", "pow", "rsqrt", "sqrt", "clamp", "hardtanh",
           "where", "native_layer_norm", "layer_norm", "_softmax", "softmax", "_log_softmax",
           "getitem", "view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "clone",
           "_to_copy", "hardswish", "leaky_relu", "abs", "maximum", "minimum", "permute", "t",
           "expand", "full_like", "zeros_like", "ones_like", "gt", "lt", "ge", "le", "eq"}


def _base(node: fx.Node) -> str:
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _dims(node) -> tuple:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _is_sym(s) -> bool:
    return isinstance(s, torch.SymInt)


def row_independent(nodes: list[fx.Node]) -> str | None:
    """None when padding dim 0 of the dynamic inputs cannot change the first rows of any
    output; else the reason. A node is fine when its op is row-wise (`ROW_OPS`), its output has
    the dynamic size at dim 0 only (or no dynamic size and no dynamic input: weight prep), and a
    softmax/norm does not reduce over dim 0."""
    for n in nodes:
        dims = _dims(n)
        dyn_in = any(any(_is_sym(s) for s in _dims(a)) for a in n.all_input_nodes)
        if _base(n) not in ROW_OPS:
            return f"{n.name} ({_base(n)}) is not row-wise"
        if any(_is_sym(s) for s in dims[1:]):
            return f"{n.name} has a dynamic size past dim 0"
        if dyn_in and not (dims and _is_sym(dims[0])):
            return f"{n.name} mixes the dynamic rows into a static result"
        if _base(n) in ("matmul", "mm", "addmm") and n.args:
            rhs = n.args[-1]
            if isinstance(rhs, fx.Node) and any(_is_sym(s) for s in _dims(rhs)):
                return f"{n.name} multiplies by a dynamic right-hand side"
        if _base(n) in ("_softmax", "_log_softmax") and len(n.args) > 1 and n.args[1] in (0, -len(
                dims)):
            return f"{n.name} normalises over the dynamic dimension"
    return None


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] >= rows:  # example inputs for a smaller bucket: the first rows
        return x if x.shape[0] == rows else x[:rows].clone()
    out = x.new_zeros((rows, *x.shape[1:]))
    out[:x.shape[0]] = x
    return out


def candidates(n_max: int) -> list[int]:
    """Sizes m * 2^k (m = 1, 3, 5, 7) below `n_max`, and `n_max` itself: every size up to 8,
    and above it the next candidate is under a quarter larger."""
    out = {m << k for m in (1, 3, 5, 7) for k in range(max(n_max, 1).bit_length())
           if (m << k) < n_max}
    return sorted(out) + [n_max]


def latencies(sub: fx.GraphModule, example: list, dyn_in: tuple, sizes: list[int],
              cost_model) -> tuple[dict, str]:
    """Predicted latency of `sub` at each size: ({size: seconds}, how it was computed)."""
    try:
        import sympy

        from hwopt.cost_symbolic import symbolic_cost

        expr = symbolic_cost(sub, cost_model).latency_s
        syms = sorted(getattr(expr, "free_symbols", set()), key=str)
        if len(syms) == 1:
            f = sympy.lambdify(syms, expr, modules=["math", "sympy"])
            return {s: float(f(s)) for s in sizes}, f"symbolic cost in {syms[0]}"
    except Exception as e:  # noqa: BLE001 - fall back to the concrete model per size
        log.debug("hwopt: symbolic cost unavailable for %s: %s", sub.__class__.__name__, e)
    from hwopt.graph import propagate_meta

    out = {}
    for s in sizes:
        gm = static_copy(sub)
        propagate_meta(gm, padded(example, dyn_in, s))
        out[s] = float(cost_model.graph_cost(gm).latency_s)
    return out, "concrete cost per bucket"


def choose(lat: dict, n_max: int, max_buckets: int, weights: dict | None = None,
           min_gain: float = 0.0) -> list[int]:
    """The sizes (always including n_max) minimising expected latency over n = 1..n_max: a size
    serves the counts above the next smaller chosen one (prefix sums of the weights). With
    `min_gain`, one more size is taken only while it cuts the expected latency by that share
    (each size is one more build)."""
    sizes = sorted(lat)
    w = weights or {n: 1.0 for n in range(1, n_max + 1)}
    prefix = list(itertools.accumulate(w.get(n, 0.0) for n in range(n_max + 1)))
    best, best_cost = [n_max], None
    rest = [s for s in sizes if s != n_max]
    for k in range(0, min(max_buckets, len(sizes))):
        k_best, k_cost = None, None
        for combo in itertools.combinations(rest, k):
            chosen = list(combo) + [n_max]
            cost, low = 0.0, 0
            for b in chosen:
                cost += lat[b] * (prefix[b] - prefix[low])
                low = b
            if k_cost is None or cost < k_cost - 1e-15:
                k_best, k_cost = chosen, cost
        if best_cost is not None and k_cost > best_cost * (1 - min_gain) - 1e-15:
            if min_gain:
                break  # one more size no longer pays for its build
            continue
        best, best_cost = k_best, k_cost
    return best


def static_copy(sub: fx.GraphModule) -> fx.GraphModule:
    gm = copy.deepcopy(sub)
    for n in gm.graph.nodes:
        n.meta.pop("val", None)
    return gm


def padded(inputs: list, dyn_in: tuple, rows: int) -> list:
    return [_pad(x, rows) if i in dyn_in else x for i, x in enumerate(inputs)]


class Bucketed(torch.nn.Module):
    """A sub-network with a dynamic leading dimension, compiled once per bucket size."""

    def __init__(self, sub: fx.GraphModule, dyn_in: tuple, dyn_out: tuple, buckets: list[int],
                 how: str = "", lat: dict | None = None, max_buckets: int = 0):
        super().__init__()
        self.sub, self.dyn_in, self.dyn_out = sub, tuple(dyn_in), tuple(dyn_out)
        self.buckets, self.how = sorted(buckets), how
        # predicted latency per candidate size: the choice is made again on the rows seen
        self.lat, self.max_buckets = lat, max_buckets
        self.stats = {"padded_rows": 0, "rows": 0, "eager_calls": 0}
        self._seen: list | None = None

    def hwopt_inner(self):
        """Static copies of the sub-network at each bucket size, with padded example inputs;
        padding that changes the real rows (checked here on numbers) turns buckets off."""
        if self._seen is None or not self.buckets:
            return None
        seen, self._seen = self._seen, None
        n = seen[self.dyn_in[0]].shape[0]
        self.rechoose(n)
        with torch.no_grad():
            want = self.sub(*seen)
            got = self.sub(*padded(seen, self.dyn_in, self.buckets[-1]))
        got = [g[:n] if i in self.dyn_out else g for i, g in enumerate(_flat(got))]
        if not all(torch.allclose(g, w, rtol=1e-5, atol=1e-6) for g, w in zip(got, _flat(want))):
            log.warning("hwopt: padding changes the rows of %s; it runs in PyTorch", self.sub)
            self.buckets = []
            return None
        specs = []
        for b in self.buckets:
            from hwopt.graph import propagate_meta

            gm, ins = static_copy(self.sub), padded(seen, self.dyn_in, b)
            propagate_meta(gm, ins)
            specs.append((f"b{b}", gm, ins))
        return specs

    def rechoose(self, n: int) -> None:
        """Choose the buckets again with the row count `n` seen on the example run weighted as
        much as all sizes together (uniform): the sizes that run are rarely spread evenly."""
        if not self.lat or not self.max_buckets or not 0 < n <= max(self.lat):
            return
        n_max = max(self.lat)
        weights = {k: 1.0 for k in range(1, n_max + 1)}
        weights[n] += n_max
        self.buckets = choose(self.lat, n_max, self.max_buckets, weights)
        self.how += f"; rows seen {n}: buckets {self.buckets}"

    def forward(self, *inputs):
        n = inputs[self.dyn_in[0]].shape[0]
        if self._seen is None and n > 0:
            self._seen = [x.detach().clone() if isinstance(x, torch.Tensor) else x
                          for x in inputs]
        b = next((b for b in self.buckets if b >= n), None)
        fn = getattr(self, f"b{b}", None) if b is not None else None
        if n == 0 or fn is None or not self._runs_tvm(b, fn):
            # a bucket PyTorch measured faster runs at the exact size: padding only pays for TVM
            self.stats["eager_calls"] += 1
            return _flat(self.sub(*inputs))
        self.stats["rows"] += n
        self.stats["padded_rows"] += b - n
        out = _flat(fn(*padded(list(inputs), self.dyn_in, b)))
        return tuple(o[:n] if i in self.dyn_out else o for i, o in enumerate(out))

    def _runs_tvm(self, b: int, fn) -> bool:
        """Whether the compiled bucket `fn` has a TVM region (else it is the graph itself);
        looked up once per bucket module, not on every call."""
        memo = self.__dict__.setdefault("_tvm_memo", {})
        if memo.get(b, (None,))[0] is not fn:
            from hwopt.host_threads import runs_in_tvm

            memo[b] = (fn, runs_in_tvm(fn))
        return memo[b][1]


def _flat(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
