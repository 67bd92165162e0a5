"""`adainfer bench`: the per-block chain against transformers and one monolithic ONNX graph.

shapes.py (what is measured: a model directory or a named random-weight shape, exported once
into a cache), contenders.py (one class per way of running the model), measure.py (interleaved
timings, statistics, peak memory in subprocesses), memory.py (the subprocess), report.py
(ratios, markdown table, plot). Imports torch and transformers; the runtime never imports this.
"""
