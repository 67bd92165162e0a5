"""Reuse one export's calibrated exit in another export of the same model (e.g. fp32 -> int8).

`adainfer calib` on a quantized bundle trains the classifier on that bundle's own hidden states
(the default, and what `tools/quant_study.py` calls "recalibrated"). `reuse_policy` instead
copies the exit policy and its classifier files from a calibrated bundle (usually the fp32 one)
into another export of the same model, a deliberate transfer: the copied policy records the
destination's manifest digest (so `load_policy` accepts it there) and
`extras["transferred_from"]` = the source's digest.

    adainfer calib QUANT_BUNDLE --reuse-policy FP32_BUNDLE

Files copied: `exit_policy.json`, `classifier.onnx`, the label head (classification) and the policy's head file (folded exit
head or low-rank head). A folded head that extends the *full* exit head is rebuilt on the
destination's own exit head when the two differ (`--quantize-heads`), with the same classifier
weights; a low-rank head is copied as is (an approximation of the source's head). Calibration
files the destination had (its own report, plots, classifier) are removed with their
attachments, since they describe a policy that is no longer there. One `staged_update`: the
destination changes completely or not at all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..atomic import staged_update
from ..errors import BundleError, InputError
from ..manifest import Manifest
from ..runtime.exit_policy import POLICY_FILE, ExitPolicy

#: attachment keys written by `adainfer calib` (plus every "plot_*"); other attachments are left alone
CALIB_KEYS = ("classifier", "exit_policy", "calib_report", "exit_head_folded", "exit_head_lowrank", "label_head",
              "exit_probes")
#: what must be equal for a policy to mean the same thing in both exports
SAME = ("family", "model_type", "num_layers", "hidden_size", "vocab_size", "num_heads", "num_kv_heads", "head_dim")


def _is_calib_key(key: str) -> bool:
    return key in CALIB_KEYS or key.startswith("plot_")


def _folded_weights(path: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """The linear classifier inside a folded exit head: head weights, extra-feature weights, bias."""
    from onnx import numpy_helper

    from .head_graphs import load_graph

    inits = {t.name: numpy_helper.to_array(t) for t in load_graph(path).graph.initializer}
    if "fold_bias" not in inits:
        raise BundleError(f"{path.name}: not a folded exit head (no fold_bias)")
    empty = np.zeros((0,), np.float32)
    return (inits.get("fold_w_head", empty).reshape(-1), inits.get("fold_w_extra", empty).reshape(-1),
            float(inits["fold_bias"].reshape(-1)[0]))


def reuse_policy(src_bundle: Path, dst_bundle: Path) -> ExitPolicy:
    """Copy `src_bundle`'s calibrated exit policy (+ classifier files) into `dst_bundle`; returns the new policy."""
    from ..runtime import load
    from ..runtime.early_exit import ExitDecider, load_policy

    src_bundle, dst_bundle = Path(src_bundle), Path(dst_bundle)
    if src_bundle.resolve() == dst_bundle.resolve():
        raise InputError(f"--reuse-policy: {src_bundle} is the bundle being calibrated")
    src_model = load(src_bundle)
    policy = load_policy(src_model)  # refuses a source whose own policy does not match its export
    if policy is None:
        raise InputError(f"{src_bundle} has no exit policy to reuse: run `adainfer calib {src_bundle}` first")
    src, dst = src_model.manifest, Manifest.load(dst_bundle)
    different = [f for f in SAME if getattr(src, f) != getattr(dst, f)]
    if different:
        f = different[0]
        raise InputError(f"cannot reuse the policy of {src_bundle} in {dst_bundle}: another model "
                         f"({f} {getattr(src, f)} vs {getattr(dst, f)})")
    src_digest, dst_digest = src.digest(), dst.digest()
    if src_digest == dst_digest:
        raise InputError(f"{src_bundle} and {dst_bundle} are the same export; nothing to transfer")

    copied = {"exit_policy": POLICY_FILE}
    if policy.classifier_file:
        copied["classifier"] = policy.classifier_file
    refolded = False
    with staged_update(dst_bundle, BundleError) as update:
        for key, spec in dst.attachments.items():
            if _is_calib_key(key):
                dst = dst.detach(key)
                update.remove(spec.file)
        if policy.classifier_file:
            update.path(policy.classifier_file).write_bytes((src_bundle / policy.classifier_file).read_bytes())
        if policy.label_head_file:  # final norm + label columns of the source's LM head (same model)
            update.path(policy.label_head_file).write_bytes((src_bundle / policy.label_head_file).read_bytes())
            copied["label_head"] = policy.label_head_file
        if policy.head_file:
            key = {"folded": "exit_head_folded", "probe": "exit_probes"}.get(policy.decision, "exit_head_lowrank")
            copied[key] = policy.head_file
            dst_head = dst_bundle / dst.graphs["exit_head"].file
            if (policy.decision == "folded" and policy.head == "full"
                    and _weights_digest(src_bundle / src.graphs["exit_head"].file)
                    != _weights_digest(dst_head)):
                from .head_graphs import fold_linear

                w_head, w_extra, bias = _folded_weights(src_bundle / policy.head_file)
                fold_linear(dst_head if w_head.size else None, update.path(policy.head_file), w_head, w_extra, bias)
                refolded = True
            else:
                update.path(policy.head_file).write_bytes((src_bundle / policy.head_file).read_bytes())
        extras = {k: v for k, v in policy.extras.items() if k not in ("manifest_digest", "transferred_from")}
        policy = dataclasses.replace(policy, extras={**extras, "manifest_digest": dst_digest,
                                                     "transferred_from": src_digest,
                                                     "transferred_from_precision": _precision(src),
                                                     "refolded_on_destination_exit_head": refolded})
        policy.save(update.path(POLICY_FILE))
        ExitDecider(load(dst_bundle), policy, root=update.dir)  # the staged classifier / head files load
        for key, name in copied.items():
            dst = dst.attach(key, update.dir, name)
        dst = dataclasses.replace(dst, extras={**dst.extras, "exit_decision": policy.decision})
        dst.save(update.dir)
    return policy


def _weights_digest(graph_path: Path) -> str:
    """sha256 over a graph's nodes and initializer values, wherever its external data lives: two
    exports whose heads hold the same weights at different offsets of their shared weight file
    (the blocks around them were converted) have different graph files but the same head."""
    import hashlib

    from onnx import numpy_helper

    from .head_graphs import load_graph

    model = load_graph(graph_path)  # external data resolved against the graph's directory
    digest = hashlib.sha256()
    for node in model.graph.node:
        digest.update(node.SerializeToString())
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        digest.update(tensor.name.encode())
        digest.update(np.ascontiguousarray(numpy_helper.to_array(tensor)).tobytes())
    return digest.hexdigest()


def _precision(manifest: Manifest) -> str:
    return str(manifest.extras.get("quantization", {}).get("precision", "fp32"))

