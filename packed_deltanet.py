"""packed_deltanet.py: packed rows through a Gated DeltaNet layer in fixed shapes: a speed path.

A first reading can skip this file: it computes what deltanet.py computes. It replaces the packed
branch of GatedDeltaNet.forward (deltanet.rows_of, GatedDeltaNet.mix on each sample as a row of its
own, deltanet.packed_back). There, how many rows and how long comes from the data, and a host sync
asks whether the batch is packed at all: neither torch.compile nor a recorded CUDA graph can replay
that. Here the (B, T) batch keeps its shape and masks keep the samples apart:

    runs      each run of equal segment ids (a sample, or a row's padding) numbered along its row
              (runs_of): a sample starts wherever the id changes, exactly as rows_of cuts them
    conv      the causal convolution as a sum over its K taps, each the input j tokens back times
              the tap's weight, dropped where that token is of another run (segmented_conv)
    rule      deltanet.chunked_delta_rule with its within-chunk decay, and so its triangular system
              and its scores, masked to pairs of tokens of one run; the state carried into a chunk
              reaches only the tokens of the run that was going on when the chunk began, and the
              state carried out is that of the run going on at its end (segmented_delta_rule)

Every mask is explicit (a masked pair is zero, not a decay of -1e9 whose cumsum would eat the
float32 precision of its neighbours). Padding (segment 0) was zeroed by GatedDeltaNet.forward and
is a run of its own here, so it reaches nothing. speed.TrainingPlan.training_layers sets `mix` on
each DeltaNet layer (GatedDeltaNet.packed_mix) for layers that are compiled or recorded.

Proved equal by: tests/test_packed_deltanet.py::test_the_fixed_shape_mix_equals_the_unpacked_rows
"""

import torch
import torch.nn.functional as F


def mix(layer, qkv, g, beta, segments):
    """GatedDeltaNet.mix of packed rows, each run of `segments` from zero states as if alone.

    layer: the GatedDeltaNet; qkv (B, T, conv_dim), g and beta (B, T, Hv), segments (B, T) -> y (B, T, Hv, dv)."""
    runs = runs_of(segments)
    qkv = segmented_conv(qkv, layer.conv1d.weight, runs)
    q, k, v = layer.heads(qkv)
    return segmented_delta_rule(q, k, v, g, beta.float(), runs).to(qkv.dtype)


def runs_of(segments):
    """(B, T) segment ids -> (B, T) run ids 1, 2, ...: a new run wherever the id changes along the row
    (the runs deltanet.rows_of unpacks, numbered in place)."""
    starts = F.pad(segments[:, 1:] != segments[:, :-1], (1, 0), value=True)  # (B, T): each run's first token
    return starts.long().cumsum(-1)


def segmented_conv(x, weight, runs):
    """deltanet.causal_conv from a zero state with each run alone: x (B, T, C), weight (C, 1, K),
    runs (B, T) -> silu(conv) (B, T, C), in weight's dtype (summed in float32, as conv1d sums)."""
    B, T, C = x.shape
    K = weight.shape[-1]
    x = F.pad(x.to(weight.dtype), (0, 0, K - 1, 0))  # (B, K - 1 + T, C): zeros before the row
    padded = F.pad(runs, (K - 1, 0), value=0)  # (B, K - 1 + T): run 0 before the row, no run's
    w = weight[:, 0].float()  # (C, K): conv1d weighs the input j tokens back by w[:, K - 1 - j]
    y = x[:, K - 1:] * w[:, K - 1]  # (B, T, C) float32: tap 0, each token itself
    for j in range(1, K):  # tap j: the input j tokens back, dropped where that token is of another run
        back = slice(K - 1 - j, K - 1 - j + T)
        same = (padded[:, back] == runs)[..., None]  # (B, T, 1)
        y = torch.addcmul(y, torch.where(same, x[:, back], 0), w[:, K - 1 - j])
    return F.silu(y).to(weight.dtype)


def segmented_delta_rule(q, k, v, g, beta, runs, chunk: int = 64):
    """deltanet.chunked_delta_rule from a zero state, each run of `runs` (B, T) alone (q, k, v, g and
    beta as there). Returns the output (B, T, H, dv).

    In a chunk, `same` being the pairs of tokens of one run (`apart` masks the others, and j > i),
    `carried` the tokens of the run that was going on before the chunk began and `last` those of the
    run going on at its end (S0: the state of the chunk before, which is that run's):

        u_i = beta_i (v_i - [carried_i] exp(G_i) S0^T k_i - sum_{j<i, same} exp(G_i - G_j) (k_i . k_j) u_j)
        o_i = [carried_i] exp(G_i) S0^T q_i + sum_{j<=i, same} exp(G_i - G_j) (q_i . k_j) u_j
        S   = [carried_C] exp(G_C) S0 + sum_{j in last} exp(G_C - G_j) k_j u_j^T"""
    B, T, H, dk = k.shape
    pad = -T % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))  # k = v = 0, g = 0: the tail changes nothing
    runs = torch.cat([runs, runs[:, -1:].expand(B, pad)], dim=1)  # (B, T + pad): the tail in the last run
    before = F.pad(runs, (1, 0), value=0)[:, :-1]  # (B, T + pad): the run of the token before (0: none)
    # (B, H, n, C, d): n chunks of C tokens, heads before time; runs (B, 1, n, C) for every head
    q, k, v = (x.transpose(1, 2).reshape(B, H, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(B, H, -1, chunk) for x in (g, beta))
    runs, before = (x.reshape(B, 1, -1, chunk) for x in (runs, before))
    carried = runs == before[..., :1]  # (B, 1, n, C)
    last = runs == runs[..., -1:]  # (B, 1, n, C)
    G = g.cumsum(-1)  # (B, H, n, C)
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # (C, C): j > i
    apart = later | (runs[..., :, None] != runs[..., None, :])  # (B, 1, n, C, C): j after i, or of another run
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(apart, float("-inf")).exp()  # (B, H, n, C, C)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # (B, H, n, C, C)
    eye = torch.eye(chunk, device=q.device)
    W_v = torch.linalg.solve_triangular(eye + A, beta[..., None] * v, upper=False)  # (B, H, n, C, dv)
    reads = torch.where(carried, G.exp(), 0)  # (B, H, n, C): exp(G_i) where S0 is this token's run's state
    W_k = torch.linalg.solve_triangular(eye + A, (beta * reads)[..., None] * k, upper=False)  # (B, H, n, C, dk)
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C): within-chunk attention, j <= i, one run
    q_read = q * reads[..., None]  # queries that read S0 through the decay since the chunk began
    k_write = k * torch.where(last, (G[..., -1:] - G).exp(), 0)[..., None]  # keys of the last run, decayed to the end
    keep = torch.where(carried[..., -1], G[..., -1].exp(), 0)  # (B, H, n): S0's share in the chunk's final state
    state = q.new_zeros(B, H, dk, v.shape[-1])
    out = []
    for n in range(q.shape[2]):
        u = W_v[:, :, n] - W_k[:, :, n] @ state  # (B, H, C, dv)
        out.append(q_read[:, :, n] @ state + scores[:, :, n] @ u)  # (B, H, C, dv)
        state = state * keep[:, :, n, None, None] + k_write[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(out, dim=2).reshape(B, H, -1, v.shape[-1])[:, :, :T]  # (B, H, T, dv)
    return out.transpose(1, 2)
