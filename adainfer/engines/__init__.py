"""TensorRT engines for a bundle, at build time only: strongly typed builds, trtexec recipes, the exit decider graph.

The runtime never imports this package; what both sides need (shape profiles, the engine record,
the GPU errors, the decider's tensor names) lives in `adainfer.runtime` and is re-exported here.
Everything here except `build` is pure Python (no tensorrt, no CUDA, no torch), so the
precision check, the device check and the recipes are testable on a CPU.
`build` imports `tensorrt` and `cuda-python` only when it runs. Engines are always built on
the device that runs them; the bundle ships ONNX.
"""
