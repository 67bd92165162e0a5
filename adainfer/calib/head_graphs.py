"""ONNX-to-ONNX surgery on the exit head: a low-rank LM head, and a linear classifier folded in.

Both keep the exit head's interface (hidden_states -> top1_id, top1_prob, gap) so the runtime
treats them alike; the folded one adds `extra_features` (rows, k) and a `score` output made
of plain MatMul/Add ops, which TensorRT can run (it cannot run ONNX-ML classifier ops).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import AdainferError


def _lm_head_matmul(model: onnx.ModelProto, vocab_size: int):
    """(node, initializer, W as hidden x vocab): a MatMul with W, or the Gemm(transB=1) reading a tied
    table (vocab x hidden) that the exporter's shared weights use (exporter/shared_weights.py)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and inits[node.input[1]].dims[-1] == vocab_size:
            return node, inits[node.input[1]], numpy_helper.to_array(inits[node.input[1]])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits and attrs.get("transB") == 1
                and not attrs.get("transA") and inits[node.input[1]].dims[0] == vocab_size):
            return node, inits[node.input[1]], numpy_helper.to_array(inits[node.input[1]]).T
    raise AdainferError("exit head: no MatMul with a vocabulary-sized weight (cannot build a low-rank head)")


def load_graph(path: Path) -> onnx.ModelProto:
    """A bundle's graph with its weights, for calibration's surgery and comparisons; refused in one line where onnx
    will not read them (it refuses external data with several hard links, e.g. a bundle copied with `cp -al`)."""
    try:
        return onnx.load(str(path))
    except (onnx.checker.ValidationError, OSError) as exc:
        raise AdainferError(f"cannot read {path}: {str(exc).splitlines()[0]} (copy the bundle without hard links)") from None


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _dequantized_rows(data: np.ndarray, scales: np.ndarray, bits: int, hidden: int) -> np.ndarray:
    """Float rows (rows, hidden) of symmetric MatMulNBits / GatherBlockQuantized storage: `data` (rows, blocks,
    bytes per block) or (rows, hidden) codes, `scales` (rows, blocks); zero point 2^(bits-1), low nibble first."""
    rows = data.shape[0]
    codes = data.reshape(rows, -1)
    if bits == 4:
        codes = np.stack([codes & 15, codes >> 4], axis=-1).reshape(rows, -1)
    blocks = scales.reshape(rows, -1)
    w = (codes[:, :hidden].astype(np.float32) - (1 << (bits - 1))).reshape(rows, blocks.shape[1], -1)
    return (w * blocks[:, :, None]).reshape(rows, hidden)


def _quantized_lm_head(model: onnx.ModelProto, vocab_size: int):
    """(x, out, nodes, rows) of an LM head the exporter quantized: one MatMulNBits with N = vocabulary (8 or 4 bits,
    symmetric), possibly refined (`exporter/head_refine.py`: its 8-bit table is a GatherBlockQuantized). `nodes`
    are those between the head's input `x` and its logits `out`; `rows(ids)` dequantizes those rows of the
    table (the 8-bit one when refined), (k, hidden) float32."""
    inits = {i.name: i for i in model.graph.initializer}
    heads = [n for n in model.graph.node if n.op_type == "MatMulNBits" and _attrs(n).get("N") == vocab_size
             and len([i for i in n.input if i]) == 3]
    if len(heads) != 1:
        raise AdainferError("label head: no LM head with a vocabulary-sized weight (float MatMul or MatMulNBits)")
    head = heads[0]
    x, hidden = head.input[0], _attrs(head)["K"]
    tables = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized" and n.input[0] in inits
              and inits[n.input[0]].dims[0] == vocab_size]
    if tables:  # refined: the 4-bit copy ranks, the 8-bit table (stored as for the embedding) re-scores
        (table,) = tables
        (scatter,) = [n for n in model.graph.node if n.op_type == "ScatterElements"]
        out, bits = scatter.output[0], _attrs(table)["bits"]
        data, scales = (numpy_helper.to_array(inits[n]) for n in table.input[::2])
    else:
        out, bits = head.output[0], _attrs(head)["bits"]
        data, scales = (numpy_helper.to_array(inits[n]) for n in head.input[1:3])
    producers = {o: n for n in model.graph.node for o in n.output}
    nodes, todo = [], [out]
    while todo:  # every node between x and out
        name = todo.pop()
        node = producers.get(name)
        if name == x or node is None or node in nodes:
            continue
        nodes.append(node)
        todo += list(node.input)
    return x, out, nodes, lambda ids: _dequantized_rows(data[ids], scales.reshape(vocab_size, -1)[ids], bits, hidden)


def lowrank_head(exit_head: Path, out: Path, vocab_size: int, rank: int) -> dict:
    """Replace the LM head W (hidden x vocab) by its rank-`rank` truncated SVD A @ B."""
    model = load_graph(exit_head)
    node, init, weight = _lm_head_matmul(model, vocab_size)
    weight = weight.astype(np.float64)
    u, s, vt = np.linalg.svd(weight, full_matrices=False)
    a = (u[:, :rank] * s[:rank]).astype(np.float32)
    b = vt[:rank].astype(np.float32)
    energy = float((s[:rank] ** 2).sum() / (s ** 2).sum())
    model.graph.initializer.extend([numpy_helper.from_array(a, "lowrank_a"), numpy_helper.from_array(b, "lowrank_b")])
    mid = "lowrank_mid"
    index = list(model.graph.node).index(node)
    first = helper.make_node("MatMul", [node.input[0], "lowrank_a"], [mid], name="lowrank_matmul_a")
    second = helper.make_node("MatMul", [mid, "lowrank_b"], list(node.output), name="lowrank_matmul_b")
    model.graph.node.remove(node)
    model.graph.node.insert(index, second)
    model.graph.node.insert(index, first)
    model.graph.initializer.remove(init)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))
    return {"rank": rank, "energy": energy}


def _unsqueeze(name: str, out: str, axes_name: str):
    return helper.make_node("Unsqueeze", [name, axes_name], [out])


def fold_linear(head: Path | None, out: Path, head_weights: np.ndarray, extra_weights: np.ndarray, bias: float,
                opset: int = 17) -> None:
    """score = [gap, top_prob] @ head_weights + extra_features @ extra_weights + bias.

    `head` is the exit head graph to extend; None builds a features-only decider
    (hidden-state features, no head)."""
    if head is not None:
        model = load_graph(head)
        graph = model.graph
    else:
        graph = helper.make_graph([], "decider", [], [])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
        graph = model.graph
    nodes, inits = [], []
    terms = []
    if head is not None and head_weights.size:
        inits += [numpy_helper.from_array(np.array([1], np.int64), "fold_axis1"),
                  numpy_helper.from_array(head_weights.reshape(-1, 1).astype(np.float32), "fold_w_head")]
        nodes += [_unsqueeze("gap", "fold_gap", "fold_axis1"), _unsqueeze("top1_prob", "fold_prob", "fold_axis1"),
                  helper.make_node("Concat", ["fold_gap", "fold_prob"], ["fold_head_x"], axis=1),
                  helper.make_node("MatMul", ["fold_head_x", "fold_w_head"], ["fold_head_s"])]
        terms.append("fold_head_s")
    if extra_weights.size:
        graph.input.append(helper.make_tensor_value_info("extra_features", TensorProto.FLOAT, ["rows", extra_weights.size]))
        inits.append(numpy_helper.from_array(extra_weights.reshape(-1, 1).astype(np.float32), "fold_w_extra"))
        nodes.append(helper.make_node("MatMul", ["extra_features", "fold_w_extra"], ["fold_extra_s"]))
        terms.append("fold_extra_s")
    inits += [numpy_helper.from_array(np.array([bias], np.float32), "fold_bias"),
              numpy_helper.from_array(np.array([1], np.int64), "fold_squeeze_axis")]
    total = terms[0]
    for i, term in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [total, term], [f"fold_sum{i}"]))
        total = f"fold_sum{i}"
    nodes += [helper.make_node("Add", [total, "fold_bias"], ["fold_biased"]),
              helper.make_node("Squeeze", ["fold_biased", "fold_squeeze_axis"], ["score"])]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    graph.output.append(helper.make_tensor_value_info("score", TensorProto.FLOAT, ["rows"]))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))


def label_head(final_head: Path, out: Path, vocab_size: int, label_token_ids: list[int], opset: int = 17) -> None:
    """The final head cut down to the label words: final norm + |labels| columns of the LM head.

    hidden_states (rows, hidden) -> label_logits (rows, k) = the full head's logits at the label
    token ids; top1_id (the winning label's token id), top1_prob and gap of the softmax over the
    label words only. |labels| x hidden multiply-accumulates instead of vocab x hidden."""
    model = load_graph(final_head)
    graph = model.graph
    ids = np.asarray(label_token_ids, dtype=np.int64)
    if ids.size < 2 or ids.min() < 0 or ids.max() >= vocab_size:
        raise AdainferError(f"label head: label token ids {ids.tolist()} must be >= 2 ids within the vocabulary")
    try:
        node, init, weight = _lm_head_matmul(model, vocab_size)  # weight: hidden x vocab
    except AdainferError:  # a quantized head: its label rows dequantized into a float MatMul
        weight_name = _cut_quantized_head(model, vocab_size, ids)
    else:
        weight_name = init.name
        users = [n for n in graph.node if init.name in n.input]
        if users != [node]:
            raise AdainferError("label head: the LM head weight is shared with other nodes (cannot cut it down)")
        cut = weight[..., ids] if node.op_type == "MatMul" else weight[:, ids].T  # Gemm(transB=1): k x hidden
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(cut), init.name))
    inits = {i.name: i for i in graph.initializer}
    for n in graph.node:  # a vocabulary-sized bias (GPT-2 / OPT heads have none, but be exact if present)
        for name in n.input:
            if name in inits and name != weight_name and list(inits[name].dims) == [vocab_size]:
                bias = numpy_helper.to_array(inits[name])
                graph.initializer.remove(inits[name])
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(bias[ids]), name))
    (logits_out,) = [o for o in graph.output if o.name == "logits"]
    graph.output.remove(logits_out)
    k = int(ids.size)
    graph.initializer.extend([numpy_helper.from_array(ids, "label_token_ids"),
                              numpy_helper.from_array(np.array([2], np.int64), "label_top_k"),
                              numpy_helper.from_array(np.array(0, np.int64), "label_first"),
                              numpy_helper.from_array(np.array(1, np.int64), "label_second")])
    graph.node.extend([
        helper.make_node("Identity", ["logits"], ["label_logits"]),
        helper.make_node("Softmax", ["logits"], ["label_probs"], axis=-1),
        helper.make_node("TopK", ["label_probs", "label_top_k"], ["label_top_p", "label_top_i"], axis=-1),
        helper.make_node("Gather", ["label_top_i", "label_first"], ["label_top1_index"], axis=1),
        helper.make_node("Gather", ["label_token_ids", "label_top1_index"], ["top1_id"], axis=0),
        helper.make_node("Gather", ["label_top_p", "label_first"], ["top1_prob"], axis=1),
        helper.make_node("Gather", ["label_top_p", "label_second"], ["label_p2"], axis=1),
        helper.make_node("Sub", ["top1_prob", "label_p2"], ["gap"]),
    ])
    graph.output.extend([helper.make_tensor_value_info("label_logits", TensorProto.FLOAT, ["rows", k]),
                         helper.make_tensor_value_info("top1_id", TensorProto.INT64, ["rows"]),
                         helper.make_tensor_value_info("top1_prob", TensorProto.FLOAT, ["rows"]),
                         helper.make_tensor_value_info("gap", TensorProto.FLOAT, ["rows"])])
    for vi in list(graph.value_info):  # shapes recorded for the vocabulary-sized logits are stale now
        graph.value_info.remove(vi)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(out))


def _cut_quantized_head(model: onnx.ModelProto, vocab_size: int, ids: np.ndarray) -> str:
    """Replace a quantized LM head (`_quantized_lm_head`) by `x @ rows(ids).T`, the label words' logits in float32;
    returns the new weight's name."""
    graph = model.graph
    x, out, nodes, rows = _quantized_lm_head(model, vocab_size)
    outputs = {o for n in nodes for o in n.output} - {out}
    if any(i in outputs for n in graph.node if n not in nodes for i in n.input):
        raise AdainferError("label head: the LM head's intermediate values are used elsewhere (cannot cut it down)")
    index = min(list(graph.node).index(n) for n in nodes)
    for n in nodes:
        graph.node.remove(n)
    graph.node.insert(index, helper.make_node("MatMul", [x, "label_head_weight"], [out], name="label_head_matmul"))
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(rows(ids).T), "label_head_weight"))
    return "label_head_weight"
