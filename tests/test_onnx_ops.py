"""hwopt.onnx_ops / onnx_ops_nn: one ONNX node per case, imported and checked against ONNX Runtime.

Covers the attribute forms and edge cases that models from torch.onnx.export rarely produce
(auto_pad, asymmetric pads, old-opset attributes, negative steps and indices, ...).
"""
import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from hwopt.onnx_export import run_onnxruntime  # noqa: E402
from hwopt.onnx_import import to_graph_module  # noqa: E402

R = np.random.default_rng(0)


def f(*shape):
    return R.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def const(a):
    """Marks an input as an initializer (a weight or a shape argument)."""
    return ("init", np.asarray(a))


# (op, inputs: run-time arrays or const(...) initializers or None, attributes, opset, outputs)
CASES = {
    "conv_same_upper": ("Conv", [f(1, 2, 7, 7), const(f(3, 2, 3, 3))],
                        {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 17, 1),
    "conv_asym_pads": ("Conv", [f(1, 2, 6, 6), const(f(4, 1, 3, 3)), const(f(4))],
                       {"pads": [0, 1, 1, 0], "group": 2}, 17, 1),
    "conv_transpose": ("ConvTranspose", [f(1, 2, 4, 4), const(f(2, 3, 3, 3))],
                       {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}, 17, 1),
    "maxpool_same_lower": ("MaxPool", [f(1, 2, 7, 7)],
                           {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
                           17, 1),
    "avgpool_exclude_pad": ("AveragePool", [f(1, 2, 7, 7)],
                            {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "ceil_mode": 1,
                             "strides": [2, 2]}, 17, 1),
    "avgpool_include_pad": ("AveragePool", [f(1, 2, 6, 6)],
                            {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1],
                             "count_include_pad": 1}, 17, 1),
    "global_max_pool": ("GlobalMaxPool", [f(1, 3, 5, 4)], {}, 17, 1),
    "gemm_trans_alpha_beta": ("Gemm", [f(4, 3), const(f(4, 5)), const(f(3, 5))],
                              {"transA": 1, "alpha": 0.5, "beta": 2.0}, 17, 1),
    "gemm_runtime_weight": ("Gemm", [f(3, 4), f(5, 4), const(f(5))], {"transB": 1}, 17, 1),
    "softmax_opset11_axis1": ("Softmax", [f(2, 3, 4)], {"axis": 1}, 11, 1),
    "logsoftmax_axis1": ("LogSoftmax", [f(2, 3, 4)], {"axis": 1}, 13, 1),
    "instance_norm": ("InstanceNormalization", [f(2, 3, 4, 4), const(f(3)), const(f(3))], {}, 17,
                      1),
    "layer_norm_axis1": ("LayerNormalization", [f(2, 3, 4), const(f(3, 4)), const(f(3, 4))],
                         {"axis": 1}, 17, 1),
    "resize_nearest": ("Resize", [f(1, 2, 3, 4), None, const(np.array([1, 1, 2, 2], np.float32))],
                       {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
                        "nearest_mode": "floor"}, 13, 1),
    "resize_linear": ("Resize", [f(1, 2, 3, 4), None, None, const(i64(1, 2, 5, 7))],
                      {"mode": "linear"}, 13, 1),
    "einsum": ("Einsum", [f(2, 3, 4), f(2, 4, 5)], {"equation": "bij,bjk->bik"}, 17, 1),
    "cumsum_exclusive_reverse": ("CumSum", [f(3, 5), const(i64(1))],
                                 {"exclusive": 1, "reverse": 1}, 17, 1),
    "argmax": ("ArgMax", [f(3, 5)], {"axis": 1, "keepdims": 0}, 17, 1),
    "pad_reflect": ("Pad", [f(1, 2, 4, 5), const(i64(0, 0, 1, 2, 0, 0, 2, 1))],
                    {"mode": "reflect"}, 13, 1),
    "pad_constant_axes": ("Pad", [f(2, 3, 4), const(i64(1, 2)), const(np.float32(1.5)),
                                  const(i64(-1))], {}, 18, 1),
    "pad_opset2_attr": ("Pad", [f(2, 3)], {"pads": [0, 1, 0, 2], "value": 3.0}, 2, 1),
    "mod_fmod": ("Mod", [f(3, 4), const(np.float32(0.7))], {"fmod": 1}, 17, 1),
    "prelu": ("PRelu", [f(1, 3, 2, 2), const(f(3, 1, 1))], {}, 17, 1),
    "elu": ("Elu", [f(3, 4)], {"alpha": 0.5}, 17, 1),
    "selu": ("Selu", [f(3, 4)], {}, 17, 1),
    "hard_sigmoid": ("HardSigmoid", [f(3, 4)], {"alpha": 0.3}, 17, 1),
    "mish": ("Mish", [f(3, 4)], {}, 18, 1),
    "clip_opset6_attrs": ("Clip", [f(3, 4)], {"min": -0.5, "max": 0.5}, 6, 1),
    "clip_min_only": ("Clip", [f(3, 4), const(np.float32(0.1))], {}, 13, 1),
    "slice_negative_step": ("Slice", [f(4, 9), const(i64(-1)), const(i64(-1000)), const(i64(1)),
                                      const(i64(-2))], {}, 17, 1),
    "slice_opset9_attrs": ("Slice", [f(4, 9)], {"starts": [1, 2], "ends": [100, -1],
                                                "axes": [0, 1]}, 9, 1),
    "squeeze_axes_input": ("Squeeze", [f(1, 3, 1, 2), const(i64(2))], {}, 13, 1),
    "unsqueeze_attr": ("Unsqueeze", [f(3, 2)], {"axes": [0, -1]}, 11, 1),
    "split_num_outputs": ("Split", [f(7, 2)], {"num_outputs": 3}, 18, 3),
    "split_opset11_attr": ("Split", [f(2, 6)], {"axis": 1, "split": [1, 5]}, 11, 2),
    "reduce_sum_axes_input": ("ReduceSum", [f(2, 3, 4), const(i64(0, 2))], {"keepdims": 0}, 13,
                              1),
    "reduce_l2_opset18": ("ReduceL2", [f(2, 3, 4), const(i64(-1))], {}, 18, 1),
    "reduce_prod_opset11": ("ReduceProd", [f(2, 3, 4)], {"axes": [1, 2]}, 11, 1),
    "reduce_logsumexp_all": ("ReduceLogSumExp", [f(2, 3)], {"keepdims": 0}, 17, 1),
    "max_variadic": ("Max", [f(2, 3), f(3), f(1, 1)], {}, 17, 1),
    "mean_variadic": ("Mean", [f(2, 3), f(2, 3)], {}, 17, 1),
    "div_int_trunc": ("Div", [i64(-7, 7, -3), const(i64(2))], {}, 17, 1),
    "where_broadcast": ("Where", [np.array([[True], [False]]), f(2, 3), f(3)], {}, 17, 1),
    "expand": ("Expand", [f(3, 1), const(i64(2, 1, 4))], {}, 17, 1),
    "gather_elements_negative": ("GatherElements", [f(3, 4), const(i64(-1, 0, 2, 1, 0, -4)
                                                                    .reshape(3, 2))],
                                 {"axis": 1}, 17, 1),
    "gather_runtime_negative": ("Gather", [f(5, 3), i64(-1, 0, 4, -5).reshape(2, 2)], {}, 17, 1),
    "gather_axis1_scalar": ("Gather", [f(2, 5, 3), const(np.int64(-2))], {"axis": 1}, 17, 1),
    "cast_int_to_float": ("Cast", [i64(1, -2, 3)], {"to": TensorProto.FLOAT}, 17, 1),
    "trilu_lower_k": ("Trilu", [f(4, 5), const(i64(1))], {"upper": 0}, 17, 1),
    "tile": ("Tile", [f(2, 3), const(i64(2, 1))], {}, 17, 1),
    "flatten_axis2": ("Flatten", [f(2, 3, 4, 5)], {"axis": 2}, 17, 1),
    "reshape_zero_and_minus_one": ("Reshape", [f(2, 3, 4), const(i64(0, -1))], {}, 17, 1),
    "transpose_default": ("Transpose", [f(2, 3, 4)], {}, 17, 1),
    "dropout_inference": ("Dropout", [f(2, 3)], {}, 13, 1),
    "gelu_tanh": ("Gelu", [f(3, 4)], {"approximate": "tanh"}, 20, 1),
}


def _model(op_type, inputs, attrs, opset, n_out):
    names, feeds, inits, vis = [], [], [], []
    for k, a in enumerate(inputs):
        if a is None:
            names.append("")
            continue
        name = f"in{k}"
        names.append(name)
        if isinstance(a, tuple):
            inits.append(numpy_helper.from_array(a[1], name))
        else:
            vis.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape))
            feeds.append(torch.from_numpy(a))
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op_type, names, outs, name="n0", **attrs)
    out_vi = [onnx.ValueInfoProto(name=o) for o in outs]  # types left to ONNX Runtime
    graph = helper.make_graph([node], "g", vis, out_vi, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model, tuple(feeds)


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_op_matches_onnxruntime(case, tmp_path):
    model, feeds = _model(*CASES[case])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    refs = run_onnxruntime(path, feeds, optimize=False)
    gm, _ = to_graph_module(model, feeds)
    outs = gm(*feeds)
    assert len(outs) == len(refs)
    for got, ref in zip(outs, refs):
        assert tuple(got.shape) == tuple(ref.shape) and got.dtype == ref.dtype, (got, ref)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_shape_arithmetic_folds_at_import():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape on constants is evaluated at import time:
    only the op that depends on the input is left in the graph."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["d"]),
             helper.make_node("Unsqueeze", ["d", "zero"], ["d1"]),
             helper.make_node("Concat", ["two", "d1"], ["shape"], axis=0),
             helper.make_node("Reshape", ["c6", "shape"], ["r"]),
             helper.make_node("Mul", ["r", "r"], ["r2"]),
             helper.make_node("Add", ["x", "r2"], ["y"])]
    inits = [numpy_helper.from_array(np.int64(1), "one"), numpy_helper.from_array(i64(0), "zero"),
             numpy_helper.from_array(i64(2), "two"),
             numpy_helper.from_array(np.arange(6, dtype=np.float32), "c6")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], initializer=inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    gm, (inp,) = to_graph_module(model)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [torch.add], gm.code
    torch.testing.assert_close(gm(inp)[0], inp + torch.arange(6.0).reshape(2, 3) ** 2)
