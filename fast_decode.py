"""fast_decode.py: how decoding runs faster, giving the plain path's results.

A first reading can skip this file. infer.py and engine.py decode the plain way: one decode step
is `decode.Decoder.decode_one` (one prompt) or `engine.Engine.eager_forward` (a batch of them).
Each piece here replaces one of them from outside, names the plain function it replaces and the
test that proves they agree, and is chosen in one place:

    plan_decoding        how infer.py decodes a token (a CUDA graph replay, or eager), with q/k/v
                         and gate/up fused where the weights are plain (fuse_projections)
    plan_batch_decoding  how engine.py decodes its batches (a CUDA graph per bucket of batch size
                         and span), its projections fused with the row adapters inside, and how
                         prompts prefilled together attend (speed.VarlenAttention on a GPU)

Why: a decode step reads every weight once for a single token, so the GPU waits for some 600
kernel launches from Python (replayed as one CUDA graph, it does not) and for memory (one matmul
over a fused matrix reads it at a better rate than three). What each path gains is measured by
bench.py and recorded in BENCHMARKS.md (and docs/performance.md), not here. This file imports
speed.py (speed.VarlenAttention, and speed.fuse_linears, which the fused training layers share too); never the reverse.
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import decode
import deltanet
import model as modeling
import speed
from model import ModelError

# ----------------------------------------------------------------------------------------------
# How decoding runs


@dataclass
class DecodePlan:
    """How infer.py decodes: each token as one CUDA graph replay (CUDAGraphDecoder), or eagerly
    (decode.Decoder); on plain weights, with q/k/v and gate/up fused (fuse_projections). Chosen by
    plan_decoding."""

    cuda_graph: bool = False
    compile: bool = False  # torch.compile the step before recording it
    fuse: bool = False  # one matrix for q, k, v and one for gate, up

    def prepare(self, model):
        if self.fuse:
            fuse_projections(model)
        return model

    def new_decoder(self, model, max_len: int):
        if self.cuda_graph:
            return CUDAGraphDecoder(model, max_len, compile=self.compile)
        return decode.Decoder(model, max_len)


def plan_decoding(cuda_graph: bool | None, compile: bool, device, model=None) -> DecodePlan:
    """--cuda_graph: given, or else on whenever decoding runs on a GPU (eager decoding there is
    launch-bound: BENCHMARKS.md, decode rows). Projections are fused where the model's weights are
    plain (plain_weights): no adapter, or one merged, and no 4-bit base. Qwen3.5's step too, its
    DeltaNet states written in place (StaticKVCache): the eager logits on an H100 (run 26)."""
    return DecodePlan(cuda_graph=device.type == "cuda" if cuda_graph is None else cuda_graph, compile=compile,
                      fuse=model is not None and plain_weights(model))


# ----------------------------------------------------------------------------------------------
# CUDA-graph decoding. Replaces: decode.Decoder.decode_one.
# Proved equal by: tests/test_infer.py::test_cuda_graph_decoding_gives_the_eager_logits (GPU) and, the step
# run without recording on a Qwen3.5 model over a chat, tests/test_qwen3_5_lora.py::
# test_the_static_decoder_gives_the_plain_logits_across_a_chat


class StaticKVCache(modeling.KVCache):
    """A KV cache whose tensors never move, for decoding as one CUDA graph replay (batch 1).

    New keys and values are written at `positions` (a tensor, so the graph can be replayed for
    any position) and attention always spans the whole buffer, masked after each query's own
    position, so stale entries are never seen.

    A Qwen3.5 DeltaNet layer's convolution and recurrent states live in fixed buffers too
    (deltanet.state_buffers), and its new states are copied into them (set_linear_state), where
    KVCache takes the new tensors in their place: a graph reads and writes the memory it was
    recorded with, so a state that moved would be left behind at the next replay. Zeros there are
    what KVCache's None is, the start of a text. `linear_length` is the caller's to keep
    (CUDAGraphDecoder): a replayed graph runs no Python."""

    positions = None  # (T,) set by attention_inputs before each forward

    def __init__(self, config, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(config, batch_size, max_len, device=device, dtype=dtype)
        self.linear = deltanet.state_buffers(config, batch_size, device, dtype)

    def attention_inputs(self, input_ids, attention_mask=None, position_ids=None):
        if position_ids is None:  # a prefill from position 0
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        self.positions = position_ids[0]  # (T,)
        keys = torch.arange(self.max_len, device=input_ids.device)
        mask = (keys[None, :] <= self.positions[:, None])[None, None]  # (1, 1, T, S)
        return position_ids, mask, False

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.positions, k)
        self.v[layer].index_copy_(2, self.positions, v)
        return self.k[layer], self.v[layer]

    def linear_state(self, layer: int):
        return self.linear[layer]

    def set_linear_state(self, layer: int, conv, state):
        self.linear[layer][0].copy_(conv)
        self.linear[layer][1].copy_(state)

    def copies(self) -> list:
        """Copies of the DeltaNet states as they stand (None for an attention layer): the buffers
        themselves are overwritten by the next token."""
        return [None if s is None else (s[0].clone(), s[1].clone()) for s in self.linear]

    def put(self, states: list):
        """Copy states (as copies() gives them) into the buffers."""
        for buffers, kept in zip(self.linear, states):
            if buffers is not None:
                buffers[0].copy_(kept[0])
                buffers[1].copy_(kept[1])

    def zero_linear(self):
        """Zero the DeltaNet states: a text's start (KVCache's None)."""
        for buffers in self.linear:
            for t in buffers or ():
                t.zero_()


def coordinate_descent_tuning():
    import torch._inductor.config  # with torch._dynamo: 1.5 s, paid only when compiling
    return torch._inductor.config.patch(coordinate_descent_tuning=True)


class CUDAGraphDecoder(decode.Decoder):
    """decode.Decoder with decode_one replayed as a single CUDA graph: the ~600 kernel launches of
    one token become one.

    A graph replays fixed work on fixed memory, so the cache is a StaticKVCache of `max_len`
    positions and the token and its position live in fixed buffers that are filled before each
    replay. The prefill runs eagerly, into the same buffers. A Qwen3.5 model's snapshots (for going
    back in a chat: decode.Decoder.resume_point) are copies, put back by copying. The graph holds
    whatever adapter was active at capture: make a new one after switching. record=False runs the
    step eagerly instead, on the same memory (the CPU tests' way to check it)."""

    def __init__(self, model, max_len: int, compile: bool = False, record: bool = True):
        p = model.lm_head.weight
        self.model, self.max_len = model, max_len
        # torch.compile fuses the many small element-wise kernels (norms, RoPE, SiLU, LoRA's
        # casts) before capture: a quarter of the kernels per token (BENCHMARKS.md, Qwen3 decode).
        # Coordinate-descent tuning (as gpt-fast) then tries each kernel's block sizes: faster
        # replays, for more seconds of compiling.
        self.step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self.cache = StaticKVCache(model.config, 1, max_len, device=p.device, dtype=p.dtype)
        self.snapshots = {}  # decode.Decoder.resume_point's (a DeltaNet model's recurrent states)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        tuning = coordinate_descent_tuning() if compile else contextlib.nullcontext()
        self.graph = self.record(tuning) if record else None

    def record(self, tuning) -> torch.cuda.CUDAGraph:
        """The step, recorded. Two warm-up runs first, outside the default stream as capture requires
        (a compiled step compiles in them). They really run: they write keys and values at position
        0 (the prefill writes them again) and would advance the DeltaNet states two tokens, so those
        are put back as they were (as CUDAGraphBatchDecoding.record does)."""
        states = self.cache.copies()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad(), tuning:
            for _ in range(2):
                self.step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.cache.put(states)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.logits = self.step_fn()
        return graph

    def _step(self):
        h = self.model.model(self.token, position_ids=self.position, cache=self.cache)  # (1, 1, hidden)
        return self.model.lm_head(h[0, -1])

    def prefill(self, input_ids, start: int = 0):
        """decode.Decoder.prefill, eagerly, on the fixed buffers. From position 0 the DeltaNet states
        are zeroed (a KVCache drops them); from a later one they hold `start` positions already
        (decode.Decoder.resume_point chose it). The count is kept here and in decode_one."""
        if start == 0:
            self.cache.zero_linear()
        logits = super().prefill(input_ids, start)
        self.cache.linear_length = start + input_ids.shape[1]
        return logits

    def decode_one(self, token, position: int):
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        if self.graph is None:
            self.logits = self.step_fn()
        else:
            self.graph.replay()
        self.cache.linear_length = position + 1
        return self.logits

    def states(self) -> list:
        return self.cache.copies()  # the buffers are written in place by every later token

    def put_back(self, position: int):
        self.cache.put(self.snapshots[position])
        self.cache.linear_length = position


# ----------------------------------------------------------------------------------------------
# CUDA-graph batched decoding. Replaces: engine.Engine.eager_forward.
# Proved equal by: tests/test_engine.py::test_cuda_graph_batches_give_the_eager_tokens (GPU: recorded, and
# compiled first) and ::test_bucketed_steps_give_the_eager_tokens_on_the_cpu (buckets without capture)


class CUDAGraphBatchDecoding:
    """engine.Engine's decode step (one token for each of B rows) replayed as a CUDA graph, one
    recorded per bucket of batch size and of span, as CUDAGraphDecoder does for one prompt.

    A graph's shapes cannot depend on the data, so a step runs in the smallest recorded shape that
    holds it: B rows in the next power of two (the spare rows harmless dummies), and a span (the
    positions each row attends over) in the next power of two from 256, masked after each row's own
    position. A step then reads at most twice the cache it needs; attending over every slot's whole
    length instead read all of a 32,768-position cache each step however short the answers.
    The tokens, positions and adapter rows live in fixed buffers filled before each replay. Graphs
    are recorded as buckets are first needed, on a side stream, sharing one memory pool."""

    def __init__(self, engine, compile: bool = False, capture: bool = True):
        self.engine, slots, device, self.capture = engine, engine.slots, engine.device, capture
        # torch.compile fuses the step's element-wise kernels (norms, RoPE, SiLU, the row adapters'
        # masks) before capture, as CUDAGraphDecoder's compile does. One compiled graph for every
        # bucket: the batch size and span are symbolic (dynamic=True), so a new bucket only records.
        self.logits_of = torch.compile(engine.logits, dynamic=True) if compile else engine.logits
        # and no size taken as equal to another because they were equal once (the largest bucket's
        # rows and the cache's slots: "duck sizing" would compile again for every smaller bucket)
        self.symbolic = torch.fx.experimental._config.patch(use_duck_shape=False)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.adapters = torch.zeros(slots, dtype=torch.long, device=device)
        self.graphs, self.logits, self.pool = {}, {}, torch.cuda.graph_pool_handle() if capture else None

    def bucket(self, B: int, span: int) -> tuple[int, int]:
        # Two rows at least: compiled, a step of one row would be compiled again (size 1 is never symbolic)
        return (min(self.engine.slots, 1 << max(1, (B - 1).bit_length())),
                min(self.engine.max_len, max(256, 1 << (span - 1).bit_length())))

    def __call__(self, tokens, positions, adapters, span: int):
        B, key = tokens.shape[0], self.bucket(tokens.shape[0], span)
        b = key[0]
        for buffer, values in ((self.tokens, tokens), (self.positions, positions), (self.adapters, adapters)):
            if values is not None:
                buffer[B:b] = 0  # dummy rows: position 0 of their own slot, no adapter
                buffer[:B] = values
        if key not in self.graphs:
            self.record(*key)
        self.graphs[key].replay()
        return self.logits[key][:B]

    def record_buckets(self):
        """Record now the graph of every batch-size bucket at the shortest span (a server's first
        clients then wait for none of them; the graph of a longer span is recorded when first needed)."""
        span = self.bucket(1, 1)[1]
        for b in sorted({self.bucket(B, 1)[0] for B in range(1, self.engine.slots + 1)}):
            if (b, span) not in self.graphs:
                self.record(b, span)

    def record(self, b: int, span: int):
        e = self.engine

        def step():
            e.set_rows(self.positions[:b], self.adapters[:b] if e.adapters else None, span)
            with self.symbolic:
                return self.logits_of(self.tokens[:b])
        if not self.capture:  # capture=False: the same step on the same buffers, run instead of replayed (CPU tests)
            self.graphs[b, span] = Rerun(lambda: self.logits.__setitem__((b, span), step()))
            return
        # The warm-up step really runs: it writes the keys and values of each row's position again
        # (the same values), but it would advance a DeltaNet layer's recurrent state one token too far
        # (the replay advances it again), so those states are put back as they were.
        states = [t for pair in e.cache.linear if pair is not None for t in pair]
        saved = [t.clone() for t in states]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            step()  # warm up outside the default stream, as capture requires (compiled: compiles)
        torch.cuda.current_stream().wait_stream(stream)
        for t, before in zip(states, saved):
            t.copy_(before)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            self.logits[b, span] = step()
        self.graphs[b, span] = graph


class Rerun:
    """CUDAGraphBatchDecoding's stand-in for a recorded graph where nothing is captured: replay() runs the step."""

    def __init__(self, step):
        self.replay = step


def plan_batch_decoding(engine, cuda_graph: bool | None, compile: bool = False):
    """--cuda_graph for the engine: given, or else on whenever it runs on a GPU; --torch_compile:
    the step compiled before its graphs are recorded (CUDAGraphBatchDecoding). Projections fused
    (fuse_projections) on every base but a 4-bit one. Prompts prefilled together attend through
    varlen_attn where it runs (no (T, T) mask, so 8,192 tokens at once)."""
    if cuda_graph is None:
        cuda_graph = engine.device.type == "cuda"
    if plain_base(engine.model):  # q/k/v and gate/up one matmul each, the row adapters inside them
        fuse_projections(engine.model)  # built for this engine's adapter stacks now, outside any graph
    if cuda_graph:
        engine.forward = CUDAGraphBatchDecoding(engine, compile)
    if engine.prefill_tokens and speed.varlen_available(engine.device, engine.model.lm_head.weight.dtype):
        engine.cache.packed_mask, engine.prefill_tokens = speed.VarlenAttention, 8192
    return engine


# ----------------------------------------------------------------------------------------------
# Fused projections. Replaces: three q, k, v matmuls (and two gate, up) with one, for decoding, the
# row adapters' (lora.LoRALinear.per_row) inside it.
# Proved equal by: tests/test_model.py::test_fused_projections_change_neither_logits_nor_state_dict
# and tests/test_engine.py::test_several_adapters_in_one_batch_equal_each_adapter_alone


@torch.no_grad()
def fuse_projections(model):
    """Put q, k, v (and gate, up), which all read the same input, into one matmul each, for decoding.

    A decode step reads every weight once for a single token, so its speed is memory bandwidth: one
    matmul over the fused matrix reads it at a better rate than three separate ones (the small k and
    v matrices especially) and launches fewer kernels. The separate weights become views into the
    fused ones, so nothing is stored twice and state_dict() is unchanged. Not on a 4-bit base, which
    keeps codes instead of a weight (plain_base).
    """
    if not plain_base(model):
        raise ModelError("fuse_projections needs the base weights as matrices, and this base is in 4 bits.")
    qkv, gate_up = _projections(model)
    for attn, q_k_v in zip(_attention_layers(model), qkv):
        attn.fused_qkv = attn.fused_qkv or FusedProjection(q_k_v)
        attn.fused_qkv.refresh()  # for the adapter stacks set now (set_row_adapters), not inside a later step
    for layer, g_u in zip(model.model.layers, gate_up):
        layer.mlp.fused_gate_up = layer.mlp.fused_gate_up or FusedProjection(g_u)
        layer.mlp.fused_gate_up.refresh()


class FusedProjection:
    """x through projections that all read it (q, k, v; or gate, up) in one matmul, their outputs
    side by side (B, T, sum of outs).

    With adapters in rows (lora.set_row_adapters), each projection's stacked A sits below the
    weights in the same matrix, so that one matmul also gives x A^T (B, T, R); each row keeps its
    own adapter's columns (the others zeroed, as LoRALinear.per_row does), and the B's, one
    block-diagonal (R, sum of outs) matrix, add their product into the outputs in place: two matmuls
    for the group where each projection alone takes three, and no element-wise adds. With one
    adapter active and unmerged (no rows), each projection runs as its LoRALinear does."""

    def __init__(self, linears):
        self.linears, self.out = linears, sum(lin.out_features for lin in linears)
        self.build([None] * len(linears))

    def build(self, rows):
        """The fused matrix (the weights, then each projection's stacked A from its rows, if any)."""
        self.weight, self.bias = speed.fuse_linears(self.linears, [r[0] for r in rows if r is not None])
        R = self.weight.shape[0] - self.out
        self.lora_b = self.weight.new_zeros(R, self.out)  # each B^T in its own block
        self.owner = torch.zeros(R, dtype=torch.long, device=self.weight.device)  # each column's adapter
        col = row = 0
        for lin, r in zip(self.linears, rows):
            if r is not None:  # r: (A (n r, in), B (out, n r), owner (n r,), index) of set_row_adapters
                self.lora_b[col:col + len(r[0]), row:row + lin.out_features] = r[1].t()
                self.owner[col:col + len(r[0])] = r[2]
                col += len(r[0])
            row += lin.out_features
        self.stacks = [r[0] if r is not None else None for r in rows]

    def refresh(self, rows=None):
        """Rebuild after new adapter stacks (set_row_adapters): once, before any step runs. Before a
        step is compiled or recorded too (fuse_projections, which plan_batch_decoding calls), or the
        rebuild would be in the graph."""
        rows = rows or [getattr(lin, "rows", None) for lin in self.linears]
        if any((r[0] if r is not None else None) is not s for r, s in zip(rows, self.stacks)):
            self.build(rows)

    def __call__(self, x):  # (B, T, in) -> (B, T, sum of outs)
        rows = [getattr(lin, "rows", None) for lin in self.linears]
        if all(r is None for r in rows):
            if any(_live_adapter(lin) for lin in self.linears):
                return torch.cat([lin(x) for lin in self.linears], dim=-1)
            bias = None if self.bias is None else self.bias[:self.out]
            return F.linear(x, self.weight[:self.out], bias)
        self.refresh(rows)
        index = next(r[3] for r in rows if r is not None)  # (B,): each row's adapter
        y = F.linear(x, self.weight, self.bias)  # (B, T, out + R): the projections, then x A^T
        xa = y[..., self.out:].masked_fill(self.owner != index[:, None, None], 0)  # (B, T, R)
        out = y[..., :self.out]
        out.view(-1, self.out).addmm_(xa.reshape(-1, xa.shape[-1]), self.lora_b)
        return out


def plain_base(model) -> bool:
    """Whether every q/k/v and gate/up projection keeps a weight matrix (a 4-bit base keeps codes)."""
    qkv, gate_up = _projections(model)
    return all(isinstance(getattr(lin, "weight", None), torch.Tensor) for group in qkv + gate_up for lin in group)


def plain_weights(model) -> bool:
    """Whether every q/k/v and gate/up projection is a plain matrix: a plain base (plain_base) and no
    live (unmerged) adapter."""
    qkv, gate_up = _projections(model)
    return plain_base(model) and not any(_live_adapter(lin) for group in qkv + gate_up for lin in group)


def _attention_layers(model) -> list:
    """Each layer's attention; a Qwen3.5 Gated DeltaNet layer has none (its projections stay apart)."""
    return [layer.self_attn for layer in model.model.layers if hasattr(layer, "self_attn")]


def _projections(model):
    return ([[attn.q_proj, attn.k_proj, attn.v_proj] for attn in _attention_layers(model)],
            [[layer.mlp.gate_proj, layer.mlp.up_proj] for layer in model.model.layers])


def _live_adapter(lin) -> bool:
    return getattr(lin, "active", None) in getattr(lin, "lora_A", {}) and not lin.merged
