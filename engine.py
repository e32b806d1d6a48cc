"""engine.py: many prompts decoded together (continuous batching), for dataset inference and the server.

A first reading can skip this file. decode.generate answers one prompt: prefill, then one token
at a time. Engine does the same work for many prompts at once, and that is all it does:

    slots       the KV cache holds `slots` sequences side by side (per-slot, not paged: a slot is
                max_len positions, and a sequence keeps its slot from prefill to its last token);
                how many slots is decided from free GPU memory (plan_slots), so 1,000 prompts
                never run out of memory: the rest wait for a slot
    step()      first the waiting prompts that find a free slot are prefilled, packed one after
                another into one row (no padding; each attends to itself alone), and each picks
                its first token; then every running sequence
                decodes one token in a single batched forward: row b of the batch is slot b, with
                its own position, attending only to its own slot's keys (a mask per row)
    leaving     a sequence that meets one of its stop ids or its max_new_tokens leaves at once,
                and the next prompt's prefill takes its slot in the following step

Each request keeps its own sampling settings, seed, stop ids and adapter (lora.set_row_adapters:
each row through its own adapter, in one batch). Tokens are handed to the request's callback as
they are chosen.

Replaces: decode.generate, one prompt at a time.
Proved equal by: tests/test_engine.py::test_greedy_rows_equal_decoding_each_alone (float32 on the
CPU: token for token, rows of very different lengths, sampled rows too).
"""

import threading
from collections import deque
from dataclasses import dataclass, field

import torch

import decode
import deltanet
import fast_decode
import lora
import model as modeling
from model import ModelError


@dataclass
class Request:
    """One prompt to answer, with its own settings (decode.generate's arguments)."""

    prompt: list[int]
    max_new_tokens: int
    stop_ids: frozenset = frozenset()
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    adapter: str | None = None  # a loaded adapter's name; None: the base model
    on_token: object = None  # on_token(token_id, finished): called as each token is chosen
    tokens: list = field(default_factory=list)  # the answer so far, a stop id included
    done: bool = False
    cancelled: bool = False


class Sequence:
    """A request running in a slot: its cached length and what picking its next token needs."""

    def __init__(self, request: Request, device, vocab_size: int):
        self.request, self.length, self.pending = request, 0, None  # pending: chosen, not yet run
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # for the repetition penalty
        self.seen[torch.tensor(request.prompt, device=device)] = True
        self.generator = None
        if request.temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(request.seed if request.seed is not None else 0)

    def choose(self, logits, greedy_id: int) -> int:
        """The next token from this row's logits (vocab,), as decode.generate chooses it."""
        r = self.request
        if r.temperature == 0 and r.repetition_penalty == 1.0:
            return greedy_id  # the row's argmax, taken for the whole batch at once
        token = decode.next_token(logits, self.seen, r.temperature, r.top_p, r.top_k, r.repetition_penalty,
                                  self.generator)
        return int(token)

    def accept(self, token: int) -> bool:
        """Record the chosen token; whether the sequence is finished (a stop id, or its length)."""
        r = self.request
        r.tokens.append(token)
        if r.repetition_penalty != 1.0:
            self.seen[token] = True
        finished = token in r.stop_ids or len(r.tokens) >= r.max_new_tokens
        self.pending = None if finished else token
        r.done = finished
        if r.on_token is not None:
            r.on_token(token, finished)
        return finished


class SlotCache(modeling.KVCache):
    """Keys and values of `slots` sequences side by side, each up to max_len positions.

    Before each forward the engine says what runs: prefill(slots, lengths) prompts packed one
    after another into one row, each into its own slot from position 0, or decode(positions, span)
    one new token for each of slots 0 .. B-1 at its own position."""

    def __init__(self, config, slots: int, max_len: int, device=None, dtype=torch.float32):
        super().__init__(config, slots, max_len, device=device, dtype=dtype)
        self.device, self.positions, self.span, self.packed = device, None, 0, None
        self.packed_mask = None  # how packed prompts attend: model.block_mask, or speed.VarlenAttention on a GPU
        self.linear = deltanet.state_buffers(config, slots, device, dtype)  # each slot's, for a DeltaNet layer

    def prefill(self, slots: list[int], lengths: list[int]):
        """Prompts of these lengths, packed in this order, into these slots. Where each packed token
        goes (its slot and position) is worked out once for all layers."""
        device, self.positions = self.device, None
        # where each prompt starts, then the end (int32: flash attention's)
        self.cu_seqlens = torch.tensor([0] + lengths, device=device).cumsum(0).int()
        self.packed = (torch.tensor(slots, device=device).repeat_interleave(torch.tensor(lengths, device=device)),
                       torch.cat([torch.arange(n, device=device) for n in lengths]))  # (sum T,) each: slot, position

    def decode(self, positions: torch.Tensor, span: int):
        """positions (B,): where row b's new token goes. span: how many positions of each slot the
        step attends over (at least the furthest row's position + 1: beyond it no row looks)."""
        self.positions, self.span = positions, span

    def attention_inputs(self, input_ids, attention_mask=None, position_ids=None):
        B, T = input_ids.shape
        if self.positions is None:  # prompts packed into one row: each from position 0, attending to itself
            if len(self.cu_seqlens) == 2:
                return self.packed[1][None], None, T > 1  # one prompt: plain causal attention, no mask
            return self.packed[1][None], (self.packed_mask or modeling.block_mask)(self.cu_seqlens, T), False
        keys = torch.arange(self.span, device=input_ids.device)
        mask = (keys[None, :] <= self.positions[:, None])[:, None, None, :]  # (B, 1, 1, span)
        return self.positions[:, None], mask, False

    def linear_state(self, layer: int):
        """A DeltaNet layer's states: none for a prompt (it starts a text), rows 0 .. B-1's to decode."""
        if self.positions is None:
            return None, None
        conv, state = self.linear[layer]
        return conv[:len(self.positions)], state[:len(self.positions)]

    def set_linear_state(self, layer: int, conv, state):
        """Into the prompt's slot (one prompt a prefill: its final state is its own), or rows 0 .. B-1."""
        rows = slice(0, len(self.positions)) if self.positions is not None else self.packed[0][:1]
        self.linear[layer][0][rows], self.linear[layer][1][rows] = conv, state

    def update(self, layer: int, k, v):
        if self.positions is None:  # k, v (1, nkv, sum T, hd): each token into its slot at its position
            slot, position = self.packed
            self.k[layer][slot, :, position], self.v[layer][slot, :, position] = k[0].transpose(0, 1), v[0].transpose(0, 1)
            return k, v  # attention over the packed prompts themselves
        B, span = k.shape[0], self.span
        rows = torch.arange(B, device=k.device)
        self.k[layer][rows, :, self.positions] = k[:, :, 0]  # (B, nkv, hd) each at its row's position
        self.v[layer][rows, :, self.positions] = v[:, :, 0]
        return self.k[layer][:B, :, :span], self.v[layer][:B, :, :span]


def plan_slots(config, max_batch_size: int, max_len: int, device, dtype, memory_fraction: float = 0.8) -> int:
    """How many sequences the cache holds: max_batch_size, or fewer where a GPU's free memory
    (after the weights) cannot hold that many caches of max_len positions."""
    if device.type != "cuda":
        return max_batch_size
    per_slot = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * max_len * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(device)
    slots = min(max_batch_size, int(free * memory_fraction // per_slot))
    if slots < 1:
        raise ModelError(f"one sequence of {max_len} positions needs {per_slot / 2**30:.1f} GiB of KV cache and the GPU "
                         f"has {free / 2**30:.1f} GiB free: lower --max_new_tokens or --max_model_len.")
    return slots


class Engine:
    """Continuous batching over one model: add() requests from any thread, step() until idle."""

    def __init__(self, model, max_batch_size: int = 32, max_len: int | None = None, cuda_graph: bool | None = None,
                 compile: bool = False):
        config, p = model.config, model.lm_head.weight
        self.model, self.device = model, p.device
        self.max_len = min(max_len or config.max_position_embeddings, config.max_position_embeddings)
        slots = plan_slots(config, max_batch_size, self.max_len, p.device, p.dtype)
        self.cache = SlotCache(config, slots, self.max_len, device=p.device, dtype=p.dtype)
        self.running: list[Sequence | None] = [None] * slots  # slot -> its sequence
        self.waiting: deque[Request] = deque()
        self.lock = threading.Lock()
        layers = [m for m in model.modules() if isinstance(m, lora.LoRALinear)]
        self.merged = lora.active_adapter(model) if any(m.merged for m in layers) else None  # --merge_lora
        self.adapters = bool(lora.adapter_names(model)) and self.merged is None
        if self.adapters:  # every loaded adapter stacked once; each forward then only says which row takes which
            lora.set_row_adapters(model, [None], p.dtype)
        self.forward = self.eager_forward  # on a GPU, CUDA graphs of it (fast_decode.plan_batch_decoding)
        # Prompts packed into one prefill attend through a (T, T) block mask, so a few at a time; on
        # a GPU through varlen attention, no mask, and thousands (fast_decode.plan_batch_decoding)
        # A Qwen3.5 DeltaNet layer carries one recurrent state through a forward: one prompt a prefill
        self.prefill_tokens = 0 if "linear_attention" in config.mixers else 512
        fast_decode.plan_batch_decoding(self, cuda_graph, compile)

    @property
    def slots(self) -> int:
        return len(self.running)

    def add(self, request: Request) -> Request:
        """Queue a request; its tokens arrive through request.on_token and request.tokens."""
        if len(request.prompt) + 1 > self.max_len:
            raise ModelError(f"the prompt is {len(request.prompt)} tokens and a sequence holds {self.max_len}: "
                             "no room for an answer. Shorten it.")
        if self.merged is not None and request.adapter not in (None, self.merged):
            raise ModelError(f"adapter {request.adapter!r} cannot answer: adapter {self.merged!r} is merged into the "
                             "weights, so every answer comes from it. Load the adapters unmerged to mix them.")
        request.max_new_tokens = min(request.max_new_tokens, self.max_len - len(request.prompt))
        with self.lock:
            self.waiting.append(request)
        return request

    def idle(self) -> bool:
        return not self.waiting and all(s is None for s in self.running)

    @torch.no_grad()
    def step(self):
        """Admit waiting prompts into free slots (prefill, first token), then decode one token for
        every running sequence. Cancelled requests leave first."""
        for slot, seq in enumerate(self.running):
            if seq is not None and seq.request.cancelled:
                self.running[slot] = None
        self.admit()
        rows = [slot for slot, seq in enumerate(self.running) if seq is not None and seq.pending is not None]
        if rows:
            self.decode_step(rows[-1] + 1)

    def admit(self):
        """Waiting prompts into the free slots, prefilled together: those of one adapter, up to
        prefill_tokens prompt tokens in one forward (a longer prompt alone)."""
        admitted = []
        for slot in [slot for slot, seq in enumerate(self.running) if seq is None]:
            request = self.next_waiting()
            if request is None:
                break
            admitted.append((slot, request))
        for adapter in dict.fromkeys(r.adapter for _, r in admitted):  # a packed row goes through one adapter
            group, tokens = [], 0
            for slot, request in [(s, r) for s, r in admitted if r.adapter == adapter]:
                if group and tokens + len(request.prompt) > self.prefill_tokens:
                    self.prefill(group)
                    group, tokens = [], 0
                group.append((slot, request))
                tokens += len(request.prompt)
            self.prefill(group)

    def next_waiting(self) -> Request | None:
        """The oldest waiting request not cancelled meanwhile, or None."""
        with self.lock:
            while self.waiting:
                request = self.waiting.popleft()
                if not request.cancelled:
                    return request
        return None

    def prefill(self, group: list[tuple[int, Request]]):
        """Each (slot, request)'s prompt into its slot, all in one forward, packed one after another
        into one row (each attends only to itself); each picks its first token from its last position."""
        requests = [request for _, request in group]
        lengths = [len(r.prompt) for r in requests]
        seqs = [Sequence(r, self.device, self.model.config.vocab_size) for r in requests]
        self.use_adapters([requests[0].adapter])  # one adapter for the packed row (admit groups them so)
        self.cache.prefill([slot for slot, _ in group], lengths)
        ids = torch.tensor([[t for r in requests for t in r.prompt]], device=self.device)  # (1, sum T)
        h = self.model.model(ids, cache=self.cache)  # (1, sum T, hidden)
        logits = self.model.lm_head(h[0, self.cache.cu_seqlens[1:] - 1])  # (prompts, vocab): each one's last position
        greedy = logits.float().argmax(-1).tolist()
        for i, ((slot, _), seq) in enumerate(zip(group, seqs)):
            seq.length = lengths[i]
            if not seq.accept(seq.choose(logits[i], greedy[i])):
                self.running[slot] = seq

    def decode_step(self, B: int):
        """One token for each running sequence in slots 0 .. B-1 (a free slot among them runs a
        harmless dummy row: its cache is rewritten by the next prefill into it)."""
        seqs = self.running[:B]
        live = [s is not None and s.pending is not None for s in seqs]
        tokens = torch.tensor([[s.pending if ok else 0] for s, ok in zip(seqs, live)], device=self.device)  # (B, 1)
        lengths = [s.length if ok else 0 for s, ok in zip(seqs, live)]
        positions = torch.tensor(lengths, device=self.device)  # (B,)
        adapters = lora.row_index(self.model, [s.request.adapter if ok else None for s, ok in zip(seqs, live)])
        adapters = adapters.to(self.device) if self.adapters else None
        logits = self.forward(tokens, positions, adapters, max(lengths) + 1)  # (B, vocab)
        greedy = logits.float().argmax(-1).tolist()
        for slot, (seq, ok) in enumerate(zip(seqs, live)):
            if ok:
                seq.length += 1
                if seq.accept(seq.choose(logits[slot], greedy[slot])):
                    self.running[slot] = None

    def eager_forward(self, tokens, positions, adapters, span: int):
        """Logits (B, vocab) of one new token (B, 1) for each row, at its own position (B,), through
        its own adapter (B,) (lora.row_index; None: no adapter is loaded), attending over the first
        `span` positions of each slot."""
        self.set_rows(positions, adapters, span)
        return self.logits(tokens)

    def set_rows(self, positions, adapters, span: int):
        """What a decode step's rows are: their positions, adapters and span (eager_forward's first half)."""
        if adapters is not None:
            lora.use_row_index(self.model, adapters)
        self.cache.decode(positions, span)

    def logits(self, tokens):
        """The model on the rows set_rows described (eager_forward's second half): (B, 1) -> (B, vocab)."""
        h = self.model.model(tokens, cache=self.cache)  # (B, 1, hidden)
        return self.model.lm_head(h[:, -1])

    def warm_up(self):
        """On a GPU, record the decode steps' CUDA graphs of every batch size now, not as the first
        requests arrive (fast_decode.CUDAGraphBatchDecoding.record_buckets; eager decoding: nothing to do)."""
        if hasattr(self.forward, "record_buckets"):
            self.forward.record_buckets()

    def use_adapters(self, names: list[str | None]):
        """Each row through its own adapter (none loaded: nothing to do)."""
        if self.adapters:
            lora.use_row_index(self.model, lora.row_index(self.model, names).to(self.device))

    def close(self):
        """Give the model back as it was: one active adapter for every row."""
        if self.adapters:
            lora.set_row_adapters(self.model, None)

    def run(self, requests) -> list[Request]:
        """Answer every request, as many at once as there are slots; the requests, answered."""
        requests = [self.add(r) for r in requests]
        while not self.idle():
            self.step()
        return requests
