"""Find what to quantize in any Hugging Face causal LM by reading the model's own structure.

- the decoder stack is the longest ``nn.ModuleList`` of identical blocks that hold linears;
- the linears are ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear stored transposed);
- the true-sequential groups are found by watching one forward pass: layers that read the
  very same input tensor form a group (q/k/v; gate/up), ordered by when they run.

No per-architecture tables: Llama, Qwen2, Mistral, Gemma, Phi, OPT, GPT-2, GPT-NeoX ... all
walk the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import LayerFilter


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def linear_types() -> tuple[type, ...]:
    conv = _conv1d_type()
    return (nn.Linear,) if conv is None else (nn.Linear, conv)


def is_conv1d(layer: nn.Module) -> bool:
    conv = _conv1d_type()
    return conv is not None and isinstance(layer, conv)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight as ``[out, in]`` whatever the storage (Conv1D keeps ``[in, out]``)."""
    return layer.weight.T if is_conv1d(layer) else layer.weight


def linear_shape(layer: nn.Module) -> tuple[int, int]:
    out_f, in_f = linear_weight(layer).shape
    return in_f, out_f


def find_linears(module: nn.Module, prefix: str = "", quantized: bool = False) -> dict[str, nn.Module]:
    """Linear layers by dotted name; with ``quantized``, already-quantized ones too."""
    types = linear_types()
    if quantized:
        from ..nn import GGUFLinear, GPTQLinear

        types = (*types, GPTQLinear, GGUFLinear)
    return {
        f"{prefix}{name}": m for name, m in module.named_modules() if name and isinstance(m, types)
    }


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder stack: (dotted name, the ModuleList of blocks)."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(b) for b in mod}) != 1 or not find_linears(mod[0], quantized=True):
            continue
        if best is None or len(mod) > len(best[1]):
            best = (name, mod)
    if best is None:
        raise UserError(f"{type(model).__name__} has no stack of decoder blocks with linear layers to quantize")
    return best


def module_name(root: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in root.named_modules() if m is module)


def select_layers(
    model: nn.Module, layers: LayerFilter, fits: Callable[[int, int], bool]
) -> tuple[dict[str, nn.Module], list[str]]:
    """The layer selection every method shares: (linears to compress by full name, accepted
    linears left in float because ``fits(in_features, out_features)`` rejects their shape).

    Candidates are the linears of the decoder blocks that the filter accepts, then ``lm_head``
    when ``layers.quantize_lm_head`` (whatever the globs say: it is asked for by name).
    """
    blocks_name, blocks = find_blocks(model)
    candidates = {n: m for n, m in find_linears(blocks, prefix=f"{blocks_name}.").items() if layers.accepts(n)}
    if layers.quantize_lm_head:
        head = model.get_output_embeddings()
        candidates[module_name(model, head)] = head
    targets, skipped = {}, []
    for name, layer in candidates.items():
        if fits(*linear_shape(layer)):
            targets[name] = layer
        else:
            skipped.append(name)
    return targets, skipped


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class StopForward(Exception):
    """Raised from a hook to end a forward pass early once what it needed was seen."""


@dataclass
class BlockInputs:
    """What the first decoder block receives: hidden states per batch, and the shared kwargs.

    Captured by running the model until the first block is called (the usual "Catcher").
    The kwargs (masks, rotary embeddings, position ids) are the same for every batch of the
    same shape, so one copy per batch shape is enough.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor],
                         embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         store=None) -> BlockInputs:
    """``embed``: token ids -> input embeddings, for a model whose embedding matrix is not loaded
    (the model then runs on ``inputs_embeds``; the block inputs are the same). ``store``: where
    the hidden states go (anything with ``append``; default a list)."""
    captured = BlockInputs() if store is None else BlockInputs(hidden=store)

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        captured.hidden.append(hidden.detach())
        captured.args.append(rest)
        captured.kwargs.append(kwargs)
        raise StopForward

    feed_until(model, blocks[0], hook, batches, with_kwargs=True, embed=embed)
    return captured


def feed_until(model: nn.Module, module: nn.Module, hook: Callable, batches, with_kwargs: bool = False,
               embed: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Run ``model`` on each batch of input ids with ``hook`` as a pre-hook on ``module``; the
    hook raises ``StopForward`` once it has what it needs, which ends that batch's forward."""
    handle = module.register_forward_pre_hook(hook, with_kwargs=with_kwargs)
    try:
        with torch.inference_mode():
            for ids in batches:
                try:
                    if embed is None:
                        model(input_ids=ids, use_cache=False)
                    else:
                        model(inputs_embeds=embed(ids), use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()


def run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


def plain_copy(v):
    """A copy of ``v`` (a tensor, or tuples/lists of them; anything else as is) that autograd may save:
    what ``capture_block_inputs`` returns are inference tensors, which a backward pass refuses."""
    if torch.is_tensor(v):
        return v.clone()
    if isinstance(v, tuple | list):
        return type(v)(plain_copy(x) for x in v)
    return v


def sequential_groups(block: nn.Module, names: list[str], probe: Callable[[], object]) -> list[list[str]]:
    """Group ``names`` (linears of ``block``) by shared input, in execution order.

    ``probe`` is called once to run the block forward; hooks record which input tensor each
    linear sees. Layers reading the same tensor (q/k/v, gate/up) are quantized together.
    """
    # Keep the input tensors alive while probing: comparing addresses of freed tensors would
    # group layers whose inputs merely reused the same memory.
    order: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name in names:
        layer = block.get_submodule(name)

        def hook(module, args, name=name):
            order.append((name, args[0]))

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            probe()
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    group_input: torch.Tensor | None = None
    seen: set[str] = set()
    for name, x in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and x is group_input:
            groups[-1].append(name)
        else:
            groups.append([name])
            group_input = x
    # Linears that never ran (unused branches) go last, each alone.
    groups += [[n] for n in names if n not in seen]
    return groups
