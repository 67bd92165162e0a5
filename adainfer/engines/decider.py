"""The on-device exit decision: `exit_decider.onnx`, derived from a calibration's folded exit head.

`adainfer calib` with a linear classifier writes `exit_head_folded.onnx`: the exit head with
the classifier folded in as MatMul/Add (output `score`), whose input `extra_features` (rows, k)
carries the features that do not come from the head (`layer_frac`, `cos_prev`, `norm_ratio`,
in the policy's order); the hidden-only variant is that features-only part alone. The GPU
backends cannot feed `extra_features` without copying hidden states to the host, so
`decider_model` moves those features into the graph:

    hidden_states          (rows, hidden)  this block's last-position hidden state (on the device)
    previous_hidden_states (rows, hidden)  the previous block's (still on the device: the other
                                           ping-pong buffer), only if cos_prev / norm_ratio are used
    layer_frac             (rows, 1)       only if used; the TensorRT backend keeps a device table
                                           of every layer's value, so nothing is uploaded per layer
  -> score (rows,) [+ top1_id (rows,) when the graph has the exit head]

cos_prev and norm_ratio are computed as in `exit_policy.hidden_features` (ReduceSum of
products, Sqrt, Div by max(., 1e-12)), in float32 (pinned under fp16 / int8 builds: every node
this module adds, and the fold's nodes, are named `adainfer_decider/...`). Per evaluated layer
and batch row only `score` (4 bytes) and `top1_id` (4 or 8 bytes) cross to the host; the
threshold is compared there. Needs the `onnx` package (build-engines, the ORT GPU backends).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from ..errors import BundleError
from ..manifest import GraphSpec, TensorSpec, sha256_of
from ..runtime.device_exit import HIDDEN, LAYER_FRAC, PREVIOUS, extra_features, layer_fractions  # noqa: F401 (re-exported)
from ..runtime.exit_policy import ExitPolicy
from .errors import EngineError
from .precision import DECIDER_PREFIX as PREFIX

DECIDER_FILE = "exit_decider.onnx"
OUTPUTS = ("score", "top1_id")


def decider_inputs(policy: ExitPolicy) -> list[str]:
    """The derived graph's inputs, in order."""
    extra = extra_features(policy)
    needs_hidden = policy.head != "none" or any(f in ("cos_prev", "norm_ratio") for f in extra)
    names = [HIDDEN] if needs_hidden else []
    if any(f in ("cos_prev", "norm_ratio") for f in extra):
        names.append(PREVIOUS)
    if "layer_frac" in extra:
        names.append(LAYER_FRAC)
    return names


def decider_model(folded: Path, policy: ExitPolicy, hidden_size: int):
    """The derived decider graph (an onnx.ModelProto) of `folded` for `policy` (see the module docstring)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if policy.decision != "folded":
        raise BundleError(f"exit policy {policy.name!r} is not folded (decision {policy.decision!r})")
    try:
        model = onnx.load(str(folded))
    except Exception as exc:  # onnx raises DecodeError and friends
        raise BundleError(f"cannot read {Path(folded).name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    outputs = [o.name for o in graph.output]
    if "score" not in outputs:
        raise BundleError(f"{Path(folded).name} has no `score` output (not a folded exit head)")
    extra = extra_features(policy)
    if bool(extra) != ("extra_features" in inputs):
        raise BundleError(f"{Path(folded).name} does not match the exit policy's features {policy.features}")
    for index, node in enumerate(graph.node):  # the fold's nodes are unnamed: name them so they are pinned
        if not node.name:
            node.name = f"{PREFIX}fold_{index}_{node.op_type}"
    wanted = decider_inputs(policy)
    nodes, inits = [], []
    if extra:
        graph.input.remove(inputs["extra_features"])
        columns = {}
        if HIDDEN in wanted and HIDDEN not in inputs:
            graph.input.append(helper.make_tensor_value_info(HIDDEN, TensorProto.FLOAT, ["rows", hidden_size]))
        if PREVIOUS in wanted:
            graph.input.append(helper.make_tensor_value_info(PREVIOUS, TensorProto.FLOAT, ["rows", hidden_size]))
            inits += [numpy_helper.from_array(np.array([1], np.int64), PREFIX + "_axis"),
                      numpy_helper.from_array(np.array([1e-12], np.float32), PREFIX + "_eps")]

            def op(kind, ins, out, **attrs):
                nodes.append(helper.make_node(kind, [PREFIX + i if i.startswith("_") else i for i in ins],
                                              [PREFIX + out], name=PREFIX + out, **attrs))

            op("Mul", [HIDDEN, PREVIOUS], "_dot_terms")
            op("ReduceSum", ["_dot_terms", "_axis"], "_dot", keepdims=1)
            op("Mul", [HIDDEN, HIDDEN], "_cur_sq")
            op("ReduceSum", ["_cur_sq", "_axis"], "_cur_norm2", keepdims=1)
            op("Sqrt", ["_cur_norm2"], "_cur_norm")
            op("Mul", [PREVIOUS, PREVIOUS], "_prev_sq")
            op("ReduceSum", ["_prev_sq", "_axis"], "_prev_norm2", keepdims=1)
            op("Sqrt", ["_prev_norm2"], "_prev_norm")
            op("Mul", ["_cur_norm", "_prev_norm"], "_norms")
            op("Max", ["_norms", "_eps"], "_norms_safe")
            op("Div", ["_dot", "_norms_safe"], "_cos_prev")
            op("Max", ["_prev_norm", "_eps"], "_prev_safe")
            op("Div", ["_cur_norm", "_prev_safe"], "_norm_ratio")
            columns.update(cos_prev=PREFIX + "_cos_prev", norm_ratio=PREFIX + "_norm_ratio")
        if LAYER_FRAC in wanted:
            graph.input.append(helper.make_tensor_value_info(LAYER_FRAC, TensorProto.FLOAT, ["rows", 1]))
            columns["layer_frac"] = LAYER_FRAC
        nodes.append(helper.make_node("Concat", [columns[f] for f in extra], ["extra_features"], axis=1,
                                      name=PREFIX + "extra_features"))
    for node in reversed(nodes):
        graph.node.insert(0, node)
    graph.initializer.extend(inits)
    for output in list(graph.output):
        if output.name not in OUTPUTS:
            graph.output.remove(output)
    onnx.checker.check_model(model)
    return model


def write_decider(folded: Path, policy: ExitPolicy, hidden_size: int, out: Path) -> GraphSpec:
    """Write the derived graph to `out`; returns its interface (for the profiles and the record)."""
    import onnx

    model = decider_model(folded, policy, hidden_size)
    onnx.save_model(model, str(out))
    return GraphSpec(file=Path(out).name, sha256=sha256_of(out), size=Path(out).stat().st_size,
                     inputs=_specs(model.graph.input), outputs=_specs(model.graph.output))


def _specs(values) -> list[TensorSpec]:
    from onnx import helper

    out = []
    for v in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        out.append(TensorSpec(v.name, helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name, dims))
    return out


def bundle_folded_policy(bundle_root: Path, manifest) -> Optional[tuple[ExitPolicy, Path, str]]:
    """The bundle's calibrated policy when it is folded: (policy, folded graph path, its sha256 as
    the manifest vouches for it); None when the bundle is not calibrated or decides otherwise."""
    from ..runtime.early_exit import load_policy

    root = Path(bundle_root)
    policy = load_policy(SimpleNamespace(manifest=manifest, bundle=SimpleNamespace(root=root)))
    if policy is None or policy.decision != "folded":
        return None
    spec = next((s for s in manifest.attachments.values() if s.file == policy.head_file), None)
    if spec is None:
        raise BundleError(f"exit policy names {policy.head_file}, which the manifest does not list")
    return policy, root / spec.file, spec.sha256


def write_bundle_decider(bundle_root: Path, manifest, directory: Path) -> Optional[tuple[GraphSpec, Path]]:
    """Write the bundle's exit decider into `directory` (one atomic file); None if it has no folded policy."""
    from ..atomic import staged_file

    found = bundle_folded_policy(bundle_root, manifest)
    if found is None:
        return None
    policy, folded, _ = found
    path = Path(directory) / DECIDER_FILE
    with staged_file(path, EngineError) as tmp:
        spec = write_decider(folded, policy, manifest.hidden_size, tmp)
    return GraphSpec(file=DECIDER_FILE, sha256=spec.sha256, size=spec.size, inputs=spec.inputs, outputs=spec.outputs), path
