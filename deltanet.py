"""deltanet.py: Gated DeltaNet, the linear-attention layer of Qwen3.5 / 3.6 / 3.8, in plain PyTorch.

Three of every four Qwen3.5 layers mix tokens with this instead of softmax attention. Each head
keeps a memory S, a (dk x dv) matrix that maps keys to values, and reads and writes it once a token:

    S = exp(g) * S                           # forget: decay the whole memory (g <= 0, per token and head)
    S = S + beta * k (v - S^T k)^T           # the delta rule: move what S recalls for k towards v
    o = S^T q                                # read the memory with the query

k and q are L2-normalised, beta in (0, 1) is how far to move, g how much to forget. Decoding keeps S
(and the last few inputs of a short convolution) in place of a KV cache: its size does not grow
with the text. Training and prefill compute the same thing 64 tokens at a time (chunked_delta_rule):
inside a chunk the writes depend on each other only through a small triangular system, solved at
once, so only the chunks run one after another. A packed row (several samples one after another)
must not carry S or the convolution from one sample into the next: rows_of unpacks each sample
into a row of its own and packed_back puts the results where they came from (a shape known only
from the data: compiled and recorded training plugs in packed_deltanet.py's fixed-shape equal).

Checked against transformers' models/qwen3_5 (its PyTorch fallback: torch_chunk_gated_delta_rule,
torch_recurrent_gated_delta_rule, causal_conv1d_fn) in tests/test_qwen3_5.py.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def l2norm(x, eps: float = 1e-6):
    """x / |x| over the last dimension (as flash-linear-attention and transformers compute it)."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------
# The gated delta rule, two ways. q, k (B, T, H, dk) normalised (q also scaled by dk^-0.5);
# v (B, T, H, dv); g, beta (B, T, H); state (B, H, dk, dv). All float32.


def delta_step(state, q, k, v, g, beta):
    """One token: q, k (B, H, dk), v (B, H, dv), g, beta (B, H) -> (new state, output (B, H, dv))."""
    state = state * g.exp()[..., None, None]  # forget
    recalled = torch.einsum("bhkv,bhk->bhv", state, k)  # what the memory gives for k now
    state = state + torch.einsum("bhk,bhv->bhkv", k, beta[..., None] * (v - recalled))  # delta rule
    return state, torch.einsum("bhkv,bhk->bhv", state, q)  # read


def recurrent_delta_rule(q, k, v, g, beta, state):
    """Token after token, as decoding runs it. Returns (output (B, T, H, dv), final state)."""
    out = []
    for t in range(q.shape[1]):
        state, o = delta_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        out.append(o)
    return torch.stack(out, dim=1), state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = 64):
    """The same result, `chunk` tokens at a time. Returns (output (B, T, H, dv), final state).

    Within a chunk, with S0 the state before it and G_i the summed g of its tokens up to i, unroll
    the recurrence: token i writes k_i u_i^T, where the new value it writes is

        u_i = beta_i (v_i - exp(G_i) S0^T k_i - sum_{j<i} exp(G_i - G_j) (k_i . k_j) u_j)

    Every u_i depends on the earlier u_j of its chunk: (I + A) U = beta V - beta exp(G) K S0, with
    A_ij = beta_i exp(G_i - G_j) k_i . k_j for j < i, strictly lower triangular. One triangular solve
    (forward substitution) gives U for all positions at once, as U = W_v - W_k S0. Then

        o_i = exp(G_i) S0^T q_i + sum_{j<=i} exp(G_i - G_j) (q_i . k_j) u_j
        S   = exp(G_C) S0 + sum_j exp(G_C - G_j) k_j u_j^T       (C: the chunk's last token)

    Everything but S0 is computed for all chunks together; only the last two lines run chunk by
    chunk. The tail is padded with k = v = 0 and g = 0: those tokens change nothing."""
    B, T, H, dk = k.shape
    pad = -T % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    g, beta = (F.pad(x, (0, 0, 0, pad)) for x in (g, beta))
    # (B, H, n, C, d): n chunks of C tokens, heads before time
    q, k, v = (x.transpose(1, 2).reshape(B, H, -1, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.transpose(1, 2).reshape(B, H, -1, chunk) for x in (g, beta))
    G = g.cumsum(-1)  # (B, H, n, C)
    # exp(G_i - G_j) for j <= i, else 0 (masked before exp: G_i - G_j > 0 above the diagonal could overflow)
    later = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)  # (C, C): j > i
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(later, float("-inf")).exp()  # (B, H, n, C, C)
    A = (beta[..., None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # (B, H, n, C, C)
    eye = torch.eye(chunk, device=q.device)
    W_v = torch.linalg.solve_triangular(eye + A, beta[..., None] * v, upper=False)  # (B, H, n, C, dv)
    W_k = torch.linalg.solve_triangular(eye + A, (beta * G.exp())[..., None] * k, upper=False)  # (B, H, n, C, dk)
    scores = (q @ k.transpose(-1, -2)) * decay  # (B, H, n, C, C): within-chunk attention, j <= i
    q_read = q * G.exp()[..., None]  # queries that read S0 through the decay since the chunk began
    k_write = k * (G[..., -1:] - G).exp()[..., None]  # keys as decayed by the chunk's end
    out = []
    for n in range(q.shape[2]):
        u = W_v[:, :, n] - W_k[:, :, n] @ state  # (B, H, C, dv)
        out.append(q_read[:, :, n] @ state + scores[:, :, n] @ u)  # (B, H, C, dv)
        state = state * G[:, :, n, -1, None, None].exp() + k_write[:, :, n].transpose(-1, -2) @ u
    out = torch.stack(out, dim=2).reshape(B, H, -1, v.shape[-1])[:, :, :T]  # (B, H, T, dv)
    return out.transpose(1, 2), state


def state_buffers(config, batch: int, device=None, dtype=torch.float32) -> list:
    """Zeroed states to decode in place, one (conv inputs (batch, C, K - 1) in `dtype`, recurrent state
    (batch, H, dk, dv) float32) per DeltaNet layer, None for an attention layer: for caches whose
    tensors must stay where they are (a recorded CUDA graph reads and writes fixed memory)."""
    c = config
    conv = (batch, 2 * c.linear_num_key_heads * c.linear_key_head_dim + c.linear_num_value_heads * c.linear_value_head_dim,
            c.linear_conv_kernel_dim - 1)
    state = (batch, c.linear_num_value_heads, c.linear_key_head_dim, c.linear_value_head_dim)
    return [(torch.zeros(conv, device=device, dtype=dtype), torch.zeros(state, device=device))
            if mixer == "linear_attention" else None for mixer in config.mixers]


# ----------------------------------------------------------------------------------------------
# Packed rows: each sample a row of its own, then back


def rows_of(segments):
    """Where each run of equal segment ids (a sample of a packed row, or a row's padding) lies.

    segments (B, T) -> index (N, L) of its tokens in the B * T flattened ones (0 past its end) and
    valid (N, L), N runs of at most L tokens."""
    B, T = segments.shape
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = starts.flatten().nonzero().squeeze(1)  # (N,)
    lengths = torch.diff(starts, append=starts.new_tensor([B * T]))  # (N,)
    offsets = torch.arange(int(lengths.max()), device=segments.device)  # (L,)
    valid = offsets < lengths[:, None]  # (N, L)
    return torch.where(valid, starts[:, None] + offsets, 0), valid


def segments_of(attention_mask, cu_seqlens, T: int):
    """(B, T) segment ids for the DeltaNet layers (0: padding), or None for plain rows: the attention
    mask, or for rows packed one after another (cu_seqlens) each token's row 1, 2, ..."""
    if cu_seqlens is not None:
        return torch.searchsorted(cu_seqlens, torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype),
                                  right=True)[None]  # (1, T)
    return attention_mask.long() if attention_mask is not None else None


def packed_back(y, index, valid, B: int, T: int):
    """y (N, L, ...) computed row by row -> (B, T, ...) where its tokens came from."""
    out = y.new_empty(B * T, *y.shape[2:])
    out[index[valid]] = y[valid]
    return out.view(B, T, *y.shape[2:])


# ----------------------------------------------------------------------------------------------
# The layer


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(z): z is a gate computed from the layer's input.
    Its weight is a plain scale, initialised to one (not zero-centred like Qwen3.5's other norms)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, z):  # x, z (..., dv)
        dtype = x.dtype
        x = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype) * F.silu(z.float())).to(dtype)


def causal_conv(x, weight, state=None):
    """Depthwise causal convolution, then silu: each channel of x (B, T, C) mixed with its own last
    K inputs by weight (C, 1, K). state (B, C, K - 1): the inputs before x (None: zeros).
    Returns (B, T, C) and the new state, the last K - 1 inputs."""
    C, K = weight.shape[0], weight.shape[-1]
    x = x.transpose(1, 2)  # (B, C, T)
    before = state if state is not None else x.new_zeros(x.shape[0], C, K - 1)
    x = torch.cat([before.to(x.dtype), x], dim=-1)  # (B, C, K - 1 + T)
    y = F.conv1d(x.to(weight.dtype), weight, groups=C)  # (B, C, T)
    return F.silu(y).transpose(1, 2), x[..., -(K - 1):]


class GatedDeltaNet(nn.Module):
    """The linear-attention token mixer: x (B, T, hidden) -> (B, T, hidden).

    in_proj_qkv makes q, k and v (one channel each), a short causal convolution mixes each channel
    with the three tokens before it, in_proj_b gives beta and in_proj_a (with A_log and dt_bias)
    the decay g of each value head; the delta rule runs; in_proj_z gates its output (GatedRMSNorm);
    out_proj returns to the hidden size. Several value heads may share one query / key head."""

    def __init__(self, hidden: int, k_heads: int, v_heads: int, dk: int, dv: int, kernel: int, eps: float):
        super().__init__()
        self.k_heads, self.v_heads, self.dk, self.dv = k_heads, v_heads, dk, dv
        self.conv_dim = 2 * k_heads * dk + v_heads * dv
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, v_heads * dv, bias=False)
        self.in_proj_b = nn.Linear(hidden, v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, v_heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, bias=False,
                                padding=kernel - 1)  # the checkpoint's module; causal_conv uses its weight
        self.A_log = nn.Parameter(torch.zeros(v_heads))  # the decay rate of each head, as log(A)
        self.dt_bias = nn.Parameter(torch.ones(v_heads))
        self.norm = GatedRMSNorm(dv, eps)
        self.out_proj = nn.Linear(v_heads * dv, hidden, bias=False)
        self.packed_mix = None  # mix of packed rows in fixed shapes, set from outside (speed.py: packed_deltanet.mix)
        self.delta_rule = chunked_delta_rule  # over a sequence; for long rows checkpointed in pieces (tiles.py)

    def forward(self, x, segments=None, cache=None, layer: int = 0):
        """segments (B, T): 0 on padding, else the id of the sample each token belongs to (1 for a
        plain row; 1, 2, 3, ... in a packed one). cache: a model.KVCache holding this layer's
        convolution and recurrent state, carried on from its last forward."""
        B, T, _ = x.shape
        if segments is not None:  # padding contributes nothing: zero inputs leave the state at zero
            x = x * (segments != 0)[..., None].to(x.dtype)
        qkv = self.in_proj_qkv(x)  # (B, T, conv_dim)
        beta = self.in_proj_b(x).sigmoid()  # (B, T, Hv)
        # g = -A * softplus(a + dt_bias) <= 0, in float32 (A = exp(A_log) would overflow in fp16)
        g = -self.A_log.float().exp() * F.softplus(self.in_proj_a(x).float() + self.dt_bias)  # (B, T, Hv)
        if cache is None and segments is not None and self.packed_mix is not None:  # the same, in fixed shapes
            y = self.packed_mix(self, qkv, g, beta, segments)
        elif cache is None and segments is not None and bool((segments > 1).any()):  # packed samples
            index, valid = rows_of(segments)
            rows = [t.flatten(0, 1)[index] for t in (qkv, g, beta)]  # (N, L, ...) each
            y, _, _ = self.mix(*rows)
            y = packed_back(y, index, valid, B, T)
        else:
            conv, state = cache.linear_state(layer) if cache is not None else (None, None)
            y, conv, state = self.mix(qkv, g, beta, conv, state)
            if cache is not None:
                cache.set_linear_state(layer, conv, state)
        y = self.norm(y, self.in_proj_z(x).view(B, T, self.v_heads, self.dv))  # (B, T, Hv, dv)
        return self.out_proj(y.reshape(B, T, -1))

    def mix(self, qkv, g, beta, conv=None, state=None):
        """The part that runs along the sequence: convolution and delta rule, from the states given
        (None: the start of a text). Returns (y (B, T, Hv, dv), conv state, recurrent state)."""
        B, T, _ = qkv.shape
        qkv, conv = causal_conv(qkv, self.conv1d.weight, conv)
        q, k, v = self.heads(qkv)
        if state is None:
            state = q.new_zeros(B, self.v_heads, self.dk, self.dv)
        rule = recurrent_delta_rule if T == 1 else self.delta_rule
        y, state = rule(q, k, v, g, beta.float(), state.float())
        return y.to(qkv.dtype), conv, state

    def heads(self, qkv):
        """The convolved channels (B, T, conv_dim) -> float32 q, k (B, T, Hv, dk), normalised (q also
        scaled), and v (B, T, Hv, dv)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.split([self.k_heads * self.dk, self.k_heads * self.dk, self.v_heads * self.dv], dim=-1)
        q = l2norm(q.float().view(B, T, self.k_heads, self.dk)) * self.dk ** -0.5  # (B, T, Hk, dk)
        k = l2norm(k.float().view(B, T, self.k_heads, self.dk))
        v = v.float().view(B, T, self.v_heads, self.dv)  # (B, T, Hv, dv)
        group = self.v_heads // self.k_heads  # consecutive value heads share a query / key head
        return q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2), v  # q, k (B, T, Hv, dk)
