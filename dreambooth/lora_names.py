"""LoRA names of the FLUX.1 and SD3 transformers: diffusers/peft paths <-> the original
(Black Forest Labs / Stability) module paths that kohya's sd-scripts, ComfyUI and Forge use.
Pure functions on ``{"transformer.<module path>": LoraLayer}`` dicts (``dreambooth.lora``).

diffusers splits the attention projections the original models fuse. In FLUX.1's double blocks
``attn.to_q/to_k/to_v`` are one ``img_attn.qkv`` Linear (``add_q/k/v_proj``: ``txt_attn.qkv``);
in its single blocks ``to_q/to_k/to_v`` and the MLP's in-projection ``proj_mlp`` are one
``linear1``; SD3's joint blocks have ``x_block.attn.qkv`` and ``context_block.attn.qkv``. A fused
Linear's weight is its members' weights stacked by rows, ``W = [W_1; ...; W_n]``, so LoRAs on
the members (``dW_j = s_j B_j A_j``, ``s_j = alpha_j / r_j``) are exactly one LoRA on the fused
layer (``fuse_lora``)::

    down = [A_1; A_2; ...; A_n]                      (r_1 + ... + r_n) x in
    up   = blockdiag(c_1 B_1, ..., c_n B_n)          (d_1 + ... + d_n) x (r_1 + ... + r_n)
    s    = alpha / rank,  c_j = s_j / s

since row block j of ``s * up @ down`` is ``s c_j B_j A_j = s_j B_j A_j``: the off-diagonal
blocks of ``up`` are zero. With equal ranks r and alphas a (a trained LoRA) ``c_j = 1`` and
``alpha = n a``: the rank grows n-fold, so alpha must too to keep ``alpha / rank``. A member
without a LoRA (FLUX's ``proj_mlp`` when only attention is trained) gets r zero rows in ``down``
and a zero block in ``up``, so every fused LoRA has n equal rank blocks: the layout kohya's
``split_qkv`` writes and diffusers' kohya converter and kohya's loader split back
(``split_lora``).

Two layers differ beyond names: the modulation of SD3's last context block (diffusers
``AdaLayerNormContinuous``, chunks scale, shift) and both models' ``norm_out`` are (shift, scale)
in the original layout, so their ``up`` rows are swapped in halves, as ComfyUI's
``swap_scale_shift`` does to the weights.
"""

from __future__ import annotations

import re
from typing import Any

from dreambooth.lora import LoraLayer

KINDS = ("flux1", "sd3")
TRANSFORMER = "transformer"

# diffusers path inside a block -> original path inside the block, or (fused path, member)
FLUX_DOUBLE: dict[str, Any] = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
}
FLUX_SINGLE: dict[str, Any] = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3), "proj_out": "linear2", "norm.linear": "modulation.lin",
}
FLUX_TOP: dict[str, str] = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
SD3_JOINT: dict[str, Any] = {
    "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0), "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),  # SD3.5's dual-attention blocks
    "attn.to_out.0": "x_block.attn.proj", "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1", "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1", "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1", "norm1_context.linear": "context_block.adaLN_modulation.1",
}
SD3_TOP: dict[str, str] = {
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
}
# (diffusers block list, original block list, map inside a block)
BLOCKS = {
    "flux1": [("transformer_blocks", "double_blocks", FLUX_DOUBLE),
              ("single_transformer_blocks", "single_blocks", FLUX_SINGLE)],
    "sd3": [("transformer_blocks", "joint_blocks", SD3_JOINT)],
}
TOP = {"flux1": FLUX_TOP, "sd3": SD3_TOP}
FLUX_MLP_RATIO = 4.0  # FLUX.1's single blocks: linear1 = q, k, v (hidden each) and the MLP (4 x hidden)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"no original-layout LoRA names for model kind '{kind}'; expected one of {KINDS}")


# ---------------------------------------------------------------- the fused-layer math


def fuse_lora(parts: list[LoraLayer | None], dims: list[int]) -> LoraLayer:
    """One LoRA on a Linear whose output rows are the members' outputs stacked (``dims`` rows
    each), from LoRAs on the members (None: that member has none). ``down`` is the members'
    downs stacked, ``up`` block-diagonal; each present member's rank is padded to the largest
    (zero rows in ``down``, zero columns in ``up``) so the rank blocks are equal, and an absent
    member gets a zero block. ``alpha = s * rank`` where ``s`` is the first member's
    ``alpha / r``; a member with another ``alpha / r`` has the ratio folded into its up block,
    so ``s * up @ down`` is exactly the members' ``s_j B_j A_j`` stacked."""
    present = [p for p in parts if p is not None]
    if not present or len(parts) != len(dims):
        raise ValueError(f"fuse_lora needs one entry per member ({len(dims)}) and at least one LoRA")
    first = present[0]
    r, n, width = max(p.rank for p in present), len(parts), first.down.shape[1]
    scale = first.alpha / first.rank
    down = first.down.new_zeros((n * r, width))
    up = first.up.new_zeros((sum(dims), n * r))
    row = 0
    for j, (part, d) in enumerate(zip(parts, dims)):
        if part is not None:
            if part.down.ndim != 2 or part.down.shape[1] != width or part.up.shape[0] != d:
                raise ValueError(f"member {j} of a fused layer has down {tuple(part.down.shape)} and up "
                                 f"{tuple(part.up.shape)}; expected (r, {width}) and ({d}, r)")
            ratio = (part.alpha / part.rank) / scale
            down[j * r:j * r + part.rank] = part.down
            up[row:row + d, j * r:j * r + part.rank] = part.up if ratio == 1 else part.up * ratio
        row += d
    return LoraLayer(down=down, up=up, alpha=scale * n * r)


def split_lora(layer: LoraLayer, dims: list[int]) -> list[LoraLayer | None]:
    """The inverse of ``fuse_lora``: the members' LoRAs of a LoRA on a fused Linear.

    When ``up`` is block-diagonal in ``len(dims)`` equal rank blocks (what ``fuse_lora``, kohya's
    ``split_qkv`` and our kohya files write) each member gets its blocks back, rank / n with
    alpha / n, and a member whose blocks are both zero gets None. Any other LoRA (one trained
    on the fused layer) is split exactly too, at full rank: every member gets the whole
    ``down`` and its rows of ``up`` (None if those rows are zero)."""
    n, rank = len(dims), layer.rank
    if sum(dims) != layer.up.shape[0]:
        raise ValueError(f"a fused LoRA with {layer.up.shape[0]} output rows cannot split into {dims}")
    rows, start = [], 0
    for d in dims:
        rows.append((start, start + d))
        start += d
    r = rank // n
    diagonal = rank % n == 0 and all(
        not layer.up[a:b, k * r:(k + 1) * r].any()
        for j, (a, b) in enumerate(rows) for k in range(n) if k != j)
    out: list[LoraLayer | None] = []
    for j, (a, b) in enumerate(rows):
        if diagonal:
            down, up = layer.down[j * r:(j + 1) * r], layer.up[a:b, j * r:(j + 1) * r]
            alpha = layer.alpha / n
            empty = not down.any() and not up.any()
        else:
            down, up, alpha = layer.down, layer.up[a:b], layer.alpha
            empty = not up.any()
        out.append(None if empty else LoraLayer(down=down.contiguous(), up=up.contiguous(), alpha=alpha))
    return out


def swap_halves(up):
    """``up``'s rows with their two halves exchanged ((scale, shift) <-> (shift, scale))."""
    import torch

    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---------------------------------------------------------------- the name maps


def _is_continuous_norm(path: str, layer: LoraLayer) -> bool:
    """A modulation that diffusers chunks (scale, shift) and the original (shift, scale): the
    final ``norm_out`` of both models and SD3's last context block (``norm1_context`` with two
    chunks, 2 x hidden rows, where the others have six)."""
    return path == "norm_out.linear" or (
        path.endswith("norm1_context.linear") and layer.up.shape[0] == 2 * layer.down.shape[1])


def original_path(kind: str, path: str) -> tuple[str, int | None]:
    """``(original module path, member index or None)`` of a diffusers transformer module path:
    ``"single_transformer_blocks.3.proj_mlp"`` -> ``("single_blocks.3.linear1", 3)``."""
    _check_kind(kind)
    for block, original, table in BLOCKS[kind]:
        m = re.fullmatch(rf"{block}\.(\d+)\.(.+)", path)
        if m and m.group(2) in table:
            target = table[m.group(2)]
            if isinstance(target, tuple):
                return f"{original}.{m.group(1)}.{target[0]}", target[1]
            return f"{original}.{m.group(1)}.{target}", None
    if path in TOP[kind]:
        return TOP[kind][path], None
    raise ValueError(f"{kind} transformer module '{path}' has no name in the original layout; LoRA "
                     f"targets it maps: attention, context, feed-forward and modulation layers of the blocks")


def members(kind: str, fused: str) -> list[str]:
    """The diffusers paths that make up an original module, in row order (one for a plain one):
    ``"double_blocks.0.img_attn.qkv"`` -> ``["transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"]``."""
    _check_kind(kind)
    for block, original, table in BLOCKS[kind]:
        m = re.fullmatch(rf"{original}\.(\d+)\.(.+)", fused)
        if not m:
            continue
        found: dict[int, str] = {}
        for path, target in table.items():
            name, index = target if isinstance(target, tuple) else (target, 0)
            if name == m.group(2):
                found[index] = f"{block}.{m.group(1)}.{path}"
        if found:
            return [found[i] for i in sorted(found)]
    top = [path for path, name in TOP[kind].items() if name == fused]
    if top:
        return top
    raise ValueError(f"'{fused}' is no module of the {kind} transformer that LoRA names cover")


def _member_dims(n: int, width: int, mlp_ratio: float) -> list[int]:
    """Rows per member of a fused layer of ``n`` members whose input is ``width`` (= hidden size)."""
    if n == 4:  # FLUX single block linear1: q, k, v, MLP in-projection
        return [width] * 3 + [int(width * mlp_ratio)]
    return [width] * n


def to_original(layers: dict[str, LoraLayer], kind: str,
                mlp_ratio: float = FLUX_MLP_RATIO) -> dict[str, LoraLayer]:
    """``{original module path: LoraLayer}`` of the ``transformer.`` entries of ``layers``
    (members of fused layers fused, modulation halves swapped where the layouts differ).
    Entries of other components are ignored."""
    groups: dict[str, dict[int, LoraLayer]] = {}
    out: dict[str, LoraLayer] = {}
    for key, layer in layers.items():
        component, _, path = key.partition(".")
        if component != TRANSFORMER:
            continue
        name, member = original_path(kind, path)
        if member is not None:
            groups.setdefault(name, {})[member] = layer
        elif _is_continuous_norm(path, layer):
            out[name] = LoraLayer(down=layer.down, up=swap_halves(layer.up), alpha=layer.alpha)
        else:
            out[name] = layer
    for name, parts in groups.items():
        n = len(members(kind, name))
        width = next(iter(parts.values())).down.shape[1]
        out[name] = fuse_lora([parts.get(j) for j in range(n)],
                              _member_dims(n, width, mlp_ratio))
    return out


def from_original(original: dict[str, LoraLayer], kind: str) -> dict[str, LoraLayer]:
    """The inverse of ``to_original``: ``{"transformer.<diffusers path>": LoraLayer}``."""
    out: dict[str, LoraLayer] = {}
    for name, layer in original.items():
        paths = members(kind, name)
        if len(paths) == 1:
            path = paths[0]
            up = swap_halves(layer.up) if _is_continuous_norm(path, layer) else layer.up
            out[f"{TRANSFORMER}.{path}"] = LoraLayer(down=layer.down, up=up, alpha=layer.alpha)
            continue
        width = layer.down.shape[1]
        dims = [width] * (len(paths) - 1) + [layer.up.shape[0] - width * (len(paths) - 1)]
        for path, part in zip(paths, split_lora(layer, dims)):
            if part is not None:
                out[f"{TRANSFORMER}.{path}"] = part
    return out


# ---------------------------------------------------------------- diffusers / peft format
# (written by lora.diffusers_lora_layers; read back here)


def read_diffusers_transformer_lora(state: dict[str, Any]) -> dict[str, LoraLayer]:
    """``{"transformer.<path>": LoraLayer}`` from a diffusers-format file's state dict (the
    ``transformer.`` entries; alpha = rank, the file's strength being in its up weights)."""
    out = {}
    prefix = f"{TRANSFORMER}."
    for key, down in state.items():
        if key.startswith(prefix) and key.endswith(".lora_A.weight"):
            path = key[len(prefix):-len(".lora_A.weight")]
            out[f"{TRANSFORMER}.{path}"] = LoraLayer(
                down=down, up=state[f"{prefix}{path}.lora_B.weight"], alpha=float(down.shape[0]))
    return out
