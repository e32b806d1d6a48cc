"""tiny.py: the built-in tiny models, for the demo and the tests.

`--model tiny` anywhere means a tiny Qwen2.5-Instruct; `--model tiny-qwen3` a tiny hybrid-thinking
Qwen3 (q_norm / k_norm, head_dim 48 where hidden / heads is 32, Qwen3's <think> tokens and chat
template); `--model tiny-qwen3_5` a tiny Qwen3.5 text model (three Gated DeltaNet layers, then one of
gated attention; zero-centred norms; Qwen3's tokens and, until template.py has Qwen3.5's own, Qwen3's
chat template). Each is written once, on first use, to ~/.cache/qwen-lora/NAME-vN (or under
$QWEN_LORA_HOME) in exactly the layout of an official download: config.json,
generation_config.json, model.safetensors(.index.json), tokenizer.json, vocab.json, merges.txt,
tokenizer_config.json. Every script then loads it through the same code it uses for
Qwen/Qwen2.5-7B-Instruct or Qwen/Qwen3-8B, so the demo exercises the real path end to end.

The tokenizer is a real byte-level BPE with Qwen's pre-tokenizer, decoder and special tokens,
trained on a small built-in English and Chinese text; the weights are random from a fixed seed.
"""

import json
import os
from pathlib import Path

import torch

from model import Config, QwenForCausalLM, save_safetensors_sharded
from util import atomic_folder, round_up

BUILT_IN = {"tiny": "qwen2", "tiny-qwen3": "qwen3", "tiny-qwen3_5": "qwen3_5"}  # --model NAME -> its model_type
TINY_VERSION = {"qwen2": "tiny-v4", "qwen3": "tiny-qwen3-v2", "qwen3_5": "tiny-qwen3_5-v2"}  # the folder each is written to

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

# Qwen3 adds these after Qwen2.5's, as tokens that are not special (ids 151665-151668 in the real vocabulary).
QWEN3_ADDED_TOKENS = ["<tool_response>", "</tool_response>", "<think>", "</think>"]

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

# Qwen3's chat template (Qwen/Qwen3-8B's tokenizer_config.json, the same for 0.6B to 32B): reasoning in
# <think> blocks, enable_thinking, and the reasoning of earlier turns dropped (template.py says how).
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen3.5's chat template (Qwen/Qwen3.5-*'s chat_template.jinja): Qwen3's format, but the prompt opens
# the think block itself, and message content may be a list of parts (the models see images too).
QWEN35_CHAT_TEMPLATE = r"""{#- Qwen3.5 (Qwen/Qwen3.5-0.8B ... 27B) chat_template.jinja. No copy from Qwen's own repository was
    reachable offline. Source: llama.cpp's models/templates/Qwen3.5-4B.jinja as vendored in GitHub
    HermestoAizales/llama.cpp (commit 0834e65824bc751ebb66596dbc2b6119687d2749) and
    Indras-Mirror/llama.cpp-turboq-mtp (commit 5f739afeb8f9e92488b6667a9aebc7a814dd1383): identical but
    for the one line that chooses whether an assistant turn keeps its think block, which each fork edited
    differently (`... and reasoning_content`, `... or reasoning_content`; cameronr/ik_llama.cpp always
    writes it). That line is put back as `loop.index0 > ns.last_query_index`, the condition quoted for
    the Qwen3.5-9B checkpoint's template and the one Qwen3.6 extends with preserve_thinking (Qwen3.6.jinja
    beside this file). Otherwise the text is the same as Qwen3.6's, but for how a tool call's argument
    is written (tools are not exercised by the tests). -#}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\n' }}
    {{- "# Tools\n\nYou have access to the following functions:\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>" }}
    {{- '\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n- Function calls MUST follow the specified format: an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n- Required parameters MUST be specified\n- You may provide optional reasoning for your function call in natural language BEFORE the function call, but NOT after\n- If there is no function call available, answer the question like normal with your current knowledge and do not tell the user about function calls\n</IMPORTANT>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\n\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\n' + content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content + '\n</think>\n\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\n\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- else %}
                        {{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\n<tool_call>\n<function=' + tool_call.name + '>\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\n</parameter>\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- else %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}
"""

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


def tiny_config(vocab_size: int, im_end: int, endoftext: int, family: str = "qwen2") -> Config:
    qwen3 = {"qwen2": {}, "qwen3": {"head_dim": 48, "attention_bias": False},
             "qwen3_5": {"head_dim": 32, "partial_rotary_factor": 0.25, "linear_num_key_heads": 2,
                         "linear_num_value_heads": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32}}[family]
    return Config(vocab_size=vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, torch_dtype="float32",
                  bos_token_id=endoftext, eos_token_id=im_end, model_type=family, **qwen3)


def build_tokenizer(bpe_vocab_size: int = 2000, family: str = "qwen2"):
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
    if family != "qwen2":
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN3_ADDED_TOKENS])
    return tok


def make_tiny_checkpoint(out_dir, seed: int = 0, family: str = "qwen2") -> Path:
    """Write the tiny model of this family in the official layout to out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family=family)
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json and merges.txt, as in the official download
    eot, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
    n = tok.get_vocab_size(with_added_tokens=True)
    cfg = tiny_config(vocab_size=round_up(n, 64), im_end=im_end, endoftext=eot, family=family)  # padded, like Qwen's
    state = tiny_weights(cfg, seed)
    # Several shards with an index, like the multi-gigabyte official checkpoints.
    save_safetensors_sharded(state, out_dir, max_shard_bytes=sum(t.numel() * 4 for t in state.values()) // 2 + 1)

    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    # Each family's published sampling defaults (Qwen2.5-7B-Instruct's; Qwen3-8B's, for thinking).
    sampling = ({"temperature": 0.6, "top_p": 0.95, "top_k": 20} if family != "qwen2" else
                {"repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20})
    # max_new_tokens: a random base model (`/adapter base` in the REPL) would otherwise write to the context's end
    gen = {"bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot], **sampling,
           "max_new_tokens": 256}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    jinja = {"qwen2": QWEN25_CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE, "qwen3_5": QWEN35_CHAT_TEMPLATE}[family]
    tok_cfg = tokenizer_config(tok, jinja)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def tiny_weights(cfg: Config, seed: int) -> dict:
    """Random weights from a fixed seed, scaled so that the tiny model can learn the demo."""
    torch.manual_seed(seed)
    model = QwenForCausalLM(cfg)
    state = {}
    one = 0.0 if cfg.qwen3_5 else 1.0  # a scale of one: Qwen3.5's norms store it zero-centred (x * (1 + w))
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's trained ones are far from 1
            state[name] = one + torch.randn_like(p) * 0.1
        elif name.endswith(("norm.weight", "conv1d.weight", "dt_bias")):  # the layers' own init (DeltaNet's norm: ones)
            state[name] = p.clone()
        elif name.endswith("A_log"):  # decays of about e^-0.05 a token: the DeltaNet remembers a sentence or two
            state[name] = torch.randn_like(p) * 0.5 - 3
        elif name.endswith(".bias"):
            state[name] = torch.zeros_like(p)
        elif name == "model.embed_tokens.weight":
            # Larger than the usual 0.02 so the tied output layer can reach confident logits
            # (|logit| <= |h| * |e|): with 0.02 even a perfectly trained LoRA stays near uniform.
            state[name] = torch.randn_like(p) * 0.1
        else:
            state[name] = torch.randn_like(p) * 0.02
    return state


def tokenizer_config(tok, chat_template: str) -> dict:
    """tokenizer_config.json as Qwen ships it: the added tokens (special or not) and the chat template."""
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t in QWEN_SPECIAL_TOKENS}
             for t in QWEN_SPECIAL_TOKENS + QWEN3_ADDED_TOKENS if tok.token_to_id(t) is not None}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
            "chat_template": chat_template, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
            "pad_token": "<|endoftext|>", "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}


def tiny_model_dir(name: str = "tiny") -> Path:
    """The folder of the built-in model `name` (see BUILT_IN), created on first use (atomically, so
    concurrent runs are safe)."""
    family = BUILT_IN[name]
    target = tiny_home() / TINY_VERSION[family]
    if (target / "config.json").exists():
        return target
    try:
        with atomic_folder(target) as tmp:
            make_tiny_checkpoint(tmp, family=family)
    except OSError:
        if not (target / "config.json").exists():  # not just another process finishing first
            raise
    return target


def tiny_home() -> Path:
    return Path(os.environ.get("QWEN_LORA_HOME", Path.home() / ".cache" / "qwen-lora"))
