"""data.py: the tokenizer, the chat format as tokens, and conversations turned into training rows.

A conversation is a list of {"role": "system" | "user" | "assistant", "content": str}. Every Qwen
renders it as ChatML:

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n{query}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

and the model's template (template.py: Qwen2.5's, Qwen3's) says what else: the system prompt
when the conversation has none and --system is not given (--system '' leaves the system turn
out), and how a thinking model's reasoning is written. For training, every token is masked out
of the loss (label -100) except, in each assistant turn, its content, the <|im_end|> that closes it and the
"\\n" after that: the model learns to answer and to stop, not to write questions. ms-swift (since
3.10.3) trains on that "\\n" too; we follow it, so the same rows give the same loss.

The path from `--dataset` to a batch:

    load_conversations  (sources.py) read every source, turn each row of any supported format into
                        a conversation, fill in {{NAME}} / {{AUTHOR}}, sample `SOURCE#N`, hold out
                        --split_dataset_ratio of each source for evaluation, mix: the rows ms-swift
                        takes, in its order, for the same --data_seed (sources.mixture)
    encode_dataset      conversation -> Row (token ids, and which carry a label) through encode_chat;
                        rows over --max_length dropped or cut (fit_rows)
    pack (optional)     several rows in one row of <= --max_length tokens, kept apart by segment ids
                        (train.py packs each optimizer step's rows the same way: pack_bins, concat_rows)
    collate             rows -> right-padded (B, T) tensors with an attention mask

Reading datasets (files, folders, hub ids, the row formats, placeholders, `#N` sampling) is
sources.py's, a file a first reading skips; so is the encoder train.py calls, sources.load_dataset:
the first two steps for datasets of any size, tokenized in batches on every core, giving the rows
encode_dataset gives. A Row keeps 5 bytes a token.

Where ms-swift (the tool our users come from) does something surprising, we do the plain thing
(sources.py's docstring lists the rest, about reading datasets):
- Rows that have no assistant token left after --truncation_strategy left/right are dropped:
  they would only add padding.
- The text of a message is plain text: "<|im_end|>" written in a row (or typed at infer.py's
  prompt) is those ten characters, never the control token, so data cannot end a turn or open
  one (ms-swift reads it as the control token). Rows holding such text are counted in a note.
"""

import bisect
import contextlib
import functools
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer

from template import TEMPLATES, Template
from util import round_up

IGNORE_INDEX = -100


class DataError(Exception):
    """A problem with a dataset, a tokenizer file or a data flag that the user can fix."""


# ----------------------------------------------------------------------------------------------
# Tokenizer and chat format

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
        self.newline_ids = self.encode_text("\n")
        self.assistant_header = [self.im_start_id] + self.encode_text("assistant\n")
        # The spellings of the control tokens (<|im_end|>, <|endoftext|>, ...): encode_text spells them out.
        self.special_tokens = tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.special)
        self.special_spelling = (re.compile("|".join(map(re.escape, self.special_tokens)))
                                 if self.special_tokens else None)  # finds them in a row's text

    def special_id(self, name: str) -> int:
        i = self.tok.token_to_id(name)
        if i is None:
            raise DataError(f"{self.path} has no {name} token; it is not a Qwen tokenizer.")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one token spells (byte-level BPE: a character of a token is a byte), so
        a text of n characters is at least n / longest_token tokens, whatever it tokenizes to."""
        return max(map(len, self.tok.get_vocab(with_added_tokens=True)))

    def encode(self, text: str) -> list[int]:
        """Text with special tokens read as such ("<|im_end|>" -> its one id), as transformers does."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_text(self, text: str) -> list[int]:
        """Plain text: the spelling of a special token in it ("<|im_end|>") is tokenized as characters.

        Message content goes through here, so that no text in a dataset or typed at the prompt can
        end a turn or open one. Qwen's added tokens that are not special (<tool_call>, </tool_call>,
        the fim tokens) stay single tokens: Qwen's own template writes them inside message content."""
        with self.plain_text() as tok:
            return tok.encode(text, add_special_tokens=False).ids

    def encode_texts(self, texts: list[str]) -> list:
        """encode_text of many texts in one call, which `tokenizers` runs on every core while letting go of
        Python: their Encodings (e.ids; character offsets, which we never use, are not computed)."""
        with self.plain_text() as tok:
            return tok.encode_batch_fast(texts, add_special_tokens=False)

    @contextlib.contextmanager
    def plain_text(self):
        """Inside: the spelling of a special token is tokenized as characters (see encode_text)."""
        self.tok.encode_special_tokens = True
        try:
            yield self.tok
        finally:
            self.tok.encode_special_tokens = False

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


# Text holding one of these cannot be tokenized: sources.check_characters refuses such rows, train.py and
# infer.py such flags and prompts.
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # json.loads pairs the escapes it can; what is left is no character


def chat_template(system: str | None = None, template: Template | None = None) -> Template:
    """The template to render with (Qwen2.5's unless given), with --system's value if given."""
    template = template or TEMPLATES["qwen2_5"]
    return template if system is None else replace(template, system=system)


def render_chat(messages: list[dict], add_generation_prompt: bool = False, system: str | None = None,
                template: Template | None = None) -> str:
    """The text the checkpoint's Jinja chat template produces for these messages (template.py's
    prompt_turns; with system="", the same without a system turn, where Qwen2.5's would write its default)."""
    template = chat_template(system, template)
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in template.prompt_turns(messages))
    return text + (f"<|im_start|>assistant\n{template.generation_prompt()}" if add_generation_prompt else "")


def encode_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                system: str | None = None, template: Template | None = None) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation, and labels: -100 except assistant content + <|im_end|> + "\\n".

    With add_generation_prompt (inference) the turns are the Jinja template's, then the prompt for the
    answer; without, the turns as ms-swift trains on them (template.py: the two differ for thinking
    models, and an empty think block may carry no loss).
    <|im_start|> and <|im_end|> are placed by id; the text between them is tokenized as plain text
    (Tokenizer.encode_text), so a message that contains "<|im_end|>" cannot break the turns. Each
    answer is tokenized on its own, as the model generates it after `<|im_start|>assistant\\n`
    (ms-swift does the same). The ids therefore equal tokenizing the whole rendered text, except
    when an answer starts with a newline (the whole-text tokenizer would merge that newline into
    the header's, which generation never does) or a message holds a special token's spelling."""
    template = chat_template(system, template)
    turns = layout_turns(template.prompt_turns(messages) if add_generation_prompt else template.training_turns(messages))
    texts = [tok.encode_text(turn_text(m)) for m in turns]
    prompt = template.generation_prompt() if add_generation_prompt else None
    ids, labels = [], []
    for piece, trained in chat_pieces(tok, turns, texts, prompt):
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, [IGNORE_INDEX] + labels[1:]  # the first token is no one's target (all of it trained: --loss_scale all)


def layout_turns(turns: list[dict]) -> list[dict]:
    """The turns as chat_pieces lays them out: an answer whose first characters carry no loss (an
    empty think block) becomes a "think" turn (the header and those characters, untrained) and an
    "answer" turn (the rest and the end, trained); each is tokenized on its own, as ms-swift does."""
    out = []
    for m in turns:
        n = m.get("untrained", 0)
        if m["role"] in ("assistant", "whole") and n:  # whole (--loss_scale all): its header trained too
            out += [{"role": "think" if m["role"] == "assistant" else "whole_think", "content": m["content"][:n]},
                    {"role": "answer", "content": m["content"][n:]}]
        else:
            out.append({"role": m["role"], "content": m["content"]})
    return out


def turn_text(message: dict) -> str:
    """The text of a turn that is tokenized in one piece: an answer alone (its header is fixed ids);
    a question with its header, as transformers tokenizes a rendered prompt (a question that starts
    with a newline merges with the header's)."""
    return f"{message['role']}\n{message['content']}" if message["role"] in ("system", "user") else message["content"]


def chat_pieces(tok: Tokenizer, turns: list[dict], texts: list[list[int]], generation_prompt: str | None = None):
    """The conversation's tokens in order, as (ids, trained) pieces; texts[i] are the ids of
    turn_text(turns[i]) (see layout_turns for the roles); then the prompt for an answer, if any."""
    end = [tok.im_end_id] + tok.newline_ids
    pieces = []
    for m, text in zip(turns, texts):
        if m["role"] == "assistant":
            pieces += [(tok.assistant_header, False), (text + end, True)]  # "\n" trained, as in ms-swift
        elif m["role"] == "think":
            pieces.append((tok.assistant_header + text, False))
        elif m["role"] == "whole_think":  # --loss_scale all: the header trained, the empty think block not
            pieces += [(tok.assistant_header, True), (text, False)]
        elif m["role"] == "answer":
            pieces.append((text + end, True))
        elif m["role"] == "past":  # an earlier answer under --loss_scale last_round: context, not trained
            pieces.append((tok.assistant_header + text + end, False))
        elif m["role"] in ("said", "whole"):  # --loss_scale all: a question or an answer trained whole
            pieces.append(([tok.im_start_id] + text + end if m["role"] == "said" else tok.assistant_header + text + end, True))
        else:
            pieces.append(([tok.im_start_id] + text + end, False))
    if generation_prompt is not None:
        pieces.append((tok.assistant_header + tok.encode_text(generation_prompt), False))
    return pieces


# ----------------------------------------------------------------------------------------------
# Rows: encoding, fitting to --max_length and splitting

class Row:
    """A training row, stored in 5 bytes a token: its ids (int32) and which of them are trained (bool).

    It reads as the dict it stands for: row["input_ids"], and row["labels"] (the id where trained,
    -100 elsewhere), made when asked. A packed row (see pack) also knows its samples' lengths, from
    which row["segment_ids"] and row["position_ids"] are made. As Python lists of ints, ids and
    labels took 16 to 48 bytes a token: gigabytes for a dataset of a few hundred megabytes."""

    __slots__ = ("ids", "trained", "lengths")

    def __init__(self, ids: np.ndarray, trained: np.ndarray, lengths: list[int] | None = None):
        self.ids, self.trained, self.lengths = ids, trained, lengths

    def __contains__(self, key) -> bool:
        return key in ("input_ids", "labels") or (self.lengths is not None and key in ("segment_ids", "position_ids"))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self:
            raise KeyError(key)
        if key == "input_ids":
            return self.ids
        if key == "labels":
            return np.where(self.trained, self.ids, IGNORE_INDEX)
        segments = np.repeat(np.arange(len(self.lengths)), self.lengths)  # (T,): 0, 0, 0, 1, 1, 2, ...
        if key == "segment_ids":
            return segments + 1
        starts = np.cumsum([0] + self.lengths[:-1])
        return np.arange(len(self.ids)) - starts[segments]  # restarts at 0 for each sample


def encode_rows(tok: Tokenizer, conversations: list[list[dict]], system: str | None = None,
                template: Template | None = None) -> list[Row]:
    """Each conversation through encode_chat, as a Row: the plain path (sources.encode_chats gives
    the same rows, tokenizing many conversations at once)."""
    rows = []
    for messages in conversations:
        ids, labels = encode_chat(tok, messages, system=system, template=template)
        rows.append(Row(np.array(ids, dtype=np.int32), np.array(labels) != IGNORE_INDEX))
    return rows


def encode_dataset(tok: Tokenizer, conversations, max_length: int, truncation_strategy: str = "delete",
                   system: str | None = None, template: Template | None = None) -> list[Row]:
    """Conversations -> Rows (token ids and labels), each at most max_length tokens (see fit_rows)."""
    conversations = list(conversations)
    if not conversations:
        raise DataError("The dataset has no conversations to train on.")
    note_control_token_text(control_token_texts(tok, conversations))
    if truncation_strategy == "delete":
        conversations, clipped = clip_hopeless_texts(tok, conversations, max_length)
        note_clipped(clipped, max_length)
    return fit_rows(encode_rows(tok, conversations, system, template), max_length, truncation_strategy)


CLIP_OVER = 2**20  # characters: a text over this many, sure to be too long, is not tokenized whole


def clip_hopeless_texts(tok: Tokenizer, conversations: list[list[dict]], max_length: int) -> tuple[list, int]:
    """For --truncation_strategy delete: each message text cut to (max_length + 1) x tok.longest_token
    characters, or CLIP_OVER if more. A longer text is over max_length tokens whatever it tokenizes to,
    so its row is dropped either way; cut, it is dropped the same, without tokenizing the rest (a 180 MB
    line took 9 GB). Under CLIP_OVER, texts are tokenized whole, so that the longest row's count the
    notes give is exact. Returns the conversations and how many were cut (note_clipped says so)."""
    limit = max((max_length + 1) * tok.longest_token, CLIP_OVER)
    long = lambda m: isinstance(m.get("content"), str) and len(m["content"]) > limit
    cut = [any(long(m) for m in messages) for messages in conversations]
    return [[dict(m, content=m["content"][:limit]) if long(m) else m for m in messages] if c else messages
            for messages, c in zip(conversations, cut)], sum(cut)


def note_clipped(n: int, max_length: int):
    if n:
        print(f"{n} row(s) hold a text too long for --max_length {max_length} tokens whatever it tokenizes to: "
              "only its start was tokenized, so the token count below is a lower bound for them.")


def fit_rows(rows: list[Row], max_length: int, truncation_strategy: str, what: str = "rows") -> list[Row]:
    """The rows, each at most max_length tokens. truncation_strategy: "delete" drops longer rows (and
    prints how many); "left" keeps the last max_length tokens; "right" the first. Rows left without
    any trained token are dropped. what: the rows' name in the notes ("validation rows")."""
    if truncation_strategy not in ("delete", "left", "right"):
        raise DataError(f"--truncation_strategy must be delete, left or right, not {truncation_strategy!r}.")
    kept, too_long, untrained, longest = [], 0, 0, 0
    for row in rows:
        longest = max(longest, len(row.ids))
        if len(row.ids) > max_length:
            too_long += 1
            if truncation_strategy == "delete":
                continue
            keep = slice(-max_length, None) if truncation_strategy == "left" else slice(max_length)
            row = Row(row.ids[keep], row.trained[keep])
        # labels[0] is never a target (nothing comes before it), so a row needs one after it.
        if not np.count_nonzero(row.trained[1:]):  # (.any(), at a third of the cost)
            untrained += 1
            continue
        kept.append(row)

    n = len(rows)
    if too_long:
        cut = "dropped" if truncation_strategy == "delete" else f"cut from the {truncation_strategy}"
        hint = " (use --truncation_strategy left|right to keep them cut)" if truncation_strategy == "delete" else ""
        print(f"{too_long} of {n} {what} are longer than --max_length {max_length} tokens and were {cut}{hint}; "
              f"the longest has {longest} tokens.")
    if untrained:
        print(f"{untrained} of {n} {what} had no assistant token left after truncation and were dropped.")
    if not kept:
        if truncation_strategy == "delete":
            use = "evaluate" if what != "rows" else "train on"
            raise DataError(f"All {n} {what} are longer than --max_length {max_length} tokens, so nothing is left "
                            f"to {use}. Raise --max_length (the longest row has {longest} tokens) or use "
                            f"--truncation_strategy left|right to keep rows cut.")
        raise DataError(f"After cutting rows to --max_length {max_length} tokens from the {truncation_strategy}, "
                        f"no row has an assistant token left to learn from. Raise --max_length (the longest row "
                        f"has {longest} tokens)" + (" or use --truncation_strategy left, which keeps the answers "
                                                    "at the end" if truncation_strategy == "right" else "") + ".")
    return kept


def control_token_text(tok: Tokenizer, messages: list[dict]) -> str | None:
    """The first spelling of a control token (such as "<|im_end|>") in the conversation's text, if any."""
    found = tok.special_spelling and tok.special_spelling.search("\n".join(m["content"] for m in messages))
    return found.group() if found else None


def control_token_texts(tok: Tokenizer, conversations: list[list[dict]]) -> list[str | None]:
    """control_token_text of each conversation. Almost no dataset has any: one search of the whole
    batch's text says so, rather than one search a row."""
    if control_token_text(tok, [m for messages in conversations for m in messages]):
        return [control_token_text(tok, messages) for messages in conversations]
    return [None] * len(conversations)


def note_control_token_text(found: list[str | None]):
    """One line to stderr when rows spell out a control token such as <|im_end|> (found: per row, the
    first such spelling, or None).

    encode_chat trains on such text as plain characters (a dataset about chat formats may mean
    exactly that), but a row that holds a conversation already rendered as ChatML means turns,
    and would teach the model to write fake turns as text: the count lets the user tell."""
    spelled = [text for text in found if text]
    if spelled:
        print(f"note: {len(spelled)} of {len(found)} rows contain the text of a control token (such as "
              f"{spelled[0]}); it is trained on as plain text and cannot end or start a turn. If those rows hold "
              f"conversations already rendered as ChatML, give them as messages instead.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Batching: padding and packing

def pack(rows: list, max_length: int) -> list[Row]:
    """--packing true: several rows in one Row of at most max_length tokens (pack_bins, then concat_rows).

    Each packed row carries segment_ids (1, 2, 3, ... per sample: samples never attend to each
    other) and position_ids that restart at 0 for each sample, so every sample is computed exactly
    as if it were alone."""
    lengths = [len(r["input_ids"]) for r in rows]
    if lengths and max(lengths) > max_length:
        raise DataError(f"A row of {max(lengths)} tokens cannot be packed into rows of --max_length {max_length}.")
    return [concat_rows([rows[i] for i in members]) for members in pack_bins(lengths, max_length)]


def pack_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of rows grouped into bins of at most `budget` tokens (best-fit decreasing: few bins).

    Each row, longest first, goes into the fullest bin that still has room for it, else a new one.
    A row longer than the budget gets a bin of its own."""
    bins: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (tokens still free, bin index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        k = bisect.bisect_left(space, (n, -1))  # the fullest bin that still has room
        free, b = space.pop(k) if k < len(space) else (max(budget, n), len(bins))
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        if free > n:
            bisect.insort(space, (free - n, b))
    return bins


def concat_rows(rows: list) -> Row:
    """Rows one after another in one Row, each sample kept apart: segment_ids 1, 2, 3, ... (a row
    packed already keeps its own samples), position_ids restarting at 0 for each sample.

    The first label of each row is masked: the trainer predicts labels[t] from position t - 1,
    which for a row's first token is the previous row's last token. Alone, a row's first label is
    never predicted either, so the loss is unchanged. Rows or dicts of lists or arrays alike."""
    trained, lengths = [], []
    for r in rows:
        t = np.array(r["labels"]) != IGNORE_INDEX  # a fresh array: the row's own is not changed
        t[0] = False
        trained.append(t)
        lengths += sample_lengths(r)
    ids = np.concatenate([np.asarray(r["input_ids"], dtype=np.int32) for r in rows])
    return Row(ids, np.concatenate(trained), lengths)


def sample_lengths(row) -> list[int]:
    """The lengths of the samples in a row: one, or a packed row's several (from its segment ids)."""
    if "segment_ids" not in row:
        return [len(row["input_ids"])]
    seg = np.asarray(row["segment_ids"])
    starts = np.flatnonzero(seg[1:] != seg[:-1]) + 1
    return np.diff([0, *starts, len(seg)]).tolist()


def collate(rows: list, pad_id: int, pad_to: int = 1) -> dict[str, torch.Tensor]:
    """Rows -> a batch, right-padded to the longest row (rounded up to a multiple of pad_to).

    input_ids (B, T) padded with pad_id; labels (B, T) with -100 on padding; attention_mask (B, T):
    1 on tokens and 0 on padding, or a packed row's segment ids; position_ids (B, T): 0, 1, 2, ...
    per row, or per sample in a packed row (0 on padding)."""
    B, T = len(rows), round_up(max(len(r["input_ids"]) for r in rows), pad_to)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        attention_mask[b, :n] = torch.tensor(r["segment_ids"]) if "segment_ids" in r else 1
        position_ids[b, :n] = torch.tensor(r["position_ids"]) if "position_ids" in r else torch.arange(n)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
