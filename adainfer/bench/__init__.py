"""`adainfer bench`: our chain against what a user would run instead, and against one monolithic ONNX graph.

shapes.py (what is measured: a GGUF file, a model directory or a named random-weight shape, exported
once per precision into a cache), peers.py (onnxruntime-genai builds, sizes on disk), contenders.py
(one class per way of running the model), worker.py (one contender per process: timing and peak RSS
there), remote.py (the parent's handle on a worker), measure.py (interleaved repeats, statistics),
report.py (ratios and targets, markdown table, plot). Imports torch and transformers; the runtime
never imports this.
"""
