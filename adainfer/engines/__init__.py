"""TensorRT engines for a bundle: shape profiles, fp32 islands, build records, trtexec recipes.

Everything here except `build` is pure Python (no tensorrt, no CUDA, no torch), so the shape
profiles, the precision selection, the device check and the recipes are testable on a CPU.
`build` imports `tensorrt` and `cuda-python` only when it runs. Engines are always built on
the device that runs them; the bundle ships ONNX.
"""
