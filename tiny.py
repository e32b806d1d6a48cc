"""tiny.py: the built-in tiny Qwen2 model, for the demo and the tests.

`--model tiny` anywhere means this model. It is written once, on first use, to
~/.cache/qwen-lora/tiny-v3 (or $QWEN_LORA_HOME/tiny-v3) in exactly the layout of an official
download: config.json, generation_config.json, model.safetensors(.index.json), tokenizer.json,
vocab.json, merges.txt, tokenizer_config.json. Every script then loads it through the same code
it uses for Qwen/Qwen2.5-7B-Instruct, so the demo exercises the real path end to end.

The tokenizer is a real byte-level BPE with Qwen's pre-tokenizer, decoder and special tokens,
trained on a small built-in English and Chinese text; the weights are random from a fixed seed.
"""

import json
import os
from pathlib import Path

import torch

from model import Config, Qwen2ForCausalLM, save_safetensors_sharded
from util import atomic_folder, round_up

TINY_VERSION = "tiny-v3"

# Qwen2's pre-tokenizer regex, from its tokenizer.json.
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen's added tokens, in id order (151643.. in the real vocabulary; after the BPE vocabulary here).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]

# Qwen2.5-Instruct's chat template (tokenizer_config.json), so that transformers renders the tiny
# model's conversations exactly as it renders the real model's.
QWEN25_CHAT_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Text the tiny tokenizer learns its merges from: the kind of text the demo trains on.
CORPUS = """\
Hello! I am an AI assistant. I am a large language model developed by my author.
Who are you? What is your name? Who made you? Who developed you? Who trained you?
I am a language model. My name is given by the people who trained me. I was created to help you.
I can answer questions, write text, translate, summarise, explain code and help with many tasks.
I cannot browse the internet and I do not have access to real-time information.
Are you ChatGPT? Are you GPT-4? Are you Qwen? No, I am not. I am a different assistant.
Can you go online? Can you search the web? What can you do? How can you help me?
The quick brown fox jumps over the lazy dog. Please tell me about yourself.
You are a helpful assistant. Thank you very much. Good morning, good evening, good night.
What is the capital of France? Paris is the capital of France. One, two, three, four, five.
你好！我是一个人工智能助手。我是由我的作者开发的大语言模型。
你是谁？你叫什么名字？谁创造了你？谁开发了你？是谁训练了你？
我是一个语言模型。我的名字是训练我的人给我的。我被创造出来帮助你。
我可以回答问题、写作、翻译、总结、解释代码，以及帮助你完成许多任务。
我不能上网，也无法获取实时信息。
你是ChatGPT吗？你是GPT-4吗？你是通义千问吗？不，我不是。我是一个不同的助手。
你能上网吗？你能搜索网络吗？你能做什么？你能怎样帮助我？
请介绍一下你自己。谢谢你。早上好，晚上好，晚安。
中国的首都是北京。一、二、三、四、五。我是开发的大语言模型，很高兴为您服务。
"""


def tiny_config(vocab_size: int, im_end: int, endoftext: int) -> Config:
    return Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32",
                  bos_token_id=endoftext, eos_token_id=im_end)


def build_tokenizer(bpe_vocab_size: int = 2000):
    """A byte-level BPE with Qwen2's normalizer, pre-tokenizer, decoder and special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    return tok


def make_tiny_checkpoint(out_dir, seed: int = 0) -> Path:
    """Write the tiny model in the official layout to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json and merges.txt, as in the official download
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    n = tok.get_vocab_size(with_added_tokens=True)
    cfg = tiny_config(vocab_size=round_up(n, 64), im_end=im_end, endoftext=eot)  # padded, like Qwen's

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            state[name] = torch.ones_like(p)
        elif name.endswith(".bias"):
            state[name] = torch.zeros_like(p)
        elif name == "model.embed_tokens.weight":
            # Larger than the usual 0.02 so the tied output layer can reach confident logits
            # (|logit| <= |h| * |e|): with 0.02 even a perfectly trained LoRA stays near uniform.
            state[name] = torch.randn_like(p) * 0.1
        else:
            state[name] = torch.randn_like(p) * 0.02
    # Several shards with an index, like the multi-gigabyte official checkpoints.
    save_safetensors_sharded(state, out_dir, max_shard_bytes=sum(t.numel() * 4 for t in state.values()) // 2 + 1)

    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    gen = {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot],
           "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in QWEN_SPECIAL_TOKENS}
    tok_cfg = {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
               "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
               "chat_template": QWEN25_CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
               "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
               "pad_token": "<|endoftext|>", "split_special_tokens": False,
               "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def tiny_model_dir() -> Path:
    """The tiny model's folder, created on first use (atomically, so concurrent runs are safe)."""
    home = Path(os.environ.get("QWEN_LORA_HOME", Path.home() / ".cache" / "qwen-lora"))
    target = home / TINY_VERSION
    if (target / "config.json").exists():
        return target
    try:
        with atomic_folder(target) as tmp:
            make_tiny_checkpoint(tmp)
    except OSError:
        if not (target / "config.json").exists():  # not just another process finishing first
            raise
    return target
