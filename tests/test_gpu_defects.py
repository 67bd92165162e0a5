"""The GPU-path defects found by reading (issue #13), each with a check that runs without a GPU:
fake CUDA runtime modules, fake TensorRT execution contexts, fake ONNX Runtime sessions."""

from __future__ import annotations

import enum
import re
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest

from adainfer.errors import AdainferError, InputError
from adainfer.runtime import cuda_rt
from adainfer.runtime.gpu_errors import CudaError, EngineError, GpuUnavailableError
from conftest import ROOT


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, text
    assert isinstance(exc, AdainferError)
    return text


# ---------------------------------------------------------------- 1: `stream` shadowed on the tensorrt backend


def test_the_model_facade_keeps_stream_whatever_its_backend_holds(stories_bundle):
    from test_engines import trt_on_ort

    model = trt_on_ort(stories_bundle)
    assert callable(model.stream) and not hasattr(model.backend, "stream")  # the CUDA stream is `_stream`
    assert [e.token for e in model.stream("Once upon a time", max_new_tokens=5)] == \
        model.generate("Once upon a time", max_new_tokens=5).tokens


# ---------------------------------------------------------------- 2: supported versions, pinned and checked


@pytest.mark.parametrize("version,ok", [("10.3.0", True), ("10.13.3.9", True), ("11.4.0.106", True),
                                        ("10.0.1", False), ("8.6.1", False), ("12.0.0", False), ("", False)])
def test_tensorrt_versions_outside_the_range_are_refused_in_one_line(version, ok):
    from adainfer.runtime.gpu_versions import check_tensorrt

    trt = SimpleNamespace(__version__=version)
    if ok:
        check_tensorrt(trt)
    else:
        with pytest.raises(GpuUnavailableError) as err:
            check_tensorrt(trt)
        assert "tensorrt>=10.3,<12" in one_line(err.value)


@pytest.mark.parametrize("version,ok", [("12.3.0", True), ("12.9.1", True), ("13.0.1", True), ("11.8.0", False),
                                        ("14.0.0", False)])
def test_cuda_python_versions_outside_the_range_are_refused_in_one_line(version, ok):
    from adainfer.runtime.gpu_versions import check_cuda_python

    if ok:
        check_cuda_python(version)
    else:
        with pytest.raises(GpuUnavailableError, match="cuda-python>=12.0,<14"):
            check_cuda_python(version)


def test_the_gpu_extra_pins_the_checked_ranges():
    from adainfer.runtime.gpu_versions import CUDA_PYTHON_PIN, TENSORRT_PIN

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert TENSORRT_PIN in extras and CUDA_PYTHON_PIN in extras


# ---------------------------------------------------------------- 3: CUDA errors become one line


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInsufficientDriver = 35
    cudaErrorNoDevice = 100
    cudaErrorMemoryAllocation = 2


def fake_cudart(count_result=None, count_raises=None):
    def get_count():
        if count_raises is not None:
            raise count_raises
        return count_result

    return SimpleNamespace(cudaError_t=Err, cudaGetDeviceCount=get_count,
                           cudaGetErrorName=lambda err: (Err.cudaSuccess, Err(err).name.encode()),
                           cudaMalloc=lambda n: (Err.cudaErrorMemoryAllocation, 0))


@pytest.mark.parametrize("rt,words", [
    (fake_cudart(count_raises=RuntimeError("Failed to dlopen libcuda.so.1")), "no CUDA driver could be loaded (Failed to dlopen libcuda.so.1)"),
    (fake_cudart((Err.cudaErrorInsufficientDriver, 0)), "no usable NVIDIA driver (cudaErrorInsufficientDriver"),
])
def test_cuda_start_failures_are_one_line_gpu_unavailable(monkeypatch, rt, words):
    monkeypatch.setattr(cuda_rt, "_CUDART", rt)
    with pytest.raises(GpuUnavailableError) as err:
        cuda_rt.device_count()
    assert words in one_line(err.value)


def test_no_device_is_zero_devices_and_a_failed_call_names_itself(monkeypatch):
    monkeypatch.setattr(cuda_rt, "_CUDART", fake_cudart((Err.cudaErrorNoDevice, 0)))
    assert cuda_rt.device_count() == 0
    with pytest.raises(GpuUnavailableError, match="no CUDA device found"):
        cuda_rt.require_gpu(need_tensorrt=False)
    monkeypatch.setattr(cuda_rt, "_CUDART", fake_cudart((Err.cudaSuccess, 2)))
    assert cuda_rt.device_count() == 2
    with pytest.raises(CudaError) as err:
        cuda_rt.DeviceBuffer(1024)
    assert one_line(err.value) == "cudaMalloc(1024) failed: cudaErrorMemoryAllocation"


# ---------------------------------------------------------------- 5: aligned addresses, checked return values


class Context:
    """A TensorRT execution context that accepts or refuses what it is told to."""

    def __init__(self, shape_ok=True, address_ok=True, run_ok=True):
        self.shape_ok, self.address_ok, self.run_ok = shape_ok, address_ok, run_ok
        self.addresses = {}

    def set_input_shape(self, name, shape):
        return self.shape_ok

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return self.address_ok

    def execute_async_v3(self, stream):
        return self.run_ok


@pytest.mark.parametrize("context,address,words", [
    (Context(), 0x7F00_0000_0104, "not 256-byte aligned"),
    (Context(address_ok=False), 0x7F00_0000_0100, "refused the address of x"),
    (Context(shape_ok=False), 0x7F00_0000_0100, "refused shape (1, 4) for x"),
    (Context(run_ok=False), 0x7F00_0000_0100, "failed to enqueue"),
])
def test_refused_shapes_addresses_and_runs_are_one_line_errors(context, address, words):
    from adainfer.runtime.backends.tensorrt import run_context

    with pytest.raises(EngineError) as err:
        run_context("block_00", context, ["x"], {"x": (1, 4)}, {"x": address}, None)
    assert words in one_line(err.value)
    run_context("block_00", Context(), ["x"], {"x": (1, 4)}, {"x": 0x7F00_0000_0200}, None)


def test_every_address_the_tensorrt_backend_binds_is_aligned(stories_bundle):
    """The layer-fraction table once moved in 4-byte steps; the fake contexts refuse unaligned addresses."""
    from adainfer.runtime.device_memory import ALIGNMENT, HostMemory, aligned
    from test_engines import trt_on_ort

    model = trt_on_ort(stories_bundle, max_batch=2)
    model.generate("Once upon a time", max_new_tokens=4)
    model.last_logits([[1, 403, 407], [1, 9]])
    contexts = [c for e in model.backend.engines.values() for c in e.contexts]
    assert not [r for c in contexts for r in c.refusals]
    assert all(ptr % ALIGNMENT == 0 for c in contexts for ptr in c.addresses.values())
    assert aligned(8) == 256 and aligned(256) == 256 and aligned(257) == 512
    assert all(HostMemory().alloc(n).ptr % ALIGNMENT == 0 for n in (1, 7, 300))


# ---------------------------------------------------------------- 6: no CUDA graphs kept


def test_the_tensorrt_backend_captures_no_cuda_graphs():
    import inspect

    import adainfer.runtime.backends.tensorrt as trt_backend

    source = inspect.getsource(trt_backend)
    assert "cudaGraph" not in source and "cudaStreamBeginCapture" not in source


# ---------------------------------------------------------------- 7: the profile of a step


def test_profiles_follow_the_cache_not_the_parity_of_the_step():
    from adainfer.runtime.profiles import choose_profile

    assert choose_profile(0, 1) == choose_profile(0, 6) == 0 and choose_profile(9, 1) == 1
    for seq in (2, 3):  # an odd multi-token step on a filled cache once chose the decode profile
        with pytest.raises(InputError, match=f"got {seq} tokens on 9 cached positions"):
            choose_profile(9, seq)


def test_a_multi_token_step_on_a_filled_cache_is_refused_before_any_engine_runs(stories_bundle):
    from test_engines import trt_on_ort

    model = trt_on_ort(stories_bundle)
    state, _ = model.start([[1, 403, 407]])
    before = sum(e.executions for e in model.backend.engines.values())
    ids = np.array([[5, 6, 7]])
    with pytest.raises(InputError, match="one at a time"):
        model.forward(ids, state, np.ones_like(ids))
    assert sum(e.executions for e in model.backend.engines.values()) == before


# ---------------------------------------------------------------- 8: ONNX Runtime providers


class Session:
    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_a_provider_that_fell_back_to_the_cpu_is_refused():
    from adainfer.runtime.sessions import check_providers

    check_providers(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]), "CUDAExecutionProvider", "block_00.onnx")
    with pytest.raises(GpuUnavailableError) as err:
        check_providers(Session(["CPUExecutionProvider"]), "TensorrtExecutionProvider", "block_00.onnx")
    assert "could not start TensorrtExecutionProvider and fell back to CPUExecutionProvider" in one_line(err.value)


def test_onnxruntime_and_onnxruntime_gpu_side_by_side_are_refused():
    from adainfer.runtime.backends.ort_iobinding import check_single_onnxruntime

    check_single_onnxruntime({"onnxruntime-gpu", "numpy"})
    with pytest.raises(GpuUnavailableError) as err:
        check_single_onnxruntime({"onnxruntime", "onnxruntime-gpu"})
    assert "pip uninstall onnxruntime" in one_line(err.value)


def test_the_ort_trt_profile_covers_the_batch_asked_for(stories_bundle):
    from adainfer.runtime.backends.ort_iobinding import providers_for
    from adainfer.runtime.bundle import open_bundle

    bundle = open_bundle(stories_bundle, check_digests=False)
    (trt, options), cuda = providers_for(bundle, "block_00", "ort-trt", max_batch=4)
    assert trt == "TensorrtExecutionProvider" and cuda[0] == "CUDAExecutionProvider"
    assert re.search(r"hidden_states:4x\d+x64", options["trt_profile_max_shapes"])
    assert "trt_fp16_enable" not in options  # precision is the bundle's


# ---------------------------------------------------------------- 9: device resources are released


def test_close_releases_the_buffers_the_backend_and_its_caches_hold(stories_bundle):
    from test_engines import trt_on_ort

    model = trt_on_ort(stories_bundle)
    state, _ = model.start([[1, 403, 407]])
    buffers = [b for pairs in state.buffers for pair in pairs for b in pair]
    state.close()
    assert buffers and all(b.ptr == 0 for b in buffers)
    backend = model.backend
    held = [*backend._hidden, *backend._rows, backend._logits]
    with model:
        pass
    assert all(b.ptr == 0 for b in held) and backend.engines == {}
