"""infer.py: chat with a Qwen2.5 or Qwen3 model and its LoRA adapters: a streaming REPL, one-shot, or piped.

    python infer.py --model Qwen/Qwen3-4B-Instruct-2507 --stream true --temperature 0 --max_new_tokens 2048
    python infer.py --adapters output/vN-.../checkpoint-N --stream true --temperature 0 --max_new_tokens 2048

takes the flags of ms-swift's `swift infer`. With --adapters alone, the base model and the system
prompt the adapter was trained with come from the checkpoint's args.json (ours or ms-swift's) or
adapter_config.json; --model and --system override them.

Decoding (decode.py) is the autoregressive loop in its plainest form: prefill the prompt, then one
token at a time against a KV cache (on a GPU each step replayed as one CUDA graph:
fast_decode.CUDAGraphDecoder), each token chosen greedily or sampled. This file is the chat program
around it: which model and adapters, which template, and printing the answer.

Where ms-swift's behaviour is not obvious, this file chooses:
- A sampling flag that is not given takes its value from the model's generation_config.json, as
  ms-swift does (Qwen2.5-Instruct: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05;
  the penalty applies to greedy decoding too). --temperature 0 is greedy.
- --max_new_tokens not given: at most 32,768 tokens (Qwen's advice for Qwen3), or the rest of the context.
- Piped stdin (not a terminal): every non-empty line is a separate one-turn conversation; stdout
  gets one JSON object per such line, {"line", "query", "response"} or {"line", "error"}, which no
  newline in an answer can shift. Everything else goes to stderr.
- In the REPL, Ctrl-C stops the answer and drops that turn (question and partial answer) from the
  history. The system prompt follows the active adapter (the one it was trained with) unless
  --system or /system set one; /system and /adapter keep the history.
"""

import codecs
import io
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

import cli
import data
import fast_decode
import flags
import lora
import model as modeling
import quant
from cli import UsageError
from lora import LoraError
from decode import Decoder, generate
from model import ModelError
from template import TEMPLATES, Template, TemplateError, choose_template, with_trained_thinking
from flags import DEFAULT_MAX_NEW_TOKENS
from util import round_up

# ----------------------------------------------------------------------------------------------
# Printing an answer: a thinking model's reasoning apart from its answer

# An answer's length when --max_new_tokens is not given: Qwen's advice for Qwen3 (room for the
# reasoning of a thinking model). It also sizes the KV cache: a 2507 model's 262,144-position
# context would take 38 GB of cache for the 4B.


@dataclass
class Reply:
    text: str  # the answer
    reasoning: str | None = None  # what a thinking model wrote between <think> and </think>


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as one printable character; this maps them back."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = printable + [256 + i for i in range(len(others))]
    return {chr(c): b for b, c in zip(printable + others, chars)}


class StreamDecoder:
    """Turns generated token ids into text, releasing only whole UTF-8 characters.

    A byte-level token can end in the middle of a character (most Chinese characters are three
    bytes, and a character may be spread over several tokens). We turn each token back into its
    bytes and feed them to an incremental UTF-8 decoder, which holds an incomplete character back
    until its last byte arrives and turns bytes that can never be valid into U+FFFD at once."""

    _alphabet = _byte_level_alphabet()

    def __init__(self, tok: data.Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.added = tok.tok.get_added_tokens_decoder()  # {id: AddedToken}: special tokens and the like
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self.added:
            t = self.added[token_id]
            return b"" if (t.special and self.skip) else t.content.encode()
        piece = self.tok.tok.id_to_token(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (the model's is padded)
            return b""
        if all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        return self.tok.decode([token_id]).encode()  # not a byte-level vocabulary: decode as is

    def push(self, token_id: int) -> str:
        return self.utf8.decode(self.token_bytes(int(token_id)))

    def flush(self) -> str:
        text = self.utf8.decode(b"", final=True)
        self.utf8.reset()
        return text


class ThinkingStream:
    """Generated tokens -> text on `out`, a thinking model's reasoning apart from its answer.

    The reasoning is what the model writes between <think> and </think> (Thinking-2507's prompt has
    opened the block already, `thinking`). With show_thinking it is printed before the answer: dim on a
    terminal, elsewhere between <think> and </think> lines; without, only the answer is printed. The
    newlines the template puts around both are not. Only whole UTF-8 characters are printed (StreamDecoder)."""

    DIM, NORMAL = "\033[2m", "\033[0m"

    def __init__(self, tok: data.Tokenizer, out, stream: bool, show_thinking: bool, thinking: bool = False):
        self.out, self.stream, self.show = out, stream, show_thinking
        self.open_id, self.close_id = tok.tok.token_to_id("<think>"), tok.tok.token_to_id("</think>")
        self.utf8 = StreamDecoder(tok)
        self.parts = {"reasoning": [], "answer": []}
        self.where = "reasoning" if thinking else "answer"
        self.thought = thinking
        self.tty = hasattr(out, "isatty") and out.isatty()
        if thinking:
            self.mark_reasoning(True)

    def push(self, token_id: int):
        if token_id == self.open_id and self.where == "answer" and not "".join(self.parts["answer"]).strip():
            self.where, self.thought = "reasoning", True
            self.mark_reasoning(True)
        elif token_id == self.close_id and self.where == "reasoning":
            self.add(self.utf8.flush())
            self.mark_reasoning(False)
            self.where = "answer"
        else:
            self.add(self.utf8.push(token_id))

    def add(self, text: str):
        so_far = "".join(self.parts[self.where])
        if self.thought and not so_far.strip("\n"):  # the newlines after <think> and after </think> are the template's
            text = (so_far + text).lstrip("\n")
            self.parts[self.where] = []
        self.parts[self.where].append(text)
        if self.stream:
            self.emit(text, self.where)

    def mark_reasoning(self, start: bool):
        """Where streamed reasoning starts or ends: dim on a terminal, else the model's own tags."""
        if self.stream:
            self.emit((self.DIM if start else self.NORMAL) if self.tty else ("<think>\n" if start else "</think>\n"), "reasoning")

    def emit(self, text: str, part: str):
        if text and (part == "answer" or self.show):
            print(text, end="", file=self.out, flush=True)

    def close(self):
        """The end of the answer, or of what was printed of it (Ctrl-C): the colour back, a newline."""
        self.add(self.utf8.flush())
        if self.where == "reasoning" and self.tty:
            self.mark_reasoning(False)
        if not self.stream:
            if self.thought and self.show:
                print(self.DIM + self.reasoning_text() + self.NORMAL if self.tty else
                      f"<think>\n{self.reasoning_text()}\n</think>", file=self.out)
            print("".join(self.parts["answer"]), end="", file=self.out)
        print(file=self.out, flush=True)

    def reasoning_text(self) -> str:
        return "".join(self.parts["reasoning"]).strip("\n")

    def result(self) -> Reply:
        return Reply("".join(self.parts["answer"]), self.reasoning_text() if self.thought else None)


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
    adapter_systems: dict  # adapter name -> the system prompt it was trained with (None: the template's default)
    template: Template = TEMPLATES["qwen2_5"]  # the chat format, with whether a hybrid model thinks (template.py)
    show_thinking: bool = True  # print a thinking model's reasoning (dim on a terminal) before its answer
    base_system: str | None = None  # a model merged by merge.py: the system prompt it was trained with
    adapter: str | None = None  # the active adapter; None is the plain base model
    merged: bool = False  # the active adapter was merged into the weights (--merge_lora true)
    system: str | None = None  # from --system or /system; overrides the adapter's
    stream: bool = True
    show_prompt: bool = False
    decoding: fast_decode.DecodePlan = field(default_factory=fast_decode.DecodePlan)  # eager, or CUDA graphs
    # Kept between answers, so that a conversation's earlier turns are not run again:
    decoder: "Decoder | None" = None  # its KV cache, made for `kv_key`
    kv_key: tuple | None = None  # (adapter, positions)
    cached_ids: list = field(default_factory=list)  # the tokens whose keys and values they hold

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def current_system(self) -> str | None:
        if self.system is not None:
            return self.system
        return self.base_system if self.adapter is None else self.adapter_systems.get(self.adapter)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        ids, _ = data.encode_chat(self.tok, messages, add_generation_prompt=True, system=self.current_system(),
                                  template=self.template)
        return ids

    def set_thinking(self, on: bool):
        """A hybrid model thinks before answering, or answers straight away (enable_thinking)."""
        if self.template.thinks != "hybrid":
            raise TemplateError(f"the {self.template.name} template " + ("always thinks" if self.template.thinks == "always"
                                else "never thinks") + ": only a hybrid Qwen3 model (template qwen3) switches.")
        self.template = replace(self.template, enable_thinking=on)

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
        """The decoder (and its KV cache) for the active adapter with room for `length` positions.
        Made again, and its cached tokens forgotten, only when the adapter changes (the same tokens
        have other keys and values) or the size changes. Sizes go in steps of 2048 positions (a
        CUDA graph attends over its whole cache, so it should not be much longer than needed)."""
        key = (self.adapter, min(self.context, round_up(length, 2048)))
        if key != self.kv_key:
            self.decoder = None  # free the old one first
            self.cached_ids = []
            self.decoder = self.decoding.new_decoder(self.model, key[1])
            self.kv_key = key
        return self.decoder

    def answer(self, ids: list[int], out) -> Reply:
        """Generate the answer to the prompt `ids`, printing it to `out` (a thinking model's reasoning
        first, set apart, if show_thinking); return it."""
        if self.show_prompt:
            note(self.tok.decode(ids))
        room = self.context - len(ids)
        limit = min(room, DEFAULT_MAX_NEW_TOKENS if self.max_new_tokens is None else self.max_new_tokens)
        # Thinking-2507's prompt opens the think block itself: the first tokens are reasoning.
        reply = ThinkingStream(self.tok, out, self.stream, self.show_thinking,
                               thinking=self.template.generation_prompt() == "<think>\n")
        n, token = 0, None
        decoder = self.decoder_for(len(ids) + limit)
        try:
            for token in generate(self.model, ids, limit, self.stop_ids, generator=self.generator, decoder=decoder,
                                  cached=self.cached_ids, **self.sampling):
                n += 1
                reply.push(token)
        finally:
            reply.close()
        if n == limit and token not in self.stop_ids and (limit == room or self.max_new_tokens is None):
            why = f"the model's context of {self.context} tokens" if limit == room else f"{limit} new tokens (--max_new_tokens)"
            note(f"(the answer was cut off at {why})")
        return reply.result()


# ----------------------------------------------------------------------------------------------
# The REPL, one-shot and piped use

HELP = ("commands: clear (forget the conversation), /system TEXT (set the system prompt; /system alone shows it, "
        "/system default goes back to the adapter's or the model's), "
        "/adapter NAME or /adapter base (switch), /adapters (list), /think on|off (a hybrid Qwen3 model: reason "
        "first, or answer straight away), exit or quit. Ctrl-C stops an answer, Ctrl-D exits.")


def run_command(chat: Chat, line: str):
    cmd, _, arg = line.partition(" ")
    arg = arg.strip()
    if cmd == "/system":
        if arg:
            chat.system = None if arg == "default" else arg  # clear keeps it; "default" is the way back
        system = chat.current_system()
        system = chat.template.default_system if system is None else system
        note(f"system prompt: {system or '(none)'}")
    elif cmd == "/think" and arg in ("on", "off"):
        chat.set_thinking(arg == "on")
        note(f"thinking {arg}" + (" (the model answers after an empty think block)" if arg == "off" else ""))
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
        if data.LONE_SURROGATE.search(line):  # bytes that are not UTF-8: nothing to tokenize
            note("(that line is not UTF-8 text; type it again)")
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
            except (LoraError, TemplateError) as e:
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
        # The reasoning goes into the history as the template keeps it: dropped from turns before the last question.
        history = messages + [{"role": "assistant", "content": reply.text, "reasoning_content": reply.reasoning}]


def answer_lines(chat: Chat, lines) -> int:
    """Piped use: each non-empty line is its own one-turn conversation, answered on stdout as one
    JSON object a line: {"line": N, "query": ..., "response": ...}, or {"line": N, "error": ...}
    for a line that could not be answered (the exit code is then 1). An answer may hold newlines
    and a line may be skipped; the line number says which input each output belongs to."""
    code = 0
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        result = answer_line(chat, line, number)
        code = 1 if "error" in result else code
        print(json.dumps({"line": number, **result}, ensure_ascii=False), flush=True)
    return code


def answer_line(chat: Chat, line: str, number: int) -> dict:
    if data.LONE_SURROGATE.search(line):  # bytes that are not UTF-8 (read with surrogateescape)
        note(f"error: input line {number} is not UTF-8 text; skipped it.")
        return {"error": "not UTF-8 text"}
    ids = chat.prompt_ids([{"role": "user", "content": line}])
    if len(ids) >= chat.context:
        note(f"error: input line {number} is {len(ids)} tokens, more than the model's context of {chat.context}; skipped it.")
        return {"query": line, "error": f"{len(ids)} tokens do not fit the model's context of {chat.context}"}
    reply = chat.answer(ids, io.StringIO())
    shown = {"reasoning": reply.reasoning} if chat.show_thinking and reply.reasoning is not None else {}
    return {"query": line, **shown, "response": reply.text}


# ----------------------------------------------------------------------------------------------
# Flags and loading


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


def load_chat(args) -> Chat:
    """The base model, its adapters and the decoding settings that --flags ask for."""
    device = cli.pick_device(args.device)
    flags.check_infer_args(args, device)
    adapters = flags.parse_adapters(args.adapters)
    # Read every adapter folder before the (slow) base model, so a wrong path fails in a second.
    for _, path in adapters:
        lora.read_adapter(path)
    ckpt_args = [lora.checkpoint_args(path) for _, path in adapters]
    model_name = args.model or ckpt_args[0]["model"]
    if model_name is None:
        raise UsageError(f"{adapters[0][1]} does not say which base model it was trained on (no \"model\" in "
                         "args.json, no base_model_name_or_path in adapter_config.json); pass --model.")
    named_in = None if args.model else (adapters[0][1], ckpt_args[0].get("model_dir"))
    model_dir = base_folder(model_name, named_in)
    template = chat_template(args, model_dir, modeling.Config.from_json(model_dir / "config.json"), ckpt_args)
    gen_config = modeling.load_generation_config(model_dir)  # (checked: a bad field stops before the slow load)
    model = load_base(model_dir, model_name, named_in, cli.pick_dtype(args.torch_dtype, device), device,
                      quant.settings(args))
    tok = data.Tokenizer(model_dir)
    systems = load_adapters(model, adapters, ckpt_args, model_name, args.quant_bits)
    active = adapters[0][0] if adapters else None
    lora.set_active_adapter(model, active)
    if args.merge_lora:
        lora.merge_lora(model)
        note(f"adapter {active} merged into the weights")
    decoding = fast_decode.plan_decoding(args.cuda_graph, args.torch_compile, device, model)
    decoding.prepare(model)
    sampling = sampling_settings(args, gen_config)
    # the model's own default, as transformers' generate takes it (checked as the file was read)
    max_new_tokens = args.max_new_tokens or gen_config.get("max_new_tokens")
    note("decoding: " + ("greedy" if sampling["temperature"] == 0 else
                         f"temperature {sampling['temperature']}, top_p {sampling['top_p']}, top_k {sampling['top_k']}")
         + f", repetition_penalty {sampling['repetition_penalty']}, seed {args.seed}, max_new_tokens "
         + str(max_new_tokens or f"{DEFAULT_MAX_NEW_TOKENS} (or the rest of the context)"))
    interactive = args.prompt is None and sys.stdin.isatty()
    return Chat(model=model, tok=tok, stop_ids=modeling.stop_ids(gen_config, model.config, tok.im_end_id),
                sampling=sampling, max_new_tokens=max_new_tokens,
                generator=torch.Generator(device=device).manual_seed(args.seed), adapter_systems=systems,
                template=template, show_thinking=interactive if args.show_thinking is None else args.show_thinking,
                base_system=merged_system(model_dir),
                adapter=active, merged=args.merge_lora, system=args.system, stream=args.stream,
                show_prompt=args.show_prompt, decoding=decoding)


def load_adapters(model, adapters: list, ckpt_args: list, model_name: str, quant_bits) -> dict:
    """Load each (name, path) adapter; {name: the system prompt it was trained with}."""
    systems = {}
    for (name, path), ck in zip(adapters, ckpt_args):
        lora.load_adapter(model, path, name, base_model_name_or_path=model_name)
        systems[name] = ck["system"]
        note(f"adapter {name}: {path}" + (f" (trained with system prompt {ck['system']!r})" if ck["system"] is not None else ""))
        if ck.get("quant_bits") and not quant_bits:
            note(f"(adapter {name} was trained on a 4-bit base and runs on this unquantised one too; "
                 "--quant_bits 4 loads the base as it was trained, in less memory)")
    return systems


def chat_template(args, model_dir, config, ckpt_args: list) -> Template:
    """--template, else the one the (first) adapter or the merged model was trained in (args.json),
    else the checkpoint's own; with --enable_thinking, and --preserve_thinking / --reasoning_effort
    else as that adapter was trained, where its template is the one used (its settings are that one's)."""
    trained = ckpt_args or ([lora.checkpoint_args(model_dir)] if (Path(model_dir) / "args.json").exists() else [])
    first = next((ck for ck in trained if ck.get("template") in TEMPLATES), {})
    name = args.template or first.get("template")
    saved = first if name == first.get("template") else {}
    preserve = saved.get("preserve_thinking") if args.preserve_thinking is None else args.preserve_thinking
    template = choose_template(model_dir, config.model_type, name, enable_thinking=args.enable_thinking,
                               preserve_thinking=preserve, reasoning_effort=args.reasoning_effort or saved.get("reasoning_effort"))
    if args.enable_thinking is None and trained:  # as the (first) adapter was trained to answer
        template = with_trained_thinking(template, trained[0])
    thinking = {"never": "", "always": ", thinks first", "hybrid": ", thinks first" if template.enable_thinking else
                ", thinking off: --enable_thinking true (or /think on in the chat) lets it reason first"}[template.thinks]
    note(f"chat template: {template.name}" + ("" if args.template or not name else " (as trained)") + thinking)
    return template


def merged_system(model_dir) -> str | None:
    """A model merged by merge.py keeps its checkpoint's args.json: the system prompt it was
    trained with (None: none was given, the template's default)."""
    return lora.checkpoint_args(model_dir)["system"] if (Path(model_dir) / "args.json").exists() else None


def base_folder(model_name: str, named_in: tuple | None) -> Path:
    """The base model's folder. named_in: (the adapter whose args.json named the base, the folder its
    training loaded the base from), for a base the hub cannot give (one that ms-swift downloaded from
    ModelScope is in args.json's model_dir) and for the error."""
    try:
        return cli.model_dir(model_name)
    except ModelError as e:
        if not named_in:
            raise
        if named_in[1] and Path(named_in[1]).is_dir():
            note(f"({model_name} is not here; loading {named_in[1]}, where its training found it)")
            return Path(named_in[1])
        raise ModelError(f"{e} (The base model comes from {named_in[0]}'s args.json or adapter_config.json; "
                         "pass --model to load it from elsewhere.)") from None


def load_base(folder: Path, model_name: str, named_in: tuple | None, dtype, device,
              quantized: quant.QuantConfig | None = None):
    """The model in `folder`; quantized: the decoder's linear layers in 4 bits (quant.py)."""
    note(f"loading {model_name} ({str(dtype).removeprefix('torch.')} on {device}"
         + (f", decoder layers in 4-bit {quantized.quant_type})" if quantized else ")")
         + (f", the base model named in {named_in[0]}" if named_in else ""))
    if quantized:
        return quant.load_quantized(str(folder), quantized, dtype, device)[0]
    return modeling.load_model(str(folder), dtype, device)[0]


def main(argv=None) -> int:
    def chat_until_done():
        args = flags.infer_parser().parse_args(argv)
        dataset = args.val_dataset or args.load_data_args  # every row answered into a file: predict.py
        if dataset:
            import predict
            rows = predict.read_dataset(args)  # before the model loads: a bad row fails at once
        chat = load_chat(args)
        if len(chat.adapter_systems) > 1:  # swift infer loads each into one peft adapter: the last one's weights answer
            note(f"answering with adapter {chat.adapter}, the first of --adapters (swift infer answers with the last); "
                 "switch with /adapter NAME in the chat, or give that one first")
        if dataset:
            return predict.predict(chat, rows, args)
        if args.prompt is not None:
            chat.answer(chat.prompt_ids([{"role": "user", "content": args.prompt}]), sys.stdout)  # prints it
            return 0
        if not sys.stdin.isatty():  # read as UTF-8 whatever the locale; a bad byte spoils only its line
            return answer_lines(chat, io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="surrogateescape"))
        repl(chat)
        return 0

    return cli.run_main(chat_until_done)


if __name__ == "__main__":
    sys.exit(main())
