"""infer.py: chat with a Qwen2.5 model and its LoRA adapters: a streaming REPL, one-shot, or piped.

    python infer.py --model Qwen2.5-7B-Instruct --stream true --temperature 0 --max_new_tokens 2048
    python infer.py --adapters output/vN-.../checkpoint-N --stream true --temperature 0 --max_new_tokens 2048

takes the flags of ms-swift's `swift infer`. With --adapters alone, the base model and the system
prompt the adapter was trained with come from the checkpoint's args.json (ours or ms-swift's) or
adapter_config.json; --model and --system override them.

Decoding is the autoregressive loop in its plainest form (as in gpt-fast):

    prefill:    run the whole prompt once, filling the KV cache; logits of its last position
    decode_one: run only the token just chosen, attending to the cache; logits of the next one

and between the two, pick a token from the logits: the most likely one (temperature 0, greedy),
or a sample after transformers' repetition penalty, temperature, top-k and top-p, in that order.

Where ms-swift's behaviour is not obvious, this file chooses:
- A sampling flag that is not given takes its value from the model's generation_config.json, as
  ms-swift does (Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05;
  the penalty applies to greedy decoding too). --temperature 0 is greedy.
- --max_new_tokens not given: answer until a stop token or until the context is full.
- Piped stdin (not a terminal): every non-empty line is a separate one-turn conversation; only the
  answers go to stdout, one per prompt, each ended by a newline. Everything else goes to stderr.
- In the REPL, Ctrl-C stops the answer and drops that turn (question and partial answer) from the
  history. The system prompt follows the active adapter (the one it was trained with) unless
  --system or /system set one; /system and /adapter keep the history.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

import data
import lora
import model as modeling
from data import DataError
from lora import LoraError
from model import ModelError, str2bool


class UsageError(Exception):
    """A flag value that cannot work, found before anything is loaded."""


# ----------------------------------------------------------------------------------------------
# Decoding


def prefill(model, input_ids, cache, start: int = 0):
    """Run the prompt (1, T) through the model, filling the cache from position `start` (the cache
    already holds the positions before it); logits of its last position (vocab,)."""
    position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]  # (1, T)
    h = model.model(input_ids, position_ids=position_ids, cache=cache)  # (1, T, hidden)
    # Only the last position's logits are needed: skip lm_head on the others, a (T, vocab) matmul.
    return model.lm_head(h[0, -1])


def decode_one(model, token, cache):
    """Run one new token (a 0-d tensor) after the cached ones; logits of the token after it (vocab,)."""
    h = model.model(token.view(1, 1), cache=cache)  # (1, 1, hidden)
    return model.lm_head(h[0, -1])


class CUDAGraphDecoder:
    """decode_one replayed as a single CUDA graph: the ~600 kernel launches of one token become one.

    A graph replays fixed work on fixed memory, so the cache is a StaticKVCache of `max_len`
    positions and the token and its position live in fixed buffers that are filled before each
    replay. The graph holds whatever adapter was active at capture: make a new one after
    switching. The eager prefill/decode_one above stay the reference (and the CPU path)."""

    def __init__(self, model, max_len: int, compile: bool = False):
        p = model.lm_head.weight
        self.model, self.max_len = model, max_len
        # torch.compile fuses the many small element-wise kernels (norms, RoPE, SiLU, LoRA's
        # casts) before capture: fewer kernels per replay.
        self.step_fn = torch.compile(self._step, dynamic=False) if compile else self._step
        self.cache = modeling.StaticKVCache(model.config, 1, max_len, device=p.device, dtype=p.dtype)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        self.position = torch.zeros(1, 1, dtype=torch.long, device=p.device)
        stream = torch.cuda.Stream()  # warm up outside the default stream, as capture requires
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.step_fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            self.logits = self.step_fn()

    def _step(self):
        h = self.model.model(self.token, position_ids=self.position, cache=self.cache)  # (1, 1, hidden)
        return self.model.lm_head(h[0, -1])

    def decode_one(self, token, position: int):
        self.token.copy_(token.view(1, 1))
        self.position.fill_(position)
        self.graph.replay()
        return self.logits


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
             top_p=1.0, top_k=0, repetition_penalty=1.0, generator=None, cache=None, graph=None,
             cached: list[int] | None = None):
    """Yield new token ids one at a time; a stop id is yielded too, as the last one.

    At most max_new_tokens, and never past the model's context (max_position_embeddings).
    cache: a KVCache with room for the prompt and the answer, to reuse (bench.py allocates one
    up front); it is overwritten from position 0, or from the end of `cached`. By default a new
    one is made.
    graph: a CUDAGraphDecoder to decode with instead (its own cache must hold prompt + answer).
    cached: the token ids whose keys and values that cache already holds, from earlier calls (a
    chat's earlier turns). The prompt's common beginning with them is not run again; the list is
    kept up to date in place, also when the caller stops early."""
    context = model.config.max_position_embeddings
    if len(input_ids) >= context:
        raise ModelError(f"the prompt is {len(input_ids)} tokens, but the model's context holds "
                         f"{context} (max_position_embeddings), leaving no room for an answer. Shorten it.")
    max_new_tokens = min(max_new_tokens, context - len(input_ids))
    if graph is not None:
        max_new_tokens = min(max_new_tokens, graph.max_len - len(input_ids))
    elif cache is None:
        cache = model.new_cache(1, len(input_ids) + max_new_tokens)
        if cached is not None:
            cached.clear()  # a new cache holds nothing
    # Positions the cache holds already: the longest common beginning of the cached tokens and the
    # prompt, less its last token (prefill must run at least one, for the next token's logits).
    keep = 0
    if cached is not None:
        while keep < min(len(cached), len(input_ids) - 1) and cached[keep] == input_ids[keep]:
            keep += 1
        del cached[keep:]  # from here on, `cached` lists exactly the positions the cache holds
    if cache is not None:
        cache.length = keep
    device = model.lm_head.weight.device
    prompt = torch.tensor([input_ids], device=device)  # (1, T)
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)  # for the penalty
    seen[prompt[0]] = True

    logits = prefill(model, prompt[:, keep:], graph.cache if graph is not None else cache, keep)  # eager either way
    if cached is not None:
        cached.extend(input_ids[keep:])
    for i in range(max_new_tokens):
        token = next_token(logits, seen, temperature, top_p, top_k, repetition_penalty, generator)
        seen[token] = True
        token_id = int(token)
        yield token_id
        if token_id in stop_ids or i == max_new_tokens - 1:
            return  # the last token was never run through the model: the cache does not hold it
        if graph is not None:
            logits = graph.decode_one(token, len(input_ids) + i)
        else:
            logits = decode_one(model, token, cache)
        if cached is not None:
            cached.append(token_id)


# ----------------------------------------------------------------------------------------------
# A loaded model, its adapters and decoding settings: answers one conversation at a time


def note(*msg):
    """Everything that is not an answer goes to stderr, so stdout can be piped."""
    print(*msg, file=sys.stderr, flush=True)


@dataclass
class Chat:
    """What the REPL, --prompt and piped use share: the model, its adapters and how to decode."""

    model: torch.nn.Module
    tok: data.Tokenizer
    stop_ids: set[int]
    sampling: dict  # temperature, top_p, top_k, repetition_penalty: generate()'s keywords
    max_new_tokens: int | None  # None: until the context is full
    generator: torch.Generator
    adapter_systems: dict  # adapter name -> the system prompt it was trained with (None: Qwen's default)
    adapter: str | None = None  # the active adapter; None is the plain base model
    merged: bool = False  # the active adapter was merged into the weights (--merge_lora true)
    system: str | None = None  # from --system or /system; overrides the adapter's
    stream: bool = True
    show_prompt: bool = False
    cuda_graph: bool = False  # decode each token as one CUDA graph replay (GPU only)
    compile_graph: bool = False  # torch.compile the step before capturing it
    # Kept between answers, so that a conversation's earlier turns are not run again:
    cache: "modeling.KVCache | None" = None  # eager decoding's cache...
    graph: "CUDAGraphDecoder | None" = None  # ...or the CUDA graph decoder's, for `kv_key`
    kv_key: tuple | None = None  # (adapter, positions) they were made for
    cached_ids: list = field(default_factory=list)  # the tokens whose keys and values they hold

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def current_system(self) -> str | None:
        return self.system if self.system is not None else self.adapter_systems.get(self.adapter)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids, _ = data.encode_chat(self.tok, messages, add_generation_prompt=True, system=self.current_system())
        return ids

    def use_adapter(self, name: str | None):
        """Switch to a loaded adapter, or to the base (None); nothing is reloaded."""
        if self.merged:
            raise LoraError(f"adapter {self.adapter!r} was merged into the weights (--merge_lora true), so there is "
                            "nothing to switch; run without --merge_lora to switch between adapters.")
        if name is not None and name not in self.adapter_systems:
            loaded = ", ".join(self.adapter_systems) or "none"
            raise LoraError(f"no adapter named {name!r} (loaded: {loaded}; 'base' is the model without adapter).")
        lora.set_active_adapter(self.model, name)
        self.adapter = name

    def decoder_for(self, length: int):
        """(cache, graph) for the active adapter with room for `length` positions: the KV cache of
        eager decoding, or the CUDA graph decoder (with its own cache). Made again, and its cached
        tokens forgotten, only when the adapter changes (the same tokens have other keys and values)
        or the size changes. Sizes go in steps of 2048 positions (a CUDA graph attends over its
        whole cache, so it should not be much longer than needed)."""
        key = (self.adapter, min(self.context, -(-length // 2048) * 2048))
        if key != self.kv_key:
            self.cache = self.graph = None  # free the old one first
            self.cached_ids = []
            if self.cuda_graph:
                self.graph = CUDAGraphDecoder(self.model, key[1], compile=self.compile_graph)
            else:
                self.cache = self.model.new_cache(1, key[1])
            self.kv_key = key
        return self.cache, self.graph

    def answer(self, ids: list[int], out) -> str:
        """Generate the answer to the prompt `ids`, printing it to `out`; return its text."""
        if self.show_prompt:
            note(self.tok.decode(ids))
        room = self.context - len(ids)
        limit = room if self.max_new_tokens is None else min(self.max_new_tokens, room)
        decoder = data.StreamDecoder(self.tok)  # prints only whole UTF-8 characters
        pieces, n, token = [], 0, None
        cache, graph = self.decoder_for(len(ids) + limit)
        for token in generate(self.model, ids, limit, self.stop_ids, generator=self.generator, cache=cache,
                              graph=graph, cached=self.cached_ids, **self.sampling):
            n += 1
            pieces.append(decoder.push(token))
            if self.stream and pieces[-1]:
                print(pieces[-1], end="", file=out, flush=True)
        pieces.append(decoder.flush())
        text = "".join(pieces)
        print(pieces[-1] if self.stream else text, file=out, flush=True)
        if n == room and token not in self.stop_ids:
            note(f"(the answer was cut off at the model's context of {self.context} tokens)")
        return text


# ----------------------------------------------------------------------------------------------
# The REPL, one-shot and piped use

HELP = ("commands: clear (forget the conversation), /system TEXT (set the system prompt; /system alone shows it), "
        "/adapter NAME or /adapter base (switch), /adapters (list), exit or quit. "
        "Ctrl-C stops an answer, Ctrl-D exits.")


def run_command(chat: Chat, line: str):
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd == "/system":
        if arg:
            chat.system = arg
        note(f"system prompt: {chat.current_system() or data.DEFAULT_SYSTEM}")
    elif cmd == "/adapter" and arg:
        chat.use_adapter(None if arg == "base" else arg)
        note(f"now answering with {'the base model' if chat.adapter is None else 'adapter ' + arg}")
    elif cmd == "/adapters":
        names = ["base"] + list(chat.adapter_systems)
        active = "base" if chat.adapter is None else chat.adapter
        note("adapters: " + ", ".join(f"{n} (active)" if n == active else n for n in names)
             + (" [merged]" if chat.merged else ""))
    else:
        note(HELP)


def repl(chat: Chat):
    """A plain input() loop: type a question, read the answer, repeat; the conversation is kept."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    note(HELP)
    history = []
    while True:
        try:
            line = input("<<< ").strip()
        except EOFError:  # Ctrl-D
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, as in a shell
            print()
            continue
        if not line:
            continue
        if line in ("exit", "quit"):
            return
        if line == "clear":
            history = []
            note("(conversation cleared)")
            continue
        if line.startswith("/"):
            try:
                run_command(chat, line)
            except LoraError as e:
                note(f"error: {e}")
            continue
        messages = history + [{"role": "user", "content": line}]
        ids = chat.prompt_ids(messages)
        if len(ids) >= chat.context:
            note(f"the conversation is now {len(ids)} tokens and the model's context holds {chat.context}: "
                 "no room for an answer. Type clear to start a new conversation.")
            continue
        try:
            reply = chat.answer(ids, sys.stdout)
        except KeyboardInterrupt:
            print(flush=True)
            note("(stopped; this question and the partial answer are left out of the conversation)")
            continue
        history = messages + [{"role": "assistant", "content": reply}]


def answer_lines(chat: Chat, lines) -> int:
    """Piped use: each non-empty line is its own one-turn conversation. Returns the exit code."""
    code = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        ids = chat.prompt_ids([{"role": "user", "content": line}])
        if len(ids) >= chat.context:
            note(f"error: a prompt of {len(ids)} tokens does not fit the model's context of {chat.context}; skipped it.")
            code = 1
            continue
        chat.answer(ids, sys.stdout)
    return code


# ----------------------------------------------------------------------------------------------
# Flags and loading


class ArgumentParser(modeling.FlagParser):
    def error(self, message):  # reported by main like every other error here
        raise UsageError(self.explain(message))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Chat with a Qwen2 / Qwen2.5 model and its LoRA adapters (flags as in `swift infer`).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="base model: local folder, hub id (Qwen/Qwen2.5-7B-Instruct) or 'tiny' (built-in demo model); default: the one the adapter was trained on")
    g.add_argument("--adapters", nargs="+", default=[], metavar="[NAME=]PATH", help="LoRA checkpoint folder(s), loaded once onto the base; NAME=PATH names one for /adapter (default name: the folder's name). The first is active")
    g.add_argument("--model_type", default=None, help="ignored: accepted so ms-swift command lines work; only Qwen2 / Qwen2.5 exist here and config.json says which")
    g.add_argument("--merge_lora", type=str2bool, default=False, help="add the (single) adapter into the weights at load: plain-model speed, no switching (default: false)")
    g.add_argument("--torch_dtype", default=None, help="bfloat16 | float16 | float32 (default: bfloat16 on GPU, float32 on CPU)")
    g.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    g.add_argument("--cuda_graph", type=str2bool, default=None, help="GPU only: decode each token as one CUDA graph replay, several times faster at batch 1; its cache holds prompt + --max_new_tokens rounded up to 2048 (default: true on a GPU)")
    g.add_argument("--torch_compile", type=str2bool, default=False, help="with --cuda_graph: fuse the step's small kernels with torch.compile first (a minute to compile; default: false)")

    g = p.add_argument_group("decoding (a flag not given takes the model's generation_config.json value, as in ms-swift)")
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy: always the most likely token")
    g.add_argument("--top_p", type=float, default=None, help="sample only from the most likely tokens whose probabilities add up to this")
    g.add_argument("--top_k", type=int, default=None, help="sample only from the k most likely tokens (0 = all)")
    g.add_argument("--repetition_penalty", type=float, default=None, help="> 1 makes tokens already in the text less likely (1 = off)")
    g.add_argument("--max_new_tokens", type=int, default=None, help="longest answer in tokens (default: until the context is full)")
    g.add_argument("--seed", type=int, default=42, help="seed for sampling (default: 42)")

    g = p.add_argument_group("conversation")
    g.add_argument("--system", default=None, help="system prompt (default: the adapter's training system prompt, else Qwen's own)")
    g.add_argument("--stream", type=str2bool, default=True, help="print the answer as it is generated (default: true)")
    g.add_argument("--prompt", default=None, help="answer this one question and exit")
    g.add_argument("--show_prompt", type=str2bool, default=False, help="print the full rendered prompt (system prompt and history included) to stderr before each answer (default: false)")
    return p


def parse_adapters(specs: list[str]) -> list[tuple[str, str]]:
    """[NAME=]PATH strings -> (name, path) pairs; an unnamed adapter is named after its folder."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).exists():  # a path that itself holds '='
            name, path = Path(spec.rstrip("/\\")).name, spec
        if not name or not path:
            raise UsageError(f"--adapters {spec!r}: write PATH or NAME=PATH.")
        pairs.append((name, path))
    names = [n for n, _ in pairs]
    for n in names:
        if n == "base" or names.count(n) > 1:
            why = "'base' means the model without adapter" if n == "base" else "two adapters have this name"
            raise UsageError(f"--adapters: the name {n!r} cannot be used ({why}); give each one a name with NAME=PATH.")
    return pairs


def sampling_settings(args, gen_config: dict) -> dict:
    """ms-swift's rule: a flag that is not given takes the model's generation_config.json value."""
    def pick(flag, neutral):
        given = getattr(args, flag)
        if given is not None:
            return given
        return neutral if gen_config.get(flag) is None else gen_config[flag]

    s = {"temperature": pick("temperature", 1.0), "top_p": pick("top_p", 1.0), "top_k": pick("top_k", 0),
         "repetition_penalty": pick("repetition_penalty", 1.0)}
    if args.temperature is None and not gen_config.get("do_sample", False):
        s["temperature"] = 0.0  # a model that does not ask for sampling decodes greedily
    return s


def check_flags(args):
    if args.temperature is not None and args.temperature < 0:
        raise UsageError(f"--temperature {args.temperature}: must be 0 (greedy) or more.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top_p {args.top_p}: must be in (0, 1].")
    if args.top_k is not None and args.top_k < 0:
        raise UsageError(f"--top_k {args.top_k}: must be 0 (off) or more.")
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        raise UsageError(f"--repetition_penalty {args.repetition_penalty}: must be more than 0 (1 = off).")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max_new_tokens {args.max_new_tokens}: must be 1 or more.")
    if args.merge_lora and len(args.adapters) != 1:
        raise UsageError(f"--merge_lora true needs exactly one adapter in --adapters (got {len(args.adapters)}).")
    if args.torch_compile and args.cuda_graph is False:
        raise UsageError("--torch_compile true compiles the CUDA graph step: it cannot go with --cuda_graph false.")
    if not args.model and not args.adapters:
        raise UsageError("give --model (a base model) or --adapters (a checkpoint folder, whose args.json names its base).")


def pick_device(name: str | None) -> torch.device:
    name = name or modeling.default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device: use cuda, cuda:N or cpu.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (torch.cuda.is_available() is False); use --device cpu.")
    return device


def use_cuda_graph(flag: bool | None, device: torch.device) -> bool:
    """--cuda_graph: given, or else on whenever decoding runs on a GPU (eager decoding there is
    launch-bound: 17 tok/s on the 7B shape with an adapter, against 79 replayed as graphs, BENCHMARKS.md)."""
    return device.type == "cuda" if flag is None else flag


def load_chat(args) -> Chat:
    check_flags(args)
    device = pick_device(args.device)
    if device.type != "cuda" and (args.cuda_graph or args.torch_compile):
        flag = "--cuda_graph true" if args.cuda_graph else "--torch_compile true (which compiles the CUDA graph step)"
        raise UsageError(f"{flag} needs a GPU (--device cuda); on the CPU decoding runs eagerly.")
    dtype = modeling.parse_dtype(args.torch_dtype) if args.torch_dtype else modeling.default_dtype(device)
    adapters = parse_adapters(args.adapters)
    # Read every adapter folder before the (slow) base model, so a wrong path fails in a second.
    for _, path in adapters:
        lora.read_adapter(path)
    ckpt_args = [lora.checkpoint_args(path) for _, path in adapters]
    model_name = args.model or ckpt_args[0]["model"]
    if model_name is None:
        raise UsageError(f"{adapters[0][1]} does not say which base model it was trained on (no \"model\" in "
                         "args.json, no base_model_name_or_path in adapter_config.json); pass --model.")

    note(f"loading {model_name} ({str(dtype).removeprefix('torch.')} on {device})"
         + ("" if args.model else f", the base model named in {adapters[0][1]}"))
    try:
        model, model_dir = modeling.load_model(model_name, dtype, device)
    except ModelError as e:
        if args.model:
            raise
        raise ModelError(f"{e} (The base model comes from {adapters[0][1]}'s args.json or adapter_config.json; "
                         "pass --model to load it from elsewhere.)") from None
    tok = data.Tokenizer(model_dir)
    gen_config = modeling.load_generation_config(model_dir)

    systems = {}
    for (name, path), ck in zip(adapters, ckpt_args):
        lora.load_adapter(model, path, name, base_model_name_or_path=model_name)
        systems[name] = ck["system"]
        note(f"adapter {name}: {path}" + (f" (trained with system prompt {ck['system']!r})" if ck["system"] else ""))
    active = adapters[0][0] if adapters else None
    lora.set_active_adapter(model, active)
    if args.merge_lora:
        lora.merge_lora(model)
        note(f"adapter {active} merged into the weights")
    if args.merge_lora or not adapters:  # plain weights from here on: decode with fused projections
        modeling.fuse_projections(model)

    eos = gen_config.get("eos_token_id", model.config.eos_token_id)
    stop_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos]) | {tok.im_end_id}
    sampling = sampling_settings(args, gen_config)
    note("decoding: " + ("greedy" if sampling["temperature"] == 0 else
                         f"temperature {sampling['temperature']}, top_p {sampling['top_p']}, top_k {sampling['top_k']}")
         + f", repetition_penalty {sampling['repetition_penalty']}, seed {args.seed}, max_new_tokens "
         + (str(args.max_new_tokens) if args.max_new_tokens else "until the context is full"))
    return Chat(model=model, tok=tok, stop_ids=stop_ids, sampling=sampling, max_new_tokens=args.max_new_tokens,
                generator=torch.Generator(device=device).manual_seed(args.seed), adapter_systems=systems,
                adapter=active, merged=args.merge_lora, system=args.system, stream=args.stream,
                show_prompt=args.show_prompt, cuda_graph=use_cuda_graph(args.cuda_graph, device), compile_graph=args.torch_compile)


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        chat = load_chat(args)
        if args.prompt is not None:
            chat.answer(chat.prompt_ids([{"role": "user", "content": args.prompt}]), sys.stdout)
            return 0
        if not sys.stdin.isatty():
            return answer_lines(chat, sys.stdin)
        repl(chat)
        return 0
    except (UsageError, ModelError, DataError, LoraError) as e:
        note(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        note()
        return 130


if __name__ == "__main__":
    sys.exit(main())
