"""llmslim: make Hugging Face causal LMs small and fast, and measure what it cost.

    import llmslim
    model, tok = llmslim.load("smollm2-135m")
    llmslim.quantize(model, llmslim.GPTQConfig(bits=4), calib=tokens)
    recipe = llmslim.read_recipe("calibration/recipes/gptq-4bit.yaml")
    model, reports = llmslim.compress(model, recipe, tokenizer=tok)

Heavy modules load on first use; importing llmslim does no work. No submodule shares a name
with an entry of ``__all__``: importing a submodule sets it as an attribute of the package,
which would shadow the function of the same name.
"""

__version__ = "0.1.0"

_LAZY = {
    "load": ("llmslim.loader", "load"),
    "quantize": ("llmslim.pipeline.stages", "quantize"),
    "compress": ("llmslim.pipeline.run", "compress"),
    "compress_to_folder": ("llmslim.pipeline.run", "compress_to_folder"),
    "quantize_to_folder": ("llmslim.pipeline.run", "quantize_to_folder"),
    "recover_to_folder": ("llmslim.pipeline.recover", "recover_to_folder"),
    "Recipe": ("llmslim.pipeline.recipe", "Recipe"),
    "read_recipe": ("llmslim.pipeline.recipe", "read_recipe"),
    "parse_recipe": ("llmslim.pipeline.recipe", "parse_recipe"),
    "GPTQConfig": ("llmslim.config", "GPTQConfig"),
    "RTNConfig": ("llmslim.config", "RTNConfig"),
    "BnbConfig": ("llmslim.config", "BnbConfig"),
    "RecoverConfig": ("llmslim.config", "RecoverConfig"),
    "CalibConfig": ("llmslim.config", "CalibConfig"),
    "LayerFilter": ("llmslim.config", "LayerFilter"),
    "UserError": ("llmslim.errors", "UserError"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'llmslim' has no attribute {name!r}")
