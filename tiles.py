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

Qwen3.5's gated attention layers run so too, the output gate carried with the heads (GatedParts).
Its Gated DeltaNet layers hold far more a position than attention in backward (the delta rule's
chunk-by-chunk decays, scores and solved values): their token mixer runs DELTA_RULE_PIECE positions
at a time, each piece a checkpoint that starts from the states the piece before left, the
convolution's last inputs and the rule's memory (DeltaNetParts); packed samples run the mixer whole
with only the rule in pieces (delta_rule_in_pieces).

Replaces: model.DecoderLayer._forward (checkpointed whole), model.QwenModel.norm and
deltanet.chunked_delta_rule, for rows longer than model.MLP.chunk (DELTA_RULE_PIECE) with offloaded
checkpoints.
Proved equal by: tests/test_offload.py::test_split_layers_give_the_checkpointed_gradients (plain and
4-bit bases, float32 on the CPU), ::test_split_layers_recompute_the_masks_their_forward_drew,
::test_split_layers_on_a_gpu_give_the_plain_gradients_in_less_memory (bf16, GPU) and
tests/test_fused.py::test_fused_layers_give_the_plain_gradients (speed.FusedLayer split the same way);
Qwen3.5: ::test_split_layers_give_the_checkpointed_gradients[tiny-qwen3_5-*] and
::test_the_delta_rule_in_pieces_gives_the_whole_rows_results.
"""

import torch
import torch.nn as nn

import model as modeling
from deltanet import chunked_delta_rule
from model import recompute


def split_layer(parts, h, cos, sin, mask, is_causal, tile: int, segments=None):
    """model.DecoderLayer._forward of a row (B, T, hidden) as checkpoints of its parts: the token
    mixer's half (parts.mixer_half: attention_in_tiles, or a DeltaNet's in pieces), then the MLP a
    tile at a time (parts.mlp_piece). parts: PlainParts, GatedParts, DeltaNetParts or speed.FusedLayer."""
    h = recompute(parts.mixer_half, h, cos, sin, mask, is_causal, tile, segments)
    return torch.cat([recompute(parts.mlp_piece, piece) for piece in h.split(tile, dim=1)], dim=1)


def attention_in_tiles(parts, h, cos, sin, mask, is_causal, tile: int):
    """h + attention(norm(h)) for h (B, T, hidden): q, k and v made tile by tile, attention over the
    whole row for each K/V head, then h + o(y) tile by tile. Written as small calls so that each
    whole-row tensor is freed as soon as the next one is made (a local would keep it to the end)."""
    pieces = zip(h.split(tile, dim=1), cos.split(tile, dim=1), sin.split(tile, dim=1))
    ys = attend_by_groups(whole_row_heads([recompute(grouped_heads, parts, *p) for p in pieces]), mask, is_causal)
    y_tiles = zip(*(y.split(tile, dim=2) for y in ys))  # per tile: each group's (B, heads, t, hd) (and the gate)
    return torch.cat([recompute(out_tile, parts, h_t, *y_t) for h_t, y_t in zip(h.split(tile, dim=1), y_tiles)], dim=1)


def grouped_heads(parts, h, cos, sin) -> tuple:
    """One tile's q, k and v (parts.heads) by K/V head: q's heads cut into as many groups as K/V has
    heads (as SDPA's enable_gqa pairs them: query head i with K/V head i // group size), then k's and
    v's heads one by one. 3 x nkv tensors (B, heads, t, hd); then Qwen3.5's output gate, whole (GatedParts)."""
    q, k, v, *gate = parts.heads(h, cos, sin)  # (B, nh, t, hd), 2 x (B, nkv, t, hd), (B, nh, t, hd) or nothing
    n = k.shape[1]
    return (*q.chunk(n, dim=1), *k.chunk(n, dim=1), *v.chunk(n, dim=1), *gate)


def whole_row_heads(tiles: list) -> list:
    """Each of grouped_heads' 3 x nkv tensors with its tiles joined along the row: (B, heads, T, hd)."""
    return [torch.cat(group, dim=2) for group in zip(*tiles)]


def attend_by_groups(heads: list, mask, is_causal) -> list:
    """model.attend for each K/V head and its query heads (heads: whole_row_heads' list): each group's
    output (B, heads, T, hd), the same products as one call over all heads; then the gate, if any."""
    n = len(heads) // 3
    ys = [modeling.attend(q, k, v, mask, is_causal) for q, k, v in zip(heads[:n], heads[n:2 * n], heads[2 * n:3 * n])]
    return ys + heads[3 * n:]


def out_tile(parts, h, *ys):
    """h + o(y) of one tile h (B, t, hidden), y the groups' attention outputs side by side (B, t, nh * hd),
    and a gate after them (B, t, 2 * nh * hd: GatedParts)."""
    B, t, _ = h.shape
    y = torch.cat([y.transpose(1, 2).reshape(B, t, -1) for y in ys], dim=-1)  # each (B, heads, t, hd) -> (B, t, heads * hd)
    return parts.out(y, h)


class PlainParts:
    """model.DecoderLayer's _forward cut where split_layer cuts it, each part a call of the layer's own
    modules, so that the math is the plain layer's (an attention layer of Qwen2, Qwen2.5 or Qwen3)."""

    def __init__(self, layer):
        self.layer = layer

    def mixer_half(self, h, cos, sin, mask, is_causal, tile: int, segments=None):  # h + attention(norm(h))
        return attention_in_tiles(self, h, cos, sin, mask, is_causal, tile)

    def heads(self, h, cos, sin):  # (B, t, hidden) -> q (B, nh, t, hd), k and v (B, nkv, t, hd), RoPE applied
        q, k, v, _ = self.layer.self_attn.heads(self.layer.input_layernorm(h), cos, sin)
        return q, k, v

    def out(self, y, h):  # y (B, t, nh * hd), h (B, t, hidden) -> h + o_proj(y)
        return h + self.layer.self_attn.o_proj(y)

    def mlp_piece(self, h):  # (B, t, hidden) -> h + mlp(norm(h))
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))


class GatedParts(PlainParts):
    """Qwen3.5's attention layer cut as PlainParts cuts it: q_proj's output gate goes with the heads
    (B, nh, t, hd), joined along the row, and multiplies attention's output tile by tile before o_proj
    (model.Attention.forward)."""

    def heads(self, h, cos, sin):  # q, k, v as PlainParts', and the gate (B, nh, t, hd)
        q, k, v, gate = self.layer.self_attn.heads(self.layer.input_layernorm(h), cos, sin)
        B, t, _ = gate.shape
        return q, k, v, gate.view(B, t, q.shape[1], -1).transpose(1, 2)

    def out(self, y, h):  # y: attention's output and the gate side by side (B, t, 2 * nh * hd)
        y, gate = y.chunk(2, dim=-1)
        return h + self.layer.self_attn.o_proj(y * torch.sigmoid(gate))


# A DeltaNet layer's chunked delta rule (deltanet.chunked_delta_rule) keeps, for its backward, a
# dozen float32 tensors per position and head: the within-chunk decay, scores and triangular
# system (64 x 64 a chunk), the solved values, and the state each chunk starts from. Tracked tensor
# by tensor on the CPU at Qwen3.5-4B's proportions, one DeltaNet layer's backward over 256 positions
# held 169 (tokens x hidden) units at once, most of them the rule's, against 7 for a tiled attention
# layer. The layer carries two states from one position to the next and nothing else, the
# convolution's last inputs and the rule's memory, so a long row runs through it DELTA_RULE_PIECE
# positions at a time, each piece a checkpoint that starts from the states the piece before left:
# backward recomputes one piece at a time. A piece holds whole chunks (a multiple of 64), so it is
# chunked as the whole row is: the same sums.
DELTA_RULE_PIECE = 512


class DeltaNetParts(PlainParts):
    """A Qwen3.5 DeltaNet layer cut where split_layer cuts it: its token mixer runs DELTA_RULE_PIECE
    positions at a time (deltanet_in_pieces), then the MLP in tiles. Packed samples (segment ids past
    1) run the mixer over the whole row as the layer does, its delta rule in pieces (tile_delta_rules)."""

    def mixer_half(self, h, cos, sin, mask, is_causal, tile: int, segments=None):  # model.DecoderLayer.mix
        if segments is not None and bool((segments > 1).any()):
            return self.layer.mix(h, cos, sin, mask, is_causal, segments=segments)
        return deltanet_in_pieces(self.layer, h, segments, DELTA_RULE_PIECE)


class CarriedStates:
    """A DeltaNet layer's cache (the two methods of model.KVCache it calls) holding what one piece of a
    row leaves the next: the convolution's last inputs and the delta rule's state."""

    def __init__(self, conv, state):
        self.states = conv, state

    def linear_state(self, layer: int):
        return self.states

    def set_linear_state(self, layer: int, conv, state):
        self.states = conv, state


def deltanet_in_pieces(layer, h, segments, piece: int):
    """h + DeltaNet(norm(h)) of a row (B, T, hidden), `piece` positions at a time, each a checkpoint
    that starts from the states the piece before left, as decoding carries them from token to token:
    backward recomputes one piece at a time. segments: 0 on padding, else 1 (one sample a row)."""
    conv = state = None
    outs = []
    for start in range(0, h.shape[1], piece):
        rows = None if segments is None else segments[:, start:start + piece]
        out, conv, state = recompute(deltanet_piece, layer, h[:, start:start + piece], rows, conv, state)
        outs.append(out)
    return torch.cat(outs, dim=1)


def deltanet_piece(layer, h, segments, conv, state):
    """One piece: (h + DeltaNet(norm(h)), the states it leaves; the convolution's copied out of its
    input, of which a view would keep the whole piece's)."""
    carried = CarriedStates(conv, state)
    h = h + layer.linear_attn(layer.input_layernorm(h), segments, carried)
    conv, state = carried.states
    return h, conv.clone(), state


def delta_rule_in_pieces(q, k, v, g, beta, state):
    """deltanet.chunked_delta_rule of a row longer than DELTA_RULE_PIECE, a checkpointed piece at a time."""
    T = q.shape[1]
    if T <= DELTA_RULE_PIECE or not torch.is_grad_enabled():
        return chunked_delta_rule(q, k, v, g, beta, state)
    outs = []
    for start in range(0, T, DELTA_RULE_PIECE):
        piece = [x[:, start:start + DELTA_RULE_PIECE] for x in (q, k, v, g, beta)]
        out, state = recompute(chunked_delta_rule, *piece, state)
        outs.append(out)
    return torch.cat(outs, dim=1), state


def tile_delta_rules(model):
    """Run each DeltaNet layer's delta rule over long rows in pieces (delta_rule_in_pieces)."""
    for layer in model.model.layers:
        if hasattr(layer, "linear_attn"):
            layer.linear_attn.delta_rule = delta_rule_in_pieces


class SplitLayer:
    """A model.DecoderLayer for training steps with offloaded checkpoints (offload.offloaded_layers
    around it), called like the layer: a checkpointed row longer than the layer's MLP chunk runs as
    split_layer (Qwen3.5's: GatedParts, DeltaNetParts); anything else as the layer runs."""

    def __init__(self, layer):
        self.layer = layer
        if hasattr(layer, "linear_attn"):
            self.parts = DeltaNetParts(layer)
        else:
            self.parts = GatedParts(layer) if layer.self_attn.gated else PlainParts(layer)

    def __call__(self, h, cos, sin, mask, is_causal, cache, i, checkpoint=False, segments=None):
        chunk = self.layer.mlp.chunk
        if not checkpoint or h.shape[1] <= chunk:
            return self.layer(h, cos, sin, mask, is_causal, cache, i, checkpoint=checkpoint, segments=segments)
        return split_layer(self.parts, h, cos, sin, mask, is_causal, chunk, segments)


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
