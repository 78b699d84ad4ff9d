"""The KV caches: preallocated (batch 1) and batched (server) layers write in place, and the lean
forward takes exactly these layers."""

import torch
from transformers.cache_utils import Cache

from llmslim.runtime.cache import AppendLayer, BatchLayer, PreallocLayer, make_cache, new_cache
from llmslim.runtime.fast import accelerate
from llmslim.runtime.lean import LeanDecoder
from tests.conftest import make_tiny_model


def test_cache_is_preallocated_and_reused():
    model = make_tiny_model("llama")
    cache = make_cache(model, 40)
    assert all(isinstance(layer, PreallocLayer) for layer in cache.layers)
    assert make_cache(model, 100) is cache  # within the same bucket: reused
    k = torch.randn(1, 2, 3, 16)
    layer = cache.layers[0]
    keys, _ = layer.update(k, k)
    buffer = layer._k.data_ptr()
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert keys.shape[2] == 4 and layer._k.data_ptr() == buffer  # written in place, no reallocation
    assert torch.equal(keys[:, :, :3], k)


def test_batch_layer_reuses_its_buffers():
    k = torch.randn(1, 2, 4, 8)
    layer = BatchLayer(k, k.clone(), copies=2)
    layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))  # first step: room doubles
    buffer = layer._k
    for _ in range(3):
        keys, _ = layer.update(torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8))
    assert layer._k is buffer  # steps write in place, no new allocation
    assert keys.shape == (2, 2, 8, 8) and keys.data_ptr() == buffer.data_ptr()
    assert layer.get_seq_length() == 8


def test_new_cache_is_dynamic():
    model = make_tiny_model("llama")
    assert type(new_cache(model)).__name__ == "DynamicCache"


def test_both_layers_are_append_layers_and_only_they_take_the_lean_path():
    k = torch.randn(1, 2, 4, 16)
    assert isinstance(PreallocLayer(8), AppendLayer) and isinstance(BatchLayer(k, k.clone(), copies=1), AppendLayer)
    model = accelerate(make_tiny_model("llama").eval(), torch.float32)
    assert LeanDecoder.for_model(model, new_cache(model)) is None  # transformers' DynamicLayers: no append
    batch = Cache(layers=[BatchLayer(k, k.clone(), copies=1) for _ in range(2)])
    assert LeanDecoder.for_model(model, batch) is not None
