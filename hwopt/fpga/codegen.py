"""C/HLS-style int8 kernels for the ``fpga`` target, generated through TVM's C backend.

Sits in the *lower* step: `hwopt.fpga.lowering` calls `generate(layer, cfg)` for every int8 layer.
Each kernel is a TE computation (int8 x int8 -> int32 accumulate, bias, fixed-point requantize,
clamp; see `hwopt.fpga.int8layer`) scheduled like the systolic array it stands for: the output
is tiled into ``rows`` pixels x ``cols`` channels (one fold), the int32 accumulator tile (the PEs'
registers) is computed at that tile with the reduction outermost, and the channel loop is
unrolled (TVM's C backend prints vectorized loops as invalid C, so nothing is vectorized). TVM
emits the kernel as a TVM-FFI packed function; `wrapper` adds a plain-pointer entry point
``hwopt_fpga_<layer>(x, w, bias, mult, shift, y)`` with the HLS interface pragmas an HLS tool reads
(a C compiler ignores them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from hwopt.fpga.int8layer import Int8Layer
from hwopt.fpga.systolic import FPGAConfig

HEADER = "hwopt_fpga.h"


@dataclass(frozen=True)
class Kernel:
    """Generated code of one layer."""

    layer: str  # layer (and C symbol suffix) name
    symbol: str  # the plain entry point, hwopt_fpga_<layer>
    source: str  # TVM's C + the wrapper: one self-contained translation unit
    arg_shapes: tuple  # shapes of (x, w, bias, mult, shift, y)


def c_name(name: str) -> str:
    return re.sub(r"\W", "_", name)


def _requant(acc, b, m, s, layer: Int8Layer):
    from tvm import tirx

    i64 = "int64"
    v = (acc.astype(i64) + b.astype(i64)) * m.astype(i64)
    sh = s.astype(i64)
    v = tirx.shift_right(v + tirx.shift_left(tirx.const(1, i64), sh - 1), sh)
    v = v + tirx.const(layer.zp_out, i64)
    v = tirx.max(tirx.min(v, tirx.const(layer.hi, i64)), tirx.const(layer.lo, i64))
    return v.astype("int8")


def _conv_te(layer: Int8Layer):
    from tvm import te, tirx

    n, c, h, w, ho, wo = layer.conv_io()
    o, cg, kh, kw = (int(d) for d in layer.weight.shape)
    (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
    opg = o // layer.groups
    X = te.placeholder((n, c, h, w), "int8", name="X")
    W = te.placeholder((o, cg, kh, kw), "int8", name="W")
    B, M, S = (te.placeholder((o,), "int32", name=nm) for nm in "BMS")
    rc, ry, rx = (te.reduce_axis((0, e), nm) for e, nm in ((cg, "rc"), (kh, "ry"), (kw, "rx")))

    def x_at(b, ch, y, x):  # zero padding is the int8 code of 0.0: zp_in
        inside = tirx.all(y >= 0, y < h, x >= 0, x < w)
        return tirx.if_then_else(inside, X[b, ch, y, x], tirx.const(layer.zp_in, "int8"))

    def mac(b, oc, p):
        ch = rc if layer.groups == 1 else oc // opg * cg + rc
        y = p // wo * sh + ry * dh - ph
        x = p % wo * sw + rx * dw - pw
        return te.sum(x_at(b, ch, y, x).astype("int32") * W[oc, rc, ry, rx].astype("int32"),
                      axis=[rc, ry, rx])

    acc = te.compute((n, o, ho * wo), mac, name="acc")
    Y = te.compute((n, o, ho * wo), lambda b, oc, p: _requant(acc[b, oc, p], B[oc], M[oc], S[oc],
                                                              layer), name="Y")
    return [X, W, B, M, S, Y], ((n, c, h, w), (o, cg, kh, kw), (o,), (o,), (o,), (n, o, ho * wo))


def _linear_te(layer: Int8Layer):
    from tvm import te

    m, k = layer.gemm_io()
    o = layer.out_channels
    X = te.placeholder((m, k), "int8", name="X")
    W = te.placeholder((o, k), "int8", name="W")
    B, M, S = (te.placeholder((o,), "int32", name=nm) for nm in "BMS")
    rk = te.reduce_axis((0, k), "rk")
    acc = te.compute((m, o), lambda i, j: te.sum(X[i, rk].astype("int32") *
                                                 W[j, rk].astype("int32"), axis=rk), name="acc")
    Y = te.compute((m, o), lambda i, j: _requant(acc[i, j], B[j], M[j], S[j], layer), name="Y")
    return [X, W, B, M, S, Y], ((m, k), (o, k), (o,), (o,), (o,), (m, o))


def _schedule(mod, fname: str, kind: str, cfg: FPGAConfig):
    """Tile the output like one systolic fold; accumulate the tile with the reduction outside.

    The accumulator block's loops are tiled (pixels by ``rows``, channels by ``cols``) with the
    reduction between the fold loops and the tile loops, then the requantization epilogue is
    moved under the fold loop, so the int32 accumulator shrinks to one fold's tile.
    """
    import tvm

    sch = tvm.s_tir.Schedule(mod)
    acc = sch.get_sblock("acc", func_name=fname)
    loops = sch.get_loops(acc)
    if kind == "conv2d":
        b, oc, p, *red = loops
        outer = [b]
    else:
        p, oc, *red = loops
        outer = []
    po, pi = sch.split(p, [None, min(cfg.rows, _extent(sch, p))])
    oo, oi = sch.split(oc, [None, min(cfg.cols, _extent(sch, oc))])
    sch.reorder(*outer, po, oo, *red, pi, oi)
    sch.reverse_compute_at(sch.get_sblock("Y", func_name=fname), oo)
    sch.decompose_reduction(acc, red[0])
    sch.unroll(oi)
    return sch.mod


def _extent(sch, loop) -> int:
    return int(sch.get(loop).extent)


def generate(layer: Int8Layer, cfg: FPGAConfig) -> Kernel:
    """TVM C source of `layer`'s kernel plus its plain-pointer wrapper."""
    import tvm
    from tvm import te

    name = c_name(layer.name)
    fname = f"hwopt_fpga_{name}_kernel"
    tensors, shapes = (_conv_te if layer.kind == "conv2d" else _linear_te)(layer)
    func = te.create_prim_func(tensors).with_attr("global_symbol", fname)
    mod = _schedule(tvm.IRModule({fname: func}), fname, layer.kind, cfg)
    ex = tvm.compile(mod, target=tvm.target.Target({"kind": "c"}))
    src = ex.mod.inspect_source()
    # Each kernel is its own translation unit: keep TVM's module-level symbols private to it.
    src = src.replace("void* __tvm_ffi__library_ctx = NULL;",
                      "static void* __tvm_ffi__library_ctx = NULL;")
    src = re.sub(r"(\n// CodegenC: NOTE: Auto-generated entry function.*)\Z", "", src,
                 flags=re.S)
    symbol = f"hwopt_fpga_{name}"
    body = src + wrapper(layer, symbol, f"__tvm_ffi_{fname}", shapes, cfg)
    return Kernel(layer.name, symbol, body, shapes)


def wrapper(layer: Int8Layer, symbol: str, packed: str, shapes, cfg: FPGAConfig) -> str:
    """A plain C entry point around TVM's packed kernel: DLTensors built on the stack."""
    names = ("x", "w", "bias", "mult", "shift", "y")
    ctypes_ = ("const int8_t*", "const int8_t*", "const int32_t*", "const int32_t*",
               "const int32_t*", "int8_t*")
    bits = (8, 8, 32, 32, 32, 8)
    params = ", ".join(f"{t} {n}" for t, n in zip(ctypes_, names))
    lines = [
        "", f"/* ---- hwopt fpga: layer {layer.name} ({layer.kind}), "
        f"{cfg.rows}x{cfg.cols} PE array, {cfg.dataflow} dataflow ----",
        " * HLS mapping: the pixel x channel tile loops = one fold of the PE array",
        " * (#pragma HLS UNROLL on both, ARRAY_PARTITION complete on the accumulator tile),",
        " * the reduction loop = the systolic wavefront (#pragma HLS PIPELINE II=1). */",
        f'#include "{HEADER}"', f"int32_t {packed}(void*, void*, int32_t, void*);",
        f"int32_t {symbol}({params}) {{"]
    for i, n in enumerate(names):
        lines.append(f"#pragma HLS INTERFACE m_axi port={n} offset=slave bundle=gmem{i}")
    lines.append("#pragma HLS INTERFACE s_axilite port=return")
    for n, shape in zip(names, shapes):
        lines.append(f"  static int64_t shape_{n}[{len(shape)}] = "
                     f"{{{', '.join(str(int(s)) for s in shape)}}};")
    lines += ["  DLTensor t[6];", "  TVMFFIAny a[6], ret;"]
    for i, (n, b) in enumerate(zip(names, bits)):
        lines.append(f"  hwopt_fpga_arg(&a[{i}], &t[{i}], (void*){n}, shape_{n}, "
                     f"{len(shapes[i])}, {b});")
    lines += [f"  return {packed}(NULL, a, 6, &ret);", "}", ""]
    return "\n".join(lines)
