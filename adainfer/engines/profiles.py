"""Optimization profiles: defined in the runtime (`runtime/profiles.py`; the ort-trt backend gives
them to ONNX Runtime's TensorRT provider at load) and re-exported here for the build side."""

from ..runtime.profiles import (DECIDER_ROWS, DECODE, PREFILL, ROWS, BuildOptions, Profile, dim_ranges, graph_profiles,
                                profile_kinds, shape_text, union_profile)

__all__ = ["DECIDER_ROWS", "DECODE", "PREFILL", "ROWS", "BuildOptions", "Profile", "dim_ranges", "graph_profiles",
           "profile_kinds", "shape_text", "union_profile"]
