"""tiles.py: a long row through a decoder layer a tile of positions at a time, so that what a layer's
backward holds at once is a few copies of the row, however long the row.

A first reading can skip this file: it computes what model.DecoderLayer computes. It is the long-row
half of offload.py's offloaded checkpoints, chosen with them (speed.plan_training) for rows longer than
model.MLP.chunk; the layers' inputs wait in host memory (offload.Offloader), and this file decides what
backward recomputes at once.

Why. A checkpointed layer keeps only its input, and backward recomputes the layer whole: everything
the layer's autograd graph saves exists at once. Counted in units of one (T, hidden) bf16 tensor,
0.88 GiB at 131,072 tokens on the 7B shape: RMSNorm's float32 copy (2 units), each LoRA dropout's
output and mask for q, k, v and o (1.5 units each), q, k, v, the attention output (2.3) and, for the
MLP, gate, up and their product for every piece of it at once (5.3 units each). Tracked tensor by
tensor on the CPU at the 7B's proportions, the plain layer's backward held about 52 units at its
peak (37 without LoRA dropout). All of it but attention is work on each position alone, which need
not exist for the whole row at once. So a layer runs as (split_layer):

    h' = h + attention(norm(h))   one checkpoint (its input in host memory); inside it the norm,
                                  projections and RoPE tile by tile, each tile a checkpoint of its own,
                                  then attention over the whole row, then o_proj tile by tile
                                  (attention_in_tiles)
    h' + mlp(norm(h'))            one checkpoint per tile of h' (those inputs go to host memory too)

Backward then recomputes one tile at a time, and what exists for the whole row is q, k, v, attention's
output, their gradients and the layer's input and output: about 6.5 units by the same count.
Attention runs once for each K/V head with its group of query heads (attend_by_groups): flash
attention's backward widens K's and V's gradients to every query head and sums dq in float32, about
5 units at once for all heads; a group at a time, a group's share. The final norm runs in tiles too
(TiledNorm): with the loss chunks it held about 13 units (its float32 copy and its backward's float32
temporaries), in tiles 4.

The tile is model.MLP.chunk positions, the MLP's own piece. A tile's checkpoint draws dropout's masks
again as its forward drew them (torch.utils.checkpoint restores the random state), but in tiles they
are drawn in another order than the whole layer draws them: with LoRA dropout the step is another
draw of the same distribution; without it, the same gradients.

Replaces: model.DecoderLayer._forward (checkpointed whole) and model.QwenModel.norm, for rows longer
than model.MLP.chunk with offloaded checkpoints.
Proved equal by: tests/test_offload.py::test_split_layers_give_the_checkpointed_gradients (plain and
4-bit bases, float32 on the CPU), ::test_split_layers_recompute_the_masks_their_forward_drew,
::test_split_layers_on_a_gpu_give_the_plain_gradients_in_less_memory (bf16, GPU) and
tests/test_fused.py::test_fused_layers_give_the_plain_gradients (speed.FusedLayer split the same way).
"""

import torch
import torch.nn as nn

import model as modeling
from model import recompute


def split_layer(parts, h, cos, sin, mask, is_causal, tile: int):
    """model.DecoderLayer._forward of a row (B, T, hidden) as checkpoints of its parts: the attention
    half (attention_in_tiles), then the MLP a tile at a time. parts: heads, out and mlp_piece, the
    layer's per-position work (PlainParts, or speed.FusedLayer's own)."""
    h = recompute(attention_in_tiles, parts, h, cos, sin, mask, is_causal, tile)
    return torch.cat([recompute(parts.mlp_piece, piece) for piece in h.split(tile, dim=1)], dim=1)


def attention_in_tiles(parts, h, cos, sin, mask, is_causal, tile: int):
    """h + attention(norm(h)) for h (B, T, hidden): q, k and v made tile by tile, attention over the
    whole row for each K/V head, then h + o(y) tile by tile. Written as small calls so that each
    whole-row tensor is freed as soon as the next one is made (a local would keep it to the end)."""
    pieces = zip(h.split(tile, dim=1), cos.split(tile, dim=1), sin.split(tile, dim=1))
    ys = attend_by_groups(whole_row_heads([recompute(grouped_heads, parts, *p) for p in pieces]), mask, is_causal)
    y_tiles = zip(*(y.split(tile, dim=2) for y in ys))  # per tile: each group's (B, heads, t, hd)
    return torch.cat([recompute(out_tile, parts, h_t, *y_t) for h_t, y_t in zip(h.split(tile, dim=1), y_tiles)], dim=1)


def grouped_heads(parts, h, cos, sin) -> tuple:
    """One tile's q, k and v (parts.heads) by K/V head: q's heads cut into as many groups as K/V has
    heads (as SDPA's enable_gqa pairs them: query head i with K/V head i // group size), then k's and
    v's heads one by one. 3 x nkv tensors (B, heads, t, hd)."""
    q, k, v = parts.heads(h, cos, sin)  # (B, nh, t, hd), 2 x (B, nkv, t, hd)
    n = k.shape[1]
    return (*q.chunk(n, dim=1), *k.chunk(n, dim=1), *v.chunk(n, dim=1))


def whole_row_heads(tiles: list) -> list:
    """Each of grouped_heads' 3 x nkv tensors with its tiles joined along the row: (B, heads, T, hd)."""
    return [torch.cat(group, dim=2) for group in zip(*tiles)]


def attend_by_groups(heads: list, mask, is_causal) -> list:
    """model.attend for each K/V head and its query heads (heads: whole_row_heads' list): each group's
    output (B, heads, T, hd). The same products as one call over all heads."""
    n = len(heads) // 3
    return [modeling.attend(q, k, v, mask, is_causal) for q, k, v in zip(heads[:n], heads[n:2 * n], heads[2 * n:])]


def out_tile(parts, h, *ys):
    """h + o(y) of one tile h (B, t, hidden), y the groups' attention outputs side by side."""
    B, t, _ = h.shape
    y = torch.cat(ys, dim=1).transpose(1, 2).reshape(B, t, -1)  # (B, nh, t, hd) -> (B, t, nh * hd)
    return parts.out(y, h)


class PlainParts:
    """model.DecoderLayer's _forward cut where split_layer cuts it, each part a call of the layer's own
    modules, so that the math is the plain layer's (an attention layer of Qwen2, Qwen2.5 or Qwen3)."""

    def __init__(self, layer):
        self.layer = layer

    def heads(self, h, cos, sin):  # (B, t, hidden) -> q (B, nh, t, hd), k and v (B, nkv, t, hd), RoPE applied
        q, k, v, _ = self.layer.self_attn.heads(self.layer.input_layernorm(h), cos, sin)
        return q, k, v

    def out(self, y, h):  # y (B, t, nh * hd), h (B, t, hidden) -> h + o_proj(y)
        return h + self.layer.self_attn.o_proj(y)

    def mlp_piece(self, h):  # (B, t, hidden) -> h + mlp(norm(h))
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))


class SplitLayer:
    """A model.DecoderLayer for training steps with offloaded checkpoints (offload.offloaded_layers
    around it), called like the layer: a checkpointed row longer than the layer's MLP chunk runs as
    split_layer; anything else, and Qwen3.5's gated attention and DeltaNet layers, as the layer runs."""

    def __init__(self, layer):
        self.layer = layer
        plain = hasattr(layer, "self_attn") and not layer.self_attn.gated
        self.parts = PlainParts(layer) if plain else None

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False, **rows):
        chunk = self.layer.mlp.chunk
        if not checkpoint or self.parts is None or h.shape[1] <= chunk:
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=checkpoint, **rows)
        return split_layer(self.parts, h, cos, sin, mask, is_causal, chunk)


def split_layers(model) -> list:
    """SplitLayer around each of the model's decoder layers (a 4-bit base's too: its projections are
    called as they are)."""
    return [SplitLayer(layer) for layer in model.model.layers]


class TiledNorm(modeling.RMSNorm):
    """model.QwenModel.norm, the final RMSNorm, over a long row in checkpointed tiles of `tile`
    positions: it keeps the row (bf16) instead of its float32 copy, and its backward works a tile
    at a time. The same weight, so the state dict still names it model.norm.weight."""

    def __init__(self, norm: modeling.RMSNorm, tile: int):
        nn.Module.__init__(self)
        self.weight, self.eps, self.zero_centred, self.tile = norm.weight, norm.eps, norm.zero_centred, tile

    def forward(self, x):  # (B, T, hidden)
        if x.shape[1] <= self.tile or not torch.is_grad_enabled():
            return super().forward(x)
        plain = super().forward
        return torch.cat([recompute(plain, piece) for piece in x.split(self.tile, dim=1)], dim=1)


def tile_final_norm(model):
    """Run model's final norm in tiles of its layers' MLP chunk (TiledNorm), once."""
    norm = model.model.norm
    if isinstance(norm, modeling.RMSNorm) and not isinstance(norm, TiledNorm):
        model.model.norm = TiledNorm(norm, model.model.layers[0].mlp.chunk)
