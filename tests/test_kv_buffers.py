"""The KV cache in preallocated buffers (kv_buffers.BufferKVCache) against the numpy cache, for the
dtypes block graphs use (float32, float16, and int8 for an int8-KV export)."""

from __future__ import annotations

import numpy as np
import pytest

from adainfer.errors import InputError
from adainfer.runtime.backends.cpu import HostKVCache
from adainfer.runtime.device_memory import HostMemory
from adainfer.runtime.kv_buffers import BufferKVCache

LAYERS, BATCH, HEADS, DIM = 3, 2, 2, 4


def random_kv(rng, seq, dtype):
    shape = (BATCH, HEADS, seq, DIM)
    if np.dtype(dtype).kind == "i":
        return [rng.integers(-128, 128, size=shape).astype(dtype) for _ in range(2)]
    return [rng.standard_normal(shape).astype(dtype) for _ in range(2)]


def same(a, b):
    for layer in range(LAYERS):
        for x, y in zip(a.layer(layer), b.layer(layer)):
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int8])
def test_append_truncate_fork_and_growth_match_the_numpy_cache(dtype):
    rng = np.random.default_rng(0)
    host = HostKVCache.empty(LAYERS, BATCH, HEADS, DIM, dtype)
    buffers = BufferKVCache(HostMemory(), LAYERS, BATCH, HEADS, DIM, dtype, max_capacity=40, capacity=3)
    for seq in (5, 1, 1, 7, 1):  # grows past the first capacity twice
        for layer in range(LAYERS):
            keys, values = random_kv(rng, seq, dtype)
            host.append(layer, keys, values)
            buffers.append(layer, keys.ctypes.data, values.ctypes.data, seq)
        mask = np.ones((BATCH, seq), dtype=np.int64)
        host.advance(mask)
        buffers.advance(mask)
    same(host, buffers)
    assert buffers.capacity >= 15
    fork = buffers.fork()
    host_fork = host.fork()
    keys, values = random_kv(rng, 2, dtype)
    for layer in range(LAYERS):
        fork.append(layer, keys.ctypes.data, values.ctypes.data, 2)
        host_fork.append(layer, keys, values)
    same(host, buffers)  # the original did not move
    same(host_fork, fork)
    fork.truncate(9)
    host_fork.truncate(9)
    same(host_fork, fork)
    with pytest.raises(InputError, match="exceeds the cache's 40"):
        buffers.reserve(41)
    buffers.close()
    assert all(b is None for pairs in buffers.buffers for pair in pairs for b in pair)
