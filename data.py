"""data.py: the tokenizer, Qwen2.5's chat format, and turning conversations into training rows.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Qwen2.5
renders it as ChatML:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{query}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

with a default system prompt when the conversation has none. For training, every token is
masked out of the loss (label -100) except the content of each assistant turn and the
<|im_end|> that closes it: the model learns to answer and to stop, not to write questions.
"""

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IGNORE_INDEX = -100


class DataError(Exception):
    """A problem with a dataset, a tokenizer file or a data flag that the user can fix."""


class Tokenizer:
    """Qwen's byte-level BPE tokenizer, read from tokenizer.json with the `tokenizers` package."""

    def __init__(self, path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.exists():
            raise DataError(f"{path} does not exist: the model folder needs Qwen's tokenizer.json.")
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"{path} could not be read as a tokenizer ({e}).") from None
        self.path = path
        self.im_start_id = self.special_id("<|im_start|>")
        self.im_end_id = self.special_id("<|im_end|>")
        self.endoftext_id = self.special_id("<|endoftext|>")
        self._newline = self.encode("\n")

    def special_id(self, name: str) -> int:
        i = self.tok.token_to_id(name)
        if i is None:
            raise DataError(f"{self.path} has no {name} token; it is not a Qwen2 / Qwen2.5 tokenizer.")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def encode_turn(self, role: str, content: str) -> tuple[list[int], list[int]]:
        """`<|im_start|>role\\ncontent<|im_end|>\\n` as ids, and the ids of just `content<|im_end|>`
        (the part an assistant turn is trained on).

        Special tokens split the text before BPE runs, so encoding piece by piece gives the same
        ids as encoding the rendered string at once."""
        head = [self.im_start_id] + self.encode(role + "\n")
        body = self.encode(content) + [self.im_end_id]
        return head + body + self._newline, body


def with_system(messages: list[dict], system: str | None = None) -> list[dict]:
    """The conversation with its system prompt in front: its own, else `system`, else Qwen's default."""
    if messages and messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": DEFAULT_SYSTEM if system is None else system}] + list(messages)


def render_chat(messages: list[dict], add_generation_prompt: bool = False, system: str | None = None) -> str:
    """The text Qwen2.5-Instruct's chat template produces for these messages."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in with_system(messages, system))
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                system: str | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels: -100 except assistant content + <|im_end|>."""
    ids, labels = [], []
    for m in with_system(messages, system):
        turn, trained = tok.encode_turn(m["role"], m["content"])
        ids += turn
        if m["role"] == "assistant":
            masked = len(turn) - len(trained) - len(tok._newline)
            labels += [IGNORE_INDEX] * masked + trained + [IGNORE_INDEX] * len(tok._newline)
        else:
            labels += [IGNORE_INDEX] * len(turn)
    if add_generation_prompt:
        prompt = [tok.im_start_id] + tok.encode("assistant\n")
        ids += prompt
        labels += [IGNORE_INDEX] * len(prompt)
    return ids, labels


class StreamDecoder:
    """Turns generated token ids into text, releasing only whole UTF-8 characters.

    A byte-level token can end in the middle of a character (most Chinese characters are three
    bytes). We decode everything not yet printed and hold it back while it ends in an incomplete
    character, which the decoder shows as U+FFFD."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tok, skip_special_tokens
        self.pending: list[int] = []

    def push(self, token_id: int) -> str:
        self.pending.append(token_id)
        text = self.tok.decode(self.pending, skip_special_tokens=self.skip)
        # A UTF-8 character has at most 4 bytes: past that the bytes are invalid, not incomplete.
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending = []
        return text

    def flush(self) -> str:
        text = self.tok.decode(self.pending, skip_special_tokens=self.skip) if self.pending else ""
        self.pending = []
        return text
