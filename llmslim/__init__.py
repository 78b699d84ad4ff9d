"""llmslim: make Hugging Face causal LMs small and fast, and measure what it cost.

    import llmslim
    model, tok = llmslim.load("smollm2-135m")
    llmslim.quantize(model, llmslim.GPTQConfig(bits=4), calib=tokens)

Heavy modules load on first use; importing llmslim does no work.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("llmslim.load", "load"),
    "quantize": ("llmslim.quant.api", "quantize"),
    "quantize_to_folder": ("llmslim.quant.api", "quantize_to_folder"),
    "GPTQConfig": ("llmslim.config", "GPTQConfig"),
    "RTNConfig": ("llmslim.config", "RTNConfig"),
    "CalibConfig": ("llmslim.config", "CalibConfig"),
    "LayerFilter": ("llmslim.config", "LayerFilter"),
    "UserError": ("llmslim.errors", "UserError"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'llmslim' has no attribute {name!r}")
