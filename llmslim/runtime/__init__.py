"""Everything that runs a (quantized) model, as opposed to making one.

- ``kernels``: int4/int8 CPU linear modules that compute a ``GPTQLinear``'s product fast;
- ``fusion``: q/k/v and gate/up siblings fused into one kernel call;
- ``attention``: the single-query SDPA shortcut for decoding;
- ``fast``: ``accelerate(model)``, the load-time swap that installs all of the above;
- ``cache``: the KV caches the decode loops write into (batch-1 preallocated, server batch);
- ``families``: which decoder families the lean forward computes, and their switches;
- ``invariant``: linear calls whose rows do not depend on the batch (batch-invariant decoding);
- ``lean``: the stripped decoder forward that reads and writes those caches directly;
- ``sampling``, ``stops``, ``model_info``: token choice, stop strings, EOS ids and context
  length, shared by the batch-1 loop and the server so that both decide alike;
- ``generate``: the batch-1 decode loop.

Nothing is imported here: ``llmslim.metrics`` imports ``model_info`` alone, without paying for
the kernels or transformers' cache classes.
"""
