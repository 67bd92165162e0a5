"""ONNX Runtime on the GPU: the CUDA or TensorRT execution provider, with I/O binding so hidden
states and the KV cache stay on the device between blocks and steps.

ONNX Runtime Python API (onnxruntime.ai/docs/api/python, "Data on device"): a session's
`io_binding()`; `bind_ortvalue_input` for tensors already on the GPU (OrtValues from
`OrtValue.ortvalue_from_numpy(array, "cuda", device_id)` or a previous run's outputs);
`bind_output(name, "cuda", device_id)` lets ONNX Runtime allocate the output on the device;
`bind_input(..., buffer_ptr=...)` binds raw device memory (a one-token step's hidden states are
already (batch, hidden) rows); `run_with_iobinding`; `get_outputs()`. Only token ids, positions,
the mask and the final logits cross to or from the host.

The TensorRT provider gets one profile per graph (the union of adainfer's prefill and decode
profiles, `trt_profile_min/opt/max_shapes`), fp16 on request, and caches its engines and timing
cache under `engines/ort-trt/` in the bundle. onnxruntime-gpu must be installed (on Jetson from
the Jetson channels, not PyPI: docs/jetson.md).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..engines.errors import GpuUnavailableError
from ..engines.profiles import BuildOptions, graph_profiles, shape_text, union_profile
from ..errors import InputError
from .bundle import Bundle, open_bundle
from .device_exit import DeviceDecider, run_blocks
from .exit_policy import ExitPolicy
from .model import DecodeState, LayerRun, Model
from .sessions import make_session, session_options
from .tokenizer import TextTokenizer

PROVIDERS = {"ort-cuda": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}


def providers_for(bundle: Bundle, graph: str, backend: str, device_id: int = 0, fp16: bool = False) -> list:
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if backend == "ort-cuda":
        return [cuda]
    spec = bundle.manifest.graphs[graph]
    profile = union_profile(graph_profiles(graph, spec, BuildOptions().resolved(bundle.manifest)))
    texts = [",".join(f"{n}:{shape_text(s[i])}" for n, s in profile.shapes.items()) for i in range(3)]
    cache = str(bundle.root / "engines" / "ort-trt")
    trt = {"device_id": device_id, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
           "trt_engine_cache_path": cache, "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
           "trt_profile_min_shapes": texts[0], "trt_profile_opt_shapes": texts[1], "trt_profile_max_shapes": texts[2]}
    return [("TensorrtExecutionProvider", trt), cuda]


class OrtGpuModel(Model):
    """The ONNX Runtime chain with the KV cache as device OrtValues."""

    def __init__(self, bundle: Bundle, backend: str = "ort-cuda", device_id: int = 0, fp16: bool = False,
                 threads: Optional[int] = None):
        import onnxruntime as ort

        wanted = PROVIDERS[backend]
        if wanted not in ort.get_available_providers():
            raise GpuUnavailableError(f"this onnxruntime has no {wanted} (install onnxruntime-gpu; on Jetson from the "
                                      f"Jetson channels, see docs/jetson.md)")
        self.backend, self.device_id = backend, device_id
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        if backend == "ort-trt":
            (bundle.root / "engines" / "ort-trt").mkdir(parents=True, exist_ok=True)
        self.sessions = {g: make_session(bundle.graph_path(g), providers_for(bundle, g, backend, device_id, fp16), threads)
                         for g in m.graphs}
        self._inputs = {g: [i.name for i in s.get_inputs()] for g, s in self.sessions.items()}
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        tok = bundle.tokenizer_path
        self.tokenizer = TextTokenizer(tok) if tok is not None else None
        self.num_layers = m.num_layers
        self.session_calls = {g: 0 for g in m.graphs}
        self._ort = ort
        self._decider, self._decider_session, self._decider_session_key = None, None, None

    def _device(self, array: np.ndarray):
        return self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), "cuda", self.device_id)

    def new_state(self, batch: int) -> DecodeState:
        m = self.manifest
        empty = np.zeros((batch, m.num_kv_heads, 0, m.head_dim), dtype=np.float32)
        return DecodeState(keys=[self._device(empty) for _ in range(m.num_layers)],
                           values=[self._device(empty) for _ in range(m.num_layers)],
                           attention_mask=np.zeros((batch, 0), dtype=np.int64), next_position=np.zeros(batch, dtype=np.int64))

    def forward(self, input_ids: np.ndarray, state: DecodeState, step_mask: np.ndarray) -> np.ndarray:
        m = self.manifest
        batch, seq = input_ids.shape
        hidden, positions, mask, _ = self._embed(input_ids, state, step_mask)
        for layer in range(m.num_layers):
            name = m.block_name(layer)
            binding = self.sessions[name].io_binding()
            for key, value in (("hidden_states", hidden), ("position_ids", positions), ("attention_mask", mask),
                               ("past_key", state.keys[layer]), ("past_value", state.values[layer])):
                binding.bind_ortvalue_input(key, value)
            for out in self._outputs[name]:
                binding.bind_output(out, "cuda", self.device_id)
            hidden, state.keys[layer], state.values[layer] = self._run(name, binding)

        binding = self.sessions["final_head"].io_binding()
        if seq == 1:  # (batch, 1, hidden) on the device is already (batch, hidden) rows
            binding.bind_input("hidden_states", "cuda", self.device_id, np.float32, [batch, m.hidden_size], hidden.data_ptr())
        else:  # prefill: the last position of each row, batch x hidden floats
            binding.bind_cpu_input("hidden_states", np.ascontiguousarray(hidden.numpy()[:, -1, :]))
        binding.bind_output("logits")
        (logits,) = self._run("final_head", binding)
        return logits.numpy()

    def _embed(self, input_ids: np.ndarray, state: DecodeState, step_mask: np.ndarray):
        """Advance the state and run the embedding on the device: (hidden, positions, mask) as
        device values, plus the position ids on the host."""
        position_ids = state.advance(step_mask)
        positions, mask = self._device(position_ids), self._device(state.attention_mask)
        binding = self.sessions["embed"].io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        if "position_ids" in self._inputs["embed"]:
            binding.bind_ortvalue_input("position_ids", positions)
        binding.bind_output("hidden_states", "cuda", self.device_id)
        (hidden,) = self._run("embed", binding)
        return hidden, positions, mask, position_ids

    def _run(self, graph: str, binding):
        self.session_calls[graph] += 1
        self.sessions[graph].run_with_iobinding(binding)
        return binding.get_outputs()

    def final_logits(self, hidden_last: np.ndarray) -> np.ndarray:
        self.session_calls["final_head"] += 1
        (logits,) = self.sessions["final_head"].run(None, {"hidden_states": np.ascontiguousarray(hidden_last, dtype=np.float32)})
        return logits

    def exit_features(self, hidden_last: np.ndarray):
        self.session_calls["exit_head"] += 1
        top1, prob, gap = self.sessions["exit_head"].run(["top1_id", "top1_prob", "gap"],
                                                         {"hidden_states": np.ascontiguousarray(hidden_last, dtype=np.float32)})
        return top1, prob, gap

    # ------------------------------------------------------------------ early exit

    def run_layers(self, input_ids: np.ndarray, state: DecodeState, step_mask: np.ndarray, decider=None) -> LayerRun:
        """Embed and run the blocks with the hidden states on the device; with a `decider` stop where
        it says (module docstring). `hidden` of the result is the exit block's output, on the host."""
        from ..engines.decider import HIDDEN, LAYER_FRAC, PREVIOUS, layer_fractions

        m = self.manifest
        decider = self._exit_decider(decider)
        batch, seq = input_ids.shape
        embedded, positions, mask, position_ids = self._embed(input_ids, state, step_mask)
        hidden = {0: embedded}  # hidden[l]: output of block l (0: the embedding)

        def block(layer: int) -> None:
            name = m.block_name(layer - 1)
            b = self.sessions[name].io_binding()
            for key, value in (("hidden_states", hidden[layer - 1]), ("position_ids", positions), ("attention_mask", mask),
                               ("past_key", state.keys[layer - 1]), ("past_value", state.values[layer - 1])):
                b.bind_ortvalue_input(key, value)
            for out in self._outputs[name]:
                b.bind_output(out, "cuda", self.device_id)
            hidden[layer], state.keys[layer - 1], state.values[layer - 1] = self._run(name, b)
            hidden.pop(layer - 2, None)  # keep this block's input and output only

        def last_rows(value) -> tuple:
            if seq == 1:  # (batch, 1, hidden) on the device is already (batch, hidden) rows
                return ("cuda", value.data_ptr())
            return ("cpu", np.ascontiguousarray(value.numpy()[:, -1, :]))  # prefill: batch x hidden floats

        def decide(layer: int, d: DeviceDecider) -> dict:
            session = self._decider_session
            b = session.io_binding()
            feeds = {HIDDEN: hidden[layer], PREVIOUS: hidden[layer - 1]}
            names = [i.name for i in session.get_inputs()]
            for name in names:
                if name == LAYER_FRAC:
                    b.bind_cpu_input(name, layer_fractions(m.num_layers, batch)[layer - 1])
                    continue
                where, value = last_rows(feeds[name])
                if where == "cuda":
                    b.bind_input(name, "cuda", self.device_id, np.float32, [batch, m.hidden_size], value)
                else:
                    b.bind_cpu_input(name, value)
            for name in d.outputs:
                b.bind_output(name)  # to the host: score (4 bytes), top1_id (8 bytes) per row
            session.run_with_iobinding(b)
            return dict(zip(d.outputs, [v.numpy() for v in b.get_outputs()]))

        if isinstance(decider, DeviceDecider) or decider is None:
            exit_layer, decisions, decision = run_blocks(m.num_layers, block, decide, decider)
        else:  # ExitDecider on the host: 2 x hidden floats per row come down per evaluated layer
            exit_layer, decisions, decision = m.num_layers, 0, None
            for layer in range(1, m.num_layers + 1):
                block(layer)
                if decider.evaluates(layer):
                    decisions += 1
                    current = hidden[layer].numpy()[:, -1, :]
                    previous = hidden[layer - 1].numpy()[:, -1, :]
                    decision = decider.decide(layer, current, previous)
                    if decision.stop:
                        exit_layer = layer
                        break
                    decision = None
        state.complete_layers = exit_layer if exit_layer < m.num_layers else None
        return LayerRun(hidden[exit_layer].numpy(), position_ids, exit_layer, decisions,
                        decision.token if decision is not None else None)

    def decider(self):
        """The bundle's calibrated exit policy for this backend (None if never calibrated)."""
        if self._decider is None:
            from .early_exit import load_policy

            policy = load_policy(self)
            self._decider = self._exit_decider(policy) if policy is not None else None
        return self._decider

    def _exit_decider(self, decider):
        """A DeviceDecider for folded policies (decider graph on the GPU), else an ExitDecider on the host."""
        from .early_exit import ExitDecider

        if decider is None or isinstance(decider, DeviceDecider):
            return decider
        policy = decider if isinstance(decider, ExitPolicy) else decider.policy
        if policy.decision != "folded":
            return decider if isinstance(decider, ExitDecider) else ExitDecider(self, policy)
        device = DeviceDecider(policy, self.num_layers, self.backend)
        key = (policy.head_file, tuple(policy.features))
        if self._decider_session is None or self._decider_session_key != key:
            from ..engines.decider import decider_model

            try:
                model = decider_model(self.bundle.root / policy.head_file, policy, self.manifest.hidden_size)
            except ModuleNotFoundError:
                raise GpuUnavailableError("early exit on the ONNX Runtime GPU backends needs the onnx package "
                                          "(pip install 'adainfer[gpu]')") from None
            self._decider_session = self._ort.InferenceSession(
                model.SerializeToString(), sess_options=session_options(),
                providers=[("CUDAExecutionProvider", {"device_id": self.device_id})])
            self._decider_session_key = key
        return device

    def stream(self, *args, **kwargs):
        if kwargs.get("mode", "full") != "full":
            raise InputError(f"the {self.backend} backend generates at full depth (its early-exit decisions run through "
                             f"run_layers / early_exit.predict); use --backend tensorrt or onnxruntime for --mode "
                             f"{kwargs['mode']}")
        return super().stream(*args, **kwargs)

    def finish_layers(self, *args, **kwargs):
        raise InputError(f"the {self.backend} backend does not re-run skipped blocks (finish_layers)")


def load_ort_gpu(bundle_dir, backend: str = "ort-cuda", check_digests: bool = True, fp16: bool = False,
                 threads: Optional[int] = None) -> OrtGpuModel:
    return OrtGpuModel(open_bundle(bundle_dir, check_digests=check_digests), backend=backend, fp16=fp16, threads=threads)
