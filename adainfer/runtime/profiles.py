"""Optimization profiles (min / opt / max per input) derived from the manifest and build options.

TensorRT needs a profile covering every dynamic input, KV cache included (TensorRT#1167, #4204),
and wide ranges cost speed (#1166), so the graphs that see a sequence get two profiles:

  profile 0 "prefill": batch 1..B, sequence 1..S, past_length 0 (the cache starts empty),
                       total_length = sequence;
  profile 1 "decode":  batch 1..B, sequence 1, past_length 1..C-1, total_length 2..C.

The heads take rows (batch rows in generation, up to B*S when every position is probed) and
get one profile. The exit decider (`exit_decider`, the folded exit head of a calibration, see
decider.py) only ever sees the last position of each batch row: one profile "decider" with
rows 1..B for all of its inputs (`hidden_states`, `previous_hidden_states`, `layer_frac`). Symbolic dims come from the manifest (`batch`, `sequence`, `past_length`,
`total_length`, `rows`); any other symbol is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ..manifest import GraphSpec, Manifest
from .engine_record import DECIDER
from .gpu_errors import EngineError

PREFILL, DECODE, ROWS, DECIDER_ROWS = "prefill", "decode", "rows", "decider"
Range = tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"  # fp32 | fp16 | int8
    max_batch: int = 1
    max_seq: Optional[int] = None  # longest prompt (prefill); default min(256, max_context)
    max_context: Optional[int] = None  # longest cache (prompt + generated); default max_positions
    opt_seq: Optional[int] = None  # prefill length tuned for; default min(64, max_seq)
    opt_context: Optional[int] = None  # decode cache length tuned for; default min(128, max_context)
    workspace_mib: int = 1024

    def resolved(self, manifest: Manifest) -> "BuildOptions":
        """Fill the defaults from the manifest and check the options against each other."""
        if self.precision not in ("fp32", "fp16", "int8"):
            raise EngineError(f"precision must be fp32, fp16 or int8, got {self.precision!r}")
        context = self.max_context if self.max_context is not None else manifest.max_positions
        seq = self.max_seq if self.max_seq is not None else min(256, context)
        for name, value in (("max_batch", self.max_batch), ("max_seq", seq), ("max_context", context)):
            if not isinstance(value, int) or value < 1:
                raise EngineError(f"{name} must be a positive integer, got {value!r}")
        if context > manifest.max_positions:
            raise EngineError(f"max_context {context} exceeds the model's {manifest.max_positions} positions")
        if context < 2:
            raise EngineError("max_context must be at least 2 (a prompt token and one generated token)")
        if seq > context:
            raise EngineError(f"max_seq {seq} exceeds max_context {context}")
        opt_seq = self.opt_seq if self.opt_seq is not None else min(64, seq)
        opt_context = self.opt_context if self.opt_context is not None else min(128, context)
        if not 1 <= opt_seq <= seq:
            raise EngineError(f"opt_seq must be in 1..{seq}, got {opt_seq}")
        if not 2 <= opt_context <= context:
            raise EngineError(f"opt_context must be in 2..{context}, got {opt_context}")
        if self.workspace_mib < 1:
            raise EngineError("workspace must be at least 1 MiB")
        return BuildOptions(self.precision, self.max_batch, seq, context, opt_seq, opt_context, self.workspace_mib)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min shape, opt shape, max shape)."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


def dim_ranges(options: BuildOptions) -> dict[str, dict[str, Range]]:
    """For each profile kind, the (min, opt, max) of every symbolic dim. `options` must be resolved."""
    b, s, c = options.max_batch, options.max_seq, options.max_context
    batch = (1, 1, b)
    sequence = (1, options.opt_seq, s)
    past = (1, options.opt_context - 1, c - 1)
    return {
        PREFILL: {"batch": batch, "sequence": sequence, "past_length": (0, 0, 0), "total_length": sequence},
        DECODE: {"batch": batch, "sequence": (1, 1, 1), "past_length": past,
                 "total_length": (past[0] + 1, past[1] + 1, past[2] + 1)},
        ROWS: {"rows": (1, 1, b * s)},
        DECIDER_ROWS: {"rows": (1, 1, b)},
    }


def profile_kinds(spec: GraphSpec, graph: str = "") -> list[str]:
    """Which profiles a graph gets: prefill + decode when it sees a sequence, one decider profile
    for the exit decider, else one rows profile."""
    if graph == DECIDER:
        return [DECIDER_ROWS]
    symbols = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    return [PREFILL, DECODE] if "sequence" in symbols else [ROWS]


def graph_profiles(graph: str, spec: GraphSpec, options: BuildOptions) -> list[Profile]:
    """The optimization profiles of one graph, in engine profile-index order."""
    ranges = dim_ranges(options)
    profiles = []
    for kind in profile_kinds(spec, graph):
        table = ranges[kind]
        shapes = {}
        for tensor in spec.inputs:
            picks = []
            for axis, dim in enumerate(tensor.shape):
                if isinstance(dim, int):
                    picks.append((dim, dim, dim))
                elif dim in table:
                    picks.append(table[dim])
                else:
                    raise EngineError(f"{graph}: input {tensor.name} has dim {dim!r} on axis {axis}, which has no "
                                      f"range in the {kind} profile")
            shapes[tensor.name] = tuple(tuple(p[i] for p in picks) for i in range(3))
        profiles.append(Profile(kind, shapes))
    return profiles


def union_profile(profiles: list[Profile]) -> Profile:
    """One profile covering several (min of mins, max of maxes, opt of the last): for runtimes
    that take a single profile per session (onnxruntime's TensorRT provider here)."""
    shapes = {}
    for name in profiles[0].shapes:
        mins = [p.shapes[name][0] for p in profiles]
        maxs = [p.shapes[name][2] for p in profiles]
        lo = tuple(min(v) for v in zip(*mins))
        hi = tuple(max(v) for v in zip(*maxs))
        shapes[name] = (lo, profiles[-1].shapes[name][1], hi)
    return Profile("+".join(p.name for p in profiles), shapes)


def shape_text(shape: tuple[int, ...]) -> str:
    """`1x64x8`: the shape syntax of trtexec and of onnxruntime's TensorRT provider options."""
    return "x".join(str(d) for d in shape)


def choose_profile(past: int, seq: int) -> int:
    """The engine profile (index) of a step of `seq` tokens on a cache of `past` positions: prefill
    (0) on an empty cache, decode (1) for one token on a filled one. Several tokens on a filled
    cache (speculative verification, a continued prompt) fit neither profile: refused in one line."""
    from ..errors import InputError

    if past == 0:
        return 0
    if seq == 1:
        return 1
    raise InputError(f"the tensorrt engines take several tokens only on an empty cache (prefill) and one at a time "
                     f"after it; got {seq} tokens on {past} cached positions")
