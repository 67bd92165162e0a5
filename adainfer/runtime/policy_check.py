"""Strict checks of an exit policy (`exit_policy.json`) and of the files it makes the runtime open.

Called from `ExitPolicy.load` (field types, before the dataclass is built), `ExitPolicy.validate`
(values), `load_policy` (the named files are attachments the manifest lists with their sha256)
and `ExitDecider` (the classifier's and head's real interfaces fit the policy). Every refusal is
one `BundleError` line naming the field.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from pathlib import PurePosixPath
from typing import Any

from ..errors import BundleError

FILE_FIELDS = ("head_file", "classifier_file")
#: decisions that score the policy's features themselves, so need at least one
NEEDS_FEATURES = ("rule", "classifier")
WHERE = "exit_policy.json"


def _type_ok(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_type_ok(args[0], v) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True  # a type this check does not know: left to the policy's own validation


_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
         list: "a list"}


def check_policy_data(cls, data: Any) -> None:
    """The parsed JSON has the policy's fields with the declared types (unknown fields: refused by the caller)."""
    if not isinstance(data, dict):
        raise BundleError(f"{WHERE}: expected a JSON object")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in data and not _type_ok(hints[f.name], data[f.name]):
            tp = hints[f.name]
            base = typing.get_origin(tp) or tp
            if typing.get_origin(tp) is typing.Union:
                base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
                base = typing.get_origin(base) or base
            kind = _KIND.get(base, "of type " + getattr(base, "__name__", str(base)))
            raise BundleError(f"{WHERE}: {f.name} must be {kind}, got {_short(data[f.name])}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and "\\" not in name and ":" not in name and ".." not in path.parts \
        and path.parts not in ((), (".",)) and not any(ord(c) < 32 or c == "\x7f" for c in name)


def check_policy_values(policy) -> None:
    """Values a policy object must have, wherever it came from (file or code)."""
    threshold = policy.threshold
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise BundleError(f"{WHERE}: threshold must be a number, got {_short(threshold)}")
    if math.isnan(threshold):
        raise BundleError(f"{WHERE}: threshold must not be NaN (a NaN threshold never fires)")
    for name in ("min_layer", "stride", "score_output", "score_column"):
        value = getattr(policy, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise BundleError(f"{WHERE}: {name} must be an integer, got {_short(value)}")
    if policy.score_output < 0 or policy.score_column < 0:
        raise BundleError(f"{WHERE}: score_output and score_column must be >= 0")
    if not isinstance(policy.extras, dict):
        raise BundleError(f"{WHERE}: extras must be an object, got {_short(policy.extras)}")
    if policy.decision in NEEDS_FEATURES and not policy.features:
        raise BundleError(f"{WHERE}: decision {policy.decision!r} needs at least one feature")
    for field in FILE_FIELDS:
        name = getattr(policy, field)
        if name is not None and (not isinstance(name, str) or not _plain(name)):
            raise BundleError(f"{WHERE}: {field} {name!r} is not a plain path inside the bundle")
    if policy.decision == "classifier" and not policy.classifier_file:
        raise BundleError(f"{WHERE}: decision 'classifier' needs classifier_file")


def check_policy_files(policy, manifest) -> None:
    """The files the policy names are attachments of the bundle (so `open_bundle` checked their sha256)."""
    attached = {str(PurePosixPath(spec.file)) for spec in manifest.attachments.values()}
    for field in FILE_FIELDS:
        name = getattr(policy, field)
        if name is not None and str(PurePosixPath(name)) not in attached:
            raise BundleError(f"{WHERE}: {field} {name} is not an attachment listed in manifest.json "
                              f"(every file the runtime opens must be listed with its sha256)")


def check_decider_sessions(decider) -> None:
    """The classifier and head graphs a decider opened fit its policy (inputs, widths, outputs)."""
    policy = decider.policy
    if decider.classifier is not None:
        name = policy.classifier_file
        inputs, outputs = decider.classifier.get_inputs(), decider.classifier.get_outputs()
        if len(inputs) != 1:
            raise BundleError(f"{name} is not an exit classifier: it has {len(inputs)} inputs, the runtime feeds one")
        shape = inputs[0].shape
        width = shape[-1] if shape else None
        if len(shape or []) != 2 or (isinstance(width, int) and width != len(policy.features)):
            raise BundleError(f"{name} takes {width} features, the policy lists {len(policy.features)} "
                              f"({', '.join(policy.features)})")
        if policy.score_output >= len(outputs):
            raise BundleError(f"{WHERE}: score_output {policy.score_output} is not an output of {name} "
                              f"(it has {len(outputs)})")
        out_shape = outputs[policy.score_output].shape or []
        columns = out_shape[1] if len(out_shape) == 2 else None
        if isinstance(columns, int) and policy.score_column >= columns:
            raise BundleError(f"{WHERE}: score_column {policy.score_column} is not a column of {name}'s output "
                              f"{policy.score_output} (it has {columns})")
    if decider.head_session is not None:
        name = policy.head_file
        kind = "folded exit head" if policy.decision == "folded" else "low-rank exit head"
        needed = {"score"} if policy.decision == "folded" else {"top1_prob", "gap"}
        inputs = {i.name: i for i in decider.head_session.get_inputs()}
        outputs = set(decider.head_outputs)
        hidden = inputs.get("hidden_states")
        ok = (set(inputs) <= {"hidden_states", "extra_features"} and needed <= outputs
              and (hidden is None or len(hidden.shape or []) == 2))
        if not ok:
            raise BundleError(f"{name} is not a {kind}: it takes {', '.join(sorted(inputs)) or 'nothing'} and gives "
                              f"{', '.join(sorted(outputs))}; the runtime feeds hidden_states (rows, hidden) "
                              f"and reads {', '.join(sorted(needed))}")
        width = hidden.shape[-1] if hidden is not None else None
        size = decider.model.manifest.hidden_size if hasattr(decider.model, "manifest") else None
        if isinstance(width, int) and size is not None and width != size:
            raise BundleError(f"{name} takes hidden states of width {width}, the model's are {size}")
