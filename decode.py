"""decode.py: decoding, the autoregressive loop in its plainest form (as in gpt-fast):

    prefill:    run the whole prompt once, filling the KV cache; logits of its last position
    decode_one: run only the token just chosen, attending to the cache; logits of the next one

(Decoder holds the cache and the two steps; on a GPU decode_one is replayed as one CUDA graph,
fast_decode.CUDAGraphDecoder, the same step) and between the two, pick a token from the logits: the most
likely one (temperature 0, greedy), or a sample after transformers' repetition penalty,
temperature, top-k and top-p, in that order (next_token). `generate` loops over them; train.py
answers its --eval_prompts with it, and infer.py, the chat program, its questions.
"""

import torch

import model as modeling
from model import ModelError

# ----------------------------------------------------------------------------------------------
# A KV cache and the two steps over it


class Decoder:
    """A KV cache of `max_len` positions (batch 1) and the two steps of decoding over it:

        prefill:    run the prompt once, filling the cache; logits of its last position
        decode_one: run only the token just chosen, attending to the cache; logits of the next one

    fast_decode.CUDAGraphDecoder is this class with decode_one replayed as one CUDA graph."""

    # Recurrent (DeltaNet) states kept at earlier positions, for a conversation to go back to: a few
    # turns' worth (each is 50 MB for Qwen3.5-9B: 24 layers x 32 heads x a 128 x 128 float32 memory).
    SNAPSHOTS = 4

    def __init__(self, model: modeling.QwenForCausalLM, max_len: int):
        self.model, self.max_len = model, max_len
        self.cache = model.new_cache(1, max_len)
        self.snapshots = {}  # position -> the DeltaNet layers' (conv, recurrent) states after that many tokens

    def resume_point(self, keep: int) -> int:
        """Where a prefill can start when the cache holds the prompt's first `keep` tokens: `keep` for
        keys and values, which are written by position. A DeltaNet layer's recurrent state holds the
        whole text so far and cannot be rewound; a chat's next prompt usually goes on from where it
        stands (the last answer), else (an answer whose reasoning the template drops, a turn stopped
        with Ctrl-C) from the last snapshot at or before `keep`, the end of an earlier prompt or
        answer, which the prefill puts back; with none, from position 0."""
        cache = self.cache
        if not any(s is not None for s in cache.linear) or keep == cache.linear_length:
            return keep
        start = max([p for p in self.snapshots if p <= keep], default=0)
        if start:
            self.put_back(start)
        self.snapshots = {p: s for p, s in self.snapshots.items() if p <= start}
        return start

    def snapshot(self, position: int):
        """Keep the DeltaNet states as they stand after `position` tokens (the last few such)."""
        if any(s is not None for s in self.cache.linear):
            self.snapshots[position] = self.states()
            self.snapshots = dict(sorted(self.snapshots.items())[-self.SNAPSHOTS:])

    def states(self) -> list:
        """The DeltaNet states as they stand, to keep. The layers replace their states and never write
        into them (deltanet.GatedDeltaNet.mix), so these are the tensors themselves, not copies
        (fast_decode.CUDAGraphDecoder, whose states stay in fixed buffers written in place, keeps copies)."""
        return list(self.cache.linear)

    def put_back(self, position: int):
        """Make the cache's DeltaNet states the ones kept after `position` tokens."""
        self.cache.linear, self.cache.linear_length = list(self.snapshots[position]), position

    def prefill(self, input_ids, start: int = 0):
        """Run the prompt (1, T) from position `start` (the cache holds the positions before it;
        resume_point says which it can be); logits of its last position (vocab,)."""
        end = start + input_ids.shape[1]
        if start:
            self.snapshot(start)  # the end of the last answer, before the prompt goes on from it
        self.cache.length = start
        position_ids = torch.arange(start, end, device=input_ids.device)[None]  # (1, T)
        h = self.model.model(input_ids, position_ids=position_ids, cache=self.cache)  # (1, T, hidden)
        self.snapshot(end)  # the end of the prompt
        # Only the last position's logits are needed: skip lm_head on the others, a (T, vocab) matmul.
        return self.model.lm_head(h[0, -1])

    def decode_one(self, token, position: int):
        """Run one token (a 0-d tensor) at `position`, right after the cached ones; logits of the
        token after it (vocab,)."""
        position_ids = torch.tensor([[position]], device=token.device)  # (1, 1)
        h = self.model.model(token.view(1, 1), position_ids=position_ids, cache=self.cache)  # (1, 1, hidden)
        return self.model.lm_head(h[0, -1])

# ----------------------------------------------------------------------------------------------
# Choosing tokens, and the loop


def apply_repetition_penalty(logits, seen, penalty: float):
    """transformers' rule: a token already in the text has its logit divided by the penalty if
    positive, multiplied if negative, so it becomes less likely either way. seen: (vocab,) bool."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator):
    """Choose the next token (a 0-d tensor) from one position's logits (vocab,)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, repetition_penalty)
    if temperature == 0:
        return logits.argmax()
    probs = sampling_probs(logits, temperature, top_p, top_k)
    return torch.multinomial(probs, 1, generator=generator)[0]


def sampling_probs(logits, temperature, top_p, top_k):
    """Probabilities to sample from: logits (vocab,) / temperature, cut to top-k, then to top-p."""
    logits = logits / temperature
    if top_k > 0:  # keep the k most likely tokens
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # keep the most likely tokens whose probabilities add up to top_p
        sorted_logits, order = torch.sort(logits)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return logits.softmax(-1)


@torch.no_grad()
def generate(model, input_ids: list[int], max_new_tokens: int, stop_ids: set[int], temperature=0.0,
             top_p=1.0, top_k=0, repetition_penalty=1.0, generator=None, decoder=None,
             cached: list[int] | None = None):
    """Yield new token ids one at a time; a stop id is yielded too, as the last one.

    At most max_new_tokens, and never past the model's context (max_position_embeddings).
    decoder: a Decoder (or fast_decode.CUDAGraphDecoder) whose cache holds prompt and answer, to
    reuse between calls; by default a new one is made. cached: the token ids whose keys and values
    that decoder's cache already holds, from earlier calls (a chat's earlier turns). The prompt's
    common beginning with them is not run again; the list is kept up to date in place, also when
    the caller stops early."""
    context = model.config.max_position_embeddings
    if len(input_ids) >= context:
        raise ModelError(f"the prompt is {len(input_ids)} tokens, but the model's context holds "
                         f"{context} (max_position_embeddings), leaving no room for an answer. Shorten it.")
    max_new_tokens = min(max_new_tokens, context - len(input_ids))
    if decoder is None:
        decoder = Decoder(model, len(input_ids) + max_new_tokens)
        if cached is not None:
            cached.clear()  # a new cache holds nothing
    max_new_tokens = min(max_new_tokens, decoder.max_len - len(input_ids))
    keep = reusable_prefix(cached, input_ids)
    if cached is not None:
        keep = decoder.resume_point(keep)  # a recurrent state goes back only to a snapshot
        del cached[keep:]
    device = model.lm_head.weight.device
    prompt = torch.tensor([input_ids], device=device)  # (1, T)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    seen[prompt[0]] = True
    penalised = repetition_penalty != 1.0

    logits = decoder.prefill(prompt[:, keep:], keep)
    if cached is not None:
        cached.extend(input_ids[keep:])
    for i in range(max_new_tokens):
        token = next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator)
        token_id = int(token)
        if penalised:
            seen[token_id] = True
        yield token_id
        if token_id in stop_ids or i == max_new_tokens - 1:
            return  # the last token was never run through the model: the cache does not hold it
        logits = decoder.decode_one(token, len(input_ids) + i)
        if cached is not None:
            cached.append(token_id)


def reusable_prefix(cached: list[int] | None, input_ids: list[int]) -> int:
    """How many positions of the cache can stay: the longest common beginning of the cached tokens
    and the prompt, less its last token (prefill must run at least one, for the next token's
    logits). `cached` is cut to them: from here on it lists exactly the positions the cache holds."""
    if cached is None:
        return 0
    keep = 0
    while keep < min(len(cached), len(input_ids) - 1) and cached[keep] == input_ids[keep]:
        keep += 1
    del cached[keep:]
    return keep
