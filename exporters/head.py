"""The metric head of an exported model, rebuilt so the prototypes' norms can be fed.

Squared euclidean logits need ``|p|^2`` of every prototype, and cosine logits need
``|p|``. Computed in the graph, that is a second pass over the whole prototype matrix on
every call, by ONNX Runtime's reduction kernels, which are slow: with 10,000 classes it
cost more than the backbone (Conv-4, batch 1). The prototypes change only when a class
is enrolled, so the runtime keeps their squared norms with the store and feeds them.

The graph gets one optional input, ``prototype_sqnorms`` [n_classes] float32 (the
squared L2 norm of each prototype row). It is an initializer listed among the graph
inputs (an empty one), which ONNX Runtime lets a caller override and does not list in
``get_inputs()``: an app that feeds only ``images`` and ``prototypes`` runs exactly as
before, and the graph computes the norms itself when the fed ones do not match the
number of prototypes. The head is checked against the graph the exporter wrote (same
logits on random inputs, norms fed or not) and is not used when it differs, as it
would for a module with logits of its own.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgemeta.exporters.graph import ancestors as _ancestors
from edgemeta.exporters.graph import name_nodes, node_inputs
from edgemeta.runtime.spec import INPUT_PROTOTYPES, INPUT_SQNORMS, OUTPUT_EMBEDDINGS, OUTPUT_LOGITS, Metric

__all__ = ["with_fed_norms", "has_fed_norms"]

_EPS = 1e-12  # as edgemeta.model.compute_logits


def has_fed_norms(model: onnx.ModelProto) -> bool:
    """True when ``model`` takes the optional ``prototype_sqnorms`` input."""
    return any(i.name == INPUT_SQNORMS for i in model.graph.input) and any(
        t.name == INPUT_SQNORMS for t in model.graph.initializer
    )


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(value, name)


def _sumsq(x: str, out: str, keepdims: int, opset: int, axes: str) -> onnx.NodeProto:
    """ReduceSumSquare over axis 1 (axes are an input from opset 18, an attribute before)."""
    if opset >= 18:
        return helper.make_node("ReduceSumSquare", [x, axes], [out], name=out, keepdims=keepdims)
    return helper.make_node("ReduceSumSquare", [x], [out], name=out, axes=[1], keepdims=keepdims)


def _head_nodes(metric: Metric, scale: float, opset: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    p = "metric_head/"
    consts = [
        _const(f"{p}axis1", np.array([1], np.int64)),
        _const(f"{p}zero", np.array(0.0, np.float32)),
        _const(f"{p}factor", np.array(2.0 if metric is Metric.SQEUCLIDEAN else scale, np.float32)),
    ]
    if metric is Metric.COSINE:
        consts.append(_const(f"{p}eps", np.array(_EPS, np.float32)))
    fed = helper.make_graph(
        [helper.make_node("Identity", [INPUT_SQNORMS], [f"{p}sq_fed"], name=f"{p}sq_fed")],
        "fed_norms",
        [],
        [helper.make_tensor_value_info(f"{p}sq_fed", TensorProto.FLOAT, None)],
    )
    computed = helper.make_graph(
        [_sumsq(INPUT_PROTOTYPES, f"{p}sq_computed", 0, opset, f"{p}axis1")],
        "computed_norms",
        [],
        [helper.make_tensor_value_info(f"{p}sq_computed", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Shape", [INPUT_SQNORMS], [f"{p}n_fed"], name=f"{p}n_fed", start=0, end=1),
        helper.make_node("Shape", [INPUT_PROTOTYPES], [f"{p}n"], name=f"{p}n", start=0, end=1),
        helper.make_node("Equal", [f"{p}n_fed", f"{p}n"], [f"{p}same_n"], name=f"{p}same_n"),
        helper.make_node("Squeeze", [f"{p}same_n"], [f"{p}use_fed"], name=f"{p}use_fed"),
        helper.make_node("If", [f"{p}use_fed"], [f"{p}sq"], name=f"{p}sq", then_branch=fed, else_branch=computed),
        _sumsq(OUTPUT_EMBEDDINGS, f"{p}zz", 1, opset, f"{p}axis1"),
    ]
    # The scalar factor goes on the [B, D] side: a Gemm with alpha != 1 leaves ONNX
    # Runtime's fast single-row path (measured 2x slower at 10,000 classes).
    if metric is Metric.SQEUCLIDEAN:  # -max(|z|^2 - 2 z.p + |p|^2, 0) = min(2 z.p - |p|^2 - |z|^2, 0)
        nodes += [
            helper.make_node("Mul", [OUTPUT_EMBEDDINGS, f"{p}factor"], [f"{p}z2"], name=f"{p}z2"),
            helper.make_node("Gemm", [f"{p}z2", INPUT_PROTOTYPES], [f"{p}zp2"], name=f"{p}zp2", transB=1),
            helper.make_node("Sub", [f"{p}zp2", f"{p}sq"], [f"{p}a"], name=f"{p}a"),
            helper.make_node("Sub", [f"{p}a", f"{p}zz"], [f"{p}b"], name=f"{p}b"),
            helper.make_node("Min", [f"{p}b", f"{p}zero"], [OUTPUT_LOGITS], name=f"{p}logits"),
        ]
    else:  # scale * (z / |z|) . p / |p|, each norm as sqrt(sum of squares + eps)
        nodes += [
            helper.make_node("Add", [f"{p}zz", f"{p}eps"], [f"{p}zz_eps"], name=f"{p}zz_eps"),
            helper.make_node("Sqrt", [f"{p}zz_eps"], [f"{p}zn"], name=f"{p}zn"),
            helper.make_node("Div", [f"{p}factor", f"{p}zn"], [f"{p}zscale"], name=f"{p}zscale"),
            helper.make_node("Mul", [OUTPUT_EMBEDDINGS, f"{p}zscale"], [f"{p}zs"], name=f"{p}zs"),
            helper.make_node("Gemm", [f"{p}zs", INPUT_PROTOTYPES], [f"{p}dots"], name=f"{p}dots", transB=1),
            helper.make_node("Add", [f"{p}sq", f"{p}eps"], [f"{p}sq_eps"], name=f"{p}sq_eps"),
            helper.make_node("Sqrt", [f"{p}sq_eps"], [f"{p}pn"], name=f"{p}pn"),
            helper.make_node("Div", [f"{p}dots", f"{p}pn"], [OUTPUT_LOGITS], name=f"{p}logits"),
        ]
    return nodes, consts


def with_fed_norms(model: onnx.ModelProto, metric: Metric | str, scale: float = 1.0) -> onnx.ModelProto:
    """A copy of ``model`` whose logits come from the head above (optional fed norms).

    The nodes the embeddings do not depend on (the exported metric) are replaced; the
    backbone and the embedding normalization are kept as they are. ``scale`` is the
    cosine logit scale (unused for squared euclidean).
    """
    metric = Metric(metric)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name_nodes(out)
    g = out.graph
    keep = _ancestors(out, OUTPUT_EMBEDDINGS)
    nodes = [n for n in g.node if n.name in keep]
    head, consts = _head_nodes(metric, scale, _opset(out))
    del g.node[:]
    g.node.extend([*nodes, *head])
    used = {i for n in g.node for i in node_inputs(n)}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend([*kept, *consts, _const(INPUT_SQNORMS, np.zeros(0, np.float32))])
    g.input.append(helper.make_tensor_value_info(INPUT_SQNORMS, TensorProto.FLOAT, ["n_norms"]))
    kept_names = {o for n in g.node for o in n.output}
    vi = [v for v in g.value_info if v.name in kept_names]
    del g.value_info[:]
    g.value_info.extend(vi)
    return out
