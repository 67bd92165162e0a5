"""A merged graph's rotary embeddings moved into GroupQueryAttention (`do_rotary`), its q/k/v packed into one input.

Why: a fused block rotates q and k with two `RotaryEmbedding` nodes fed by a Split of the fused q/k/v
projection; GroupQueryAttention can rotate them itself (its cos/sin caches as inputs) and take q/k/v as
one packed tensor, as onnxruntime-genai's builder writes it. Three nodes fewer per block (SmolLM2 float32
full step in plain sessions: 17.53 -> 17.17 ms a step; docs/bench/speed-profile.md). Outputs are the
unfolded graph's bit for bit where every row is unpadded.

The catch: GroupQueryAttention rotates by each token's cache slot (past length + offset), not by the
graph's `position_ids`. Those are equal for a row without padding; a left-padded row's real tokens are
rotated `padding` positions further, which leaves its attention unchanged within the graph (rotary scores
depend on position differences) but writes keys the per-block graphs (blocks, kv fills: rotated by
`position_ids`) would read at other positions. (Its `position_ids` input does not help: on a first prompt
the kernel reads only the first row's first position.) So the merged graphs are folded (spans, the full step:
`spans.py`), the per-block graphs are not, and the chain runs merged graphs for unpadded batches only
(`chain.run_layers`, `chain.full_depth_logits`); a padded batch runs embed -> blocks -> head.
"""

from __future__ import annotations

import onnx

MS = "com.microsoft"
#: GroupQueryAttention's inputs: query, key, value, past_key, past_value, seqlens_k, total_sequence_length,
#: cos_cache, sin_cache, position_ids, attention_bias, ...
QUERY, KEY, VALUE, COS, SIN, POSITIONS = 0, 1, 2, 7, 8, 9


def _attr(node: onnx.NodeProto, name: str, default=0):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def fold_rotary(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with every GroupQueryAttention whose query and key come straight from two RotaryEmbeddings (same
    positions and caches, non-interleaved, nothing else reading their outputs) rotating them itself, fed the
    packed q/k/v where one Split made q, k and v (the Split dropped), where the head size is a multiple of 16 (ONNX
    Runtime's kernel refuses others). A GroupQueryAttention that rotates already is left alone."""
    graph = model.graph
    made_by = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    cos_width = {t.name: t.dims[1] for t in graph.initializer if len(t.dims) == 2}  # (positions, head_size / 2)
    dropped = set()
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or node.domain != MS or _attr(node, "do_rotary"):
            continue
        rq, rk = made_by.get(node.input[QUERY]), made_by.get(node.input[KEY])
        if not (rq is not None and rk is not None and rq.op_type == rk.op_type == "RotaryEmbedding"
                and list(rq.input[1:4]) == list(rk.input[1:4])
                and all(a.name == "interleaved" and a.i == 0 for r in (rq, rk) for a in r.attribute)
                and readers[rq.output[0]] == readers[rk.output[0]] == 1):
            continue
        head_size = 2 * cos_width.get(rq.input[2], 0)
        if head_size == 0 or head_size % 16:  # ONNX Runtime rotates inside the attention for these sizes only
            continue
        q, k, v = rq.input[0], rk.input[0], node.input[VALUE]
        inputs = list(node.input) + [""] * max(0, POSITIONS + 1 - len(node.input))
        split = made_by.get(q)
        if (split is not None and split.op_type == "Split" and list(split.output) == [q, k, v]
                and _attr(split, "axis") in (-1, 2) and all(readers[o] == 1 for o in split.output)):
            inputs[QUERY:VALUE + 1] = [split.input[0], "", ""]
            dropped.add(id(split))
        else:
            inputs[QUERY:VALUE + 1] = [q, k, v]
        inputs[COS], inputs[SIN], inputs[POSITIONS] = rq.input[2], rq.input[3], ""
        node.input[:] = inputs
        kept_attrs = [a for a in node.attribute if a.name != "do_rotary"]
        del node.attribute[:]
        node.attribute.extend([*kept_attrs, onnx.helper.make_attribute("do_rotary", 1)])
        dropped |= {id(rq), id(rk)}
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return model
