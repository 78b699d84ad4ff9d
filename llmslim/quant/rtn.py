"""Round-to-nearest onto the GPTQ grid: no calibration data, the baseline every other method must beat."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RTNConfig
from ..grid import quantize_rtn
from ..nn import GPTQLinear
from .walk import linear_weight, set_module


def rtn_layers(model: nn.Module, config: RTNConfig, targets: dict[str, nn.Module], progress: bool = True) -> list[dict]:
    """Swap each of ``targets`` (full name -> linear) for a ``GPTQLinear`` holding its RTN codes."""
    logs = []
    for name, layer in tqdm(targets.items(), desc="RTN layers", unit="layer", disable=not progress):
        W = linear_weight(layer).detach().float()
        Q, scales, zeros = quantize_rtn(W, config.bits, config.group_size, config.sym, config.mse, config.gguf_grid,
                                     config.full_range)
        g = config.group_size if config.group_size != -1 else W.shape[1]
        g_idx = torch.arange(W.shape[1], dtype=torch.int32) // g
        set_module(model, name, GPTQLinear.from_codes(Q, scales, zeros, g_idx, config.group_size,
                                                      config.bits, getattr(layer, "bias", None)))
        logs.append({"name": name, "rows": W.shape[0], "columns": W.shape[1]})
    return logs
