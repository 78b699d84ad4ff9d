"""Structured pruning that makes the model smaller for real: whole decoder blocks (depth), MLP
channels and attention heads (width). The result is the same architecture with a smaller config,
which plain transformers (and vLLM) load as it is.

- Depth, block influence (ShortGPT, Men et al., arXiv:2403.03853): BI_i = 1 - E_tokens[cos(x_i, x_i+1)]
  between a block's input and output hidden states; the blocks that change their input least go.
- Depth, KL: the mean per-token KL(p_full || p_without_i) on calibration text when block i alone is
  skipped (its output replaced by its input); the blocks whose absence costs least go.
- Width (Minitron, Muralidharan et al., arXiv:2407.14679, Sec. 2.2): a neuron's importance is the
  L2 norm over the calibration tokens of its activation (the input of the MLP's down projection),
  a head's the L2 norm of its attention output (the input of the output projection, per head);
  under grouped-query attention whole KV groups (one K/V head with its query heads) are ranked by
  the sum over their heads. Every block keeps the same count (one config for all blocks), each
  block its own most important ones.

The structure is read from the model: the MLP is the last pair of true-sequential groups (up/gate
-> down), the attention the first pair (q/k/v -> output); the only table is which config key holds
the MLP width (``WIDTH_KEYS``). Whether the config can describe the smaller shapes is checked by
building the new config's model on the meta device before anything is changed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from .walk import (
    capture_block_inputs,
    find_blocks,
    find_linears,
    is_conv1d,
    linear_weight,
    run_block,
    sequential_groups,
    set_module,
)

WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner")  # config key of the MLP width, by family


def keep_count(ratio: float, n: int) -> int:
    """How many of ``n`` to keep: ratio x n rounded half up, at least 1."""
    return max(1, min(n, math.floor(ratio * n + 0.5)))


# --- depth ----------------------------------------------------------------------------------------


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def replaying(blocks: nn.ModuleList, outputs: dict[int, object]) -> Iterator[None]:
    """Blocks ``j`` in ``outputs`` return ``outputs[j]`` instead of computing: a forward of the model
    then costs only the blocks after them (and the embedding and head). The module objects stay in
    place (their config attributes, e.g. a layer's attention type, are still read by the model)."""
    before = {j: blocks[j].__dict__.get("forward") for j in outputs}
    for j, out in outputs.items():
        blocks[j].forward = lambda *args, _out=out, **kwargs: _out
    try:
        yield
    finally:
        for j, fwd in before.items():
            if fwd is None:
                del blocks[j].forward
            else:  # a wrapper that was there before (accelerate's hooks put one on the instance)
                blocks[j].forward = fwd


@torch.inference_mode()
def block_influence(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT's BI of every decoder block: 1 - mean over tokens of cos(input, output)."""
    _, blocks = find_blocks(model)
    sums = [0.0] * len(blocks)
    tokens = 0

    def hook(i):
        def f(module, args, kwargs, output):
            cos = F.cosine_similarity(_hidden_in(args, kwargs).float(), _hidden_out(output).float(), dim=-1)
            sums[i] += float(cos.sum())
        return f

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        for ids in tqdm(batches, desc="block influence", unit="batch"):
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return [1 - s / tokens for s in sums]


@torch.inference_mode()
def skip_kl(model: nn.Module, batches: list[torch.Tensor]) -> list[float]:
    """Mean per-token KL(full || block i skipped) of every block.

    Skipping block i leaves blocks 0..i-1 as they were, so their work is not redone: one full
    forward per batch records every block's input, and the run without block i starts from block
    i's recorded input (``replaying``), which halves the cost against n + 1 full forwards."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    kl = [0.0] * n
    tokens = 0
    for ids in tqdm(batches, desc=f"KL without each of {n} blocks", unit="batch"):
        inputs, outputs = [None] * n, [None] * n

        def record(i, inputs=inputs, outputs=outputs):
            def f(module, args, kwargs, output):
                inputs[i], outputs[i] = _hidden_in(args, kwargs), output
            return f

        handles = [b.register_forward_hook(record(i), with_kwargs=True) for i, b in enumerate(blocks)]
        try:
            logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        finally:
            for h in handles:
                h.remove()
        for i in range(n):
            # Without block i the next block reads block i's input; blocks 0..i all "return" it
            # (each in its own output form: a tensor, or a tuple whose first item is the hidden state).
            x = inputs[i]
            replay = {j: (x, *outputs[j][1:]) if isinstance(outputs[j], tuple) else x for j in range(i + 1)}
            with replaying(blocks, replay):
                logq = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
            kl[i] += float((logp.exp() * (logp - logq)).sum())
        tokens += ids.numel()
    return [k / tokens for k in kl]


def drop_blocks(model: nn.Module, drop: list[int]) -> None:
    """Remove the decoder blocks ``drop`` (indices) in place and shrink the config to match."""
    blocks_name, blocks = find_blocks(model)
    n = len(blocks)
    drop = sorted(set(drop))
    if not drop or drop[0] < 0 or drop[-1] >= n:
        raise UserError(f"block indices to drop must lie in 0..{n - 1}, got {drop}")
    if len(drop) >= n:
        raise UserError(f"cannot drop {len(drop)} of {n} blocks: at least one must remain")
    keep = [i for i in range(n) if i not in drop]
    set_module(model, blocks_name, nn.ModuleList([blocks[i] for i in keep]))
    for j, i in enumerate(keep):  # KV caches are indexed by layer_idx
        for m in blocks[i].modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    cfg = model.config
    for key, value in list(vars(cfg).items()):  # per-layer lists (e.g. layer_types) follow
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(cfg, key, [value[i] for i in keep])
    cfg.num_hidden_layers = len(keep)


# --- width ----------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Names (inside a block) of the linears width pruning reshapes."""

    up: list[str]  # the MLP's input projections (gate and up, or fc1)
    down: str  # the MLP's output projection
    qkv: list[str] | None = None  # separate q, k, v projections (None: fused or not found)
    out: str | None = None  # the attention output projection


def block_layout(model: nn.Module, probe_ids: torch.Tensor) -> Layout:
    """Find the MLP and attention projections of the blocks from one probing forward of block 0."""
    _, blocks = find_blocks(model)
    block = blocks[0]
    names = list(find_linears(block))
    inputs = capture_block_inputs(model, blocks, [probe_ids])
    groups = sequential_groups(block, names, lambda: run_block(block, inputs.hidden[0], inputs.args[0],
                                                               inputs.kwargs[0]))
    shape = {n: tuple(linear_weight(block.get_submodule(n)).shape) for n in names}  # (out, in)
    if len(groups) < 2 or len(groups[-1]) != 1:
        raise UserError(f"cannot find the MLP of {type(block).__name__}: width pruning needs up/gate -> down "
                        "projections")
    down, up = groups[-1][0], groups[-2]
    width, hidden = shape[down][1], shape[down][0]
    if any(shape[u] != (width, hidden) for u in up):
        raise UserError(f"cannot find the MLP of {type(block).__name__}: {up} do not feed {down}")
    layout = Layout(up, down)
    if len(groups) >= 4 and len(groups[0]) == 3 and len(groups[1]) == 1:
        q, k, v = groups[0]
        o = groups[1][0]
        if shape[k] == shape[v] and shape[o][1] == shape[q][0] and shape[q][1] == hidden:
            layout.qkv, layout.out = [q, k, v], o
    return layout


@torch.inference_mode()
def width_importance(model: nn.Module, layout: Layout, batches: list[torch.Tensor],
                     heads: tuple[int, int] | None) -> tuple[list[torch.Tensor], list]:
    """Per block: each MLP channel's and (``heads`` = (head_dim, query heads per KV group)) each KV
    group's activation L2 norm over the tokens."""
    head_dim, heads_per_group = heads or (1, 1)
    _, blocks = find_blocks(model)
    channels = [None] * len(blocks)
    groups = [None] * len(blocks)
    handles = []

    def on_down(i):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            channels[i] = x.square().sum(0) + (0 if channels[i] is None else channels[i])
        return f

    def on_out(i):
        def f(module, args):
            x = args[0].reshape(-1, args[0].shape[-1] // head_dim, head_dim).float()
            per_head = x.square().sum((0, 2))
            per_group = per_head.view(-1, heads_per_group).sum(1)
            groups[i] = per_group + (0 if groups[i] is None else groups[i])
        return f

    for i, b in enumerate(blocks):
        handles.append(b.get_submodule(layout.down).register_forward_pre_hook(on_down(i)))
        if heads is not None:
            handles.append(b.get_submodule(layout.out).register_forward_pre_hook(on_out(i)))
    try:
        for ids in tqdm(batches, desc="channel and head importance", unit="batch"):
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [c.sqrt() for c in channels], [None if g is None else g.sqrt() for g in groups]


def slice_linear(layer: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Module:
    """A new linear of the same kind holding only the output ``rows`` / input ``cols`` of ``layer``."""
    W = linear_weight(layer).detach()
    bias = getattr(layer, "bias", None)
    if rows is not None:
        W = W[rows]
        bias = None if bias is None else bias.detach()[rows]
    if cols is not None:
        W = W[:, cols]
    out_f, in_f = W.shape
    if is_conv1d(layer):
        new = type(layer)(out_f, in_f)
        new.weight.data = W.T.contiguous().clone()
        new.bias.data = bias.detach().clone() if bias is not None else torch.zeros(out_f, dtype=W.dtype)
    else:
        new = nn.Linear(in_f, out_f, bias=bias is not None, dtype=W.dtype, device=W.device)
        new.weight.data = W.contiguous().clone()
        if bias is not None:
            new.bias.data = bias.detach().clone()
    return new


def width_config(config, layout: Layout, old_width: int, new_width: int, heads: tuple[int, int, int] | None):
    """A copy of ``config`` with the MLP width and (``heads`` = (query heads, KV heads, head_dim)) the
    head counts changed; raises when the config has no key for it."""
    import copy

    cfg = copy.deepcopy(config)
    if new_width != old_width:
        key = next((k for k in WIDTH_KEYS if getattr(cfg, k, None) == old_width), None)
        if key is None and "n_inner" in vars(cfg):  # GPT-2: None means 4 x hidden
            key = "n_inner"
        if key is None:
            raise UserError(f"{type(cfg).__name__} has no config key for the MLP width ({', '.join(WIDTH_KEYS)}): "
                            "--mlp-keep cannot be saved as a standard model")
        setattr(cfg, key, new_width)
    if heads is not None:
        n_heads, n_kv, head_dim = heads
        cfg.num_attention_heads = n_heads
        if hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = n_kv
        cfg.head_dim = head_dim  # decoupled from hidden_size / heads from now on
    return cfg


def check_config_describes(cfg, block: nn.Module, planned: dict[str, tuple[int, int]]) -> None:
    """Build ``cfg``'s model on the meta device; its block-0 linears must have the planned shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg)
    _, meta_blocks = find_blocks(meta)
    for name, shape in planned.items():
        got = tuple(linear_weight(meta_blocks[0].get_submodule(name)).shape)
        if got != shape:
            raise UserError(f"{type(cfg).__name__}: its config cannot describe {name} with shape {list(shape)} "
                            f"(it builds {list(got)}); this architecture ties that size to another, so it cannot "
                            "be pruned this way as a standard model")


@dataclass
class WidthPlan:
    old_width: int
    width: int
    heads: tuple[int, int, int] | None  # (query heads, KV heads, head_dim) to keep
    per_group: int  # query heads per KV group
    config: object  # the smaller config
    record: dict


def plan_width(model: nn.Module, layout: Layout, mlp_keep: float, heads_keep: float) -> WidthPlan:
    """The smaller shapes, and the config that describes them (checked before any work)."""
    _, blocks = find_blocks(model)
    b0 = blocks[0]
    per_group = 1
    down0 = b0.get_submodule(layout.down)
    old_width, hidden = linear_weight(down0).shape[1], linear_weight(down0).shape[0]
    width = keep_count(mlp_keep, old_width)
    planned = {n: (width, hidden) for n in layout.up} | {layout.down: (hidden, width)}
    heads = None
    record: dict = {"mlp_width": [old_width, width]}
    if heads_keep < 1:
        if layout.qkv is None:
            raise UserError(f"{type(b0).__name__}: --heads-keep needs separate q/k/v projections and an output "
                            "projection; this model's attention does not have them (fused or not found)")
        cfg = model.config
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        q, k, v = layout.qkv
        head_dim = linear_weight(b0.get_submodule(q)).shape[0] // n_heads
        per_group = n_heads // n_kv
        kv_keep = keep_count(heads_keep, n_kv)
        if n_kv == 1:
            raise UserError("--heads-keep: the model has a single KV group; there is nothing to choose from")
        heads = (kv_keep * per_group, kv_keep, head_dim)
        planned |= {q: (kv_keep * per_group * head_dim, hidden), k: (kv_keep * head_dim, hidden),
                    v: (kv_keep * head_dim, hidden), layout.out: (hidden, kv_keep * per_group * head_dim)}
        record |= {"attention_heads": [n_heads, heads[0]], "kv_heads": [n_kv, kv_keep]}
    new_cfg = width_config(model.config, layout, old_width, width, heads)
    check_config_describes(new_cfg, b0, planned)
    return WidthPlan(old_width, width, heads, per_group, new_cfg, record)


def prune_width(model: nn.Module, layout: Layout, plan: WidthPlan, channel_imp: list[torch.Tensor],
                group_imp: list) -> dict:
    """Keep the most important MLP channels and KV groups of every block; returns what was kept."""
    _, blocks = find_blocks(model)
    old_width, width, heads, per_group, new_cfg = plan.old_width, plan.width, plan.heads, plan.per_group, plan.config
    kept = {"mlp": [], "kv_groups": []}
    for i, block in enumerate(blocks):
        if width < old_width:
            keep = torch.sort(torch.argsort(channel_imp[i], descending=True, stable=True)[:width]).values
            for n in layout.up:
                set_module(block, n, slice_linear(block.get_submodule(n), rows=keep))
            set_module(block, layout.down, slice_linear(block.get_submodule(layout.down), cols=keep))
            kept["mlp"].append(keep.tolist())
        if heads is not None:
            kv_keep, head_dim = heads[1], heads[2]
            groups = torch.sort(torch.argsort(group_imp[i], descending=True, stable=True)[:kv_keep]).values
            kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q_heads = (groups[:, None] * per_group + torch.arange(per_group)).flatten()
            q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            q, k, v = layout.qkv
            set_module(block, q, slice_linear(block.get_submodule(q), rows=q_rows))
            set_module(block, k, slice_linear(block.get_submodule(k), rows=kv_rows))
            set_module(block, v, slice_linear(block.get_submodule(v), rows=kv_rows))
            set_module(block, layout.out, slice_linear(block.get_submodule(layout.out), cols=q_rows))
            kept["kv_groups"].append(groups.tolist())
    cfg = model.config
    for key in (*WIDTH_KEYS, "num_attention_heads", "num_key_value_heads", "head_dim"):
        if key in vars(new_cfg) and getattr(new_cfg, key) != getattr(cfg, key, None):
            setattr(cfg, key, getattr(new_cfg, key))
    return plan.record | {"kept": kept}


# --- the two methods, end to end --------------------------------------------------------------------


def _batches(calib: torch.Tensor, batch_size: int | None, default: int) -> list[torch.Tensor]:
    return list(calib.split(batch_size or default))


def _forwards_in(model: nn.Module, dtype: torch.dtype | None):
    """The importance passes' forwards under ``dtype`` autocast (None: the model's own dtype). Ranking
    blocks or channels needs no float32 logits, and bf16 matmuls are ~2x faster where they are native
    (``resolve_forward_dtype``); the scores themselves are summed in float32."""
    device = next(model.parameters()).device.type
    return torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None)


def depth_prune(model: nn.Module, drop: int, importance: str, calib: torch.Tensor,
                batch_size: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Measure every block's importance on ``calib`` (forwards in ``dtype``), drop the ``drop`` least
    important; returns the record."""
    _, blocks = find_blocks(model)
    n = len(blocks)
    if drop >= n:
        raise UserError(f"--drop-blocks {drop}: the model has {n} decoder blocks and at least one must remain")
    with _forwards_in(model, dtype):
        if importance == "bi":
            scores = block_influence(model, _batches(calib, batch_size, 8))
        else:  # full-vocabulary logits twice per batch: small batches
            scores = skip_kl(model, _batches(calib, batch_size, 2))
    order = sorted(range(n), key=lambda i: (scores[i], i))
    dropped = sorted(order[:drop])
    drop_blocks(model, dropped)
    return {"blocks": [n, n - drop], "dropped": dropped, "importance": importance,
            "scores": [round(x, 6) for x in scores]}


def width_prune(model: nn.Module, mlp_keep: float, heads_keep: float, calib: torch.Tensor,
                batch_size: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Measure channel and head importance on ``calib`` (forwards in ``dtype``), keep the most important;
    returns the record."""
    layout = block_layout(model, calib[:1])
    plan = plan_width(model, layout, mlp_keep, heads_keep)  # refuses an impossible shape before any work
    heads = None if plan.heads is None else (plan.heads[2], plan.per_group)
    with _forwards_in(model, dtype):
        channel_imp, group_imp = width_importance(model, layout, _batches(calib, batch_size, 8), heads)
    return prune_width(model, layout, plan, channel_imp, group_imp)
