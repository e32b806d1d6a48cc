"""template.py: the chat formats of the Qwen families, one small class each (as ms-swift keeps its
templates), and the choice of one from a checkpoint's own files.

Every Qwen chat is ChatML: each turn is `<|im_start|>ROLE\\n` + its text + `<|im_end|>\\n`, and an
answer is generated after `<|im_start|>assistant\\n`. The families differ in the system prompt written
when a conversation has none, and in thinking:

    --template         models                            system prompt   thinks
    qwen2_5            Qwen2.5-*-Instruct                Qwen's default  never
    qwen3              Qwen3-0.6B ... Qwen3-32B (hybrid) none            unless enable_thinking is false
    qwen3_nothinking   Qwen3-*-Instruct-2507             none            never
    qwen3_thinking     Qwen3-*-Thinking-2507             none            always
    qwen3_5            Qwen3.5-*, Qwen3.6-* (hybrid)     none            unless enable_thinking is false
    qwen3_8            Qwen3.8-* (hybrid)                none            unless enable_thinking is false

A thinking model writes its reasoning before the answer, `<think>\\nREASONING\\n</think>\\n\\nANSWER`;
a hybrid model told not to think gets the empty block `<think>\\n\\n</think>\\n\\n` written for it
after `<|im_start|>assistant\\n`. An assistant message may carry its reasoning that way in its content,
or in a `reasoning_content` field (OpenAI's and ms-swift's name), which wins, as in Qwen's template.

Each template renders a conversation two ways:

    prompt_turns     what the checkpoint's own Jinja chat template writes (transformers'
                     apply_chat_template), for inference: the reasoning of every assistant turn
                     before the last user message is dropped, so a chat's history holds answers
                     only (Qwen3.8's template keeps it).
    training_turns   what ms-swift trains on, so that the same rows give the same loss: every
                     assistant turn keeps its reasoning (but before the last question with
                     --loss_scale last_round or --preserve_thinking false); the hybrid template writes
                     the empty block before an answer that has none (--add_non_thinking_prefix true),
                     and --loss_scale ignore_empty_think (its default there) leaves it out of the loss.

The template comes from the checkpoint's Jinja template (chat_template.jinja or tokenizer_config.json's:
choose_template), else from config.json's model_type, and --template NAME overrides both.
"""

import re
from dataclasses import dataclass, replace
from typing import ClassVar

from checkpoints import chat_template

QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
EMPTY_THINK = "<think>\n\n</think>\n\n"  # what a hybrid model reads when it is told not to think
EMPTY_THINK_RE = re.compile(r"<think>\s*</think>\s*")  # an empty block, as ms-swift's ignore_empty_think finds it
LOSS_SCALES = ("default", "ignore_empty_think", "last_round", "all")  # last_round: only the answers after the last
# question; all: every token (system prompt and questions too)


EFFORTS = {  # Qwen3.8's reasoning_effort: what its template writes first in the system turn when the model thinks
    "xhigh": "Reasoning effort is set to xhigh. Please think carefully through the task, validate key assumptions, "
             "consider plausible alternatives, and prioritize correctness, consistency, and clarity in the final answer.",
    "medium": "",
    "low": "Reasoning effort is set to low. Keep your thinking brief and focused, moving directly to the conclusion "
           "without unnecessary elaboration."}


class TemplateError(Exception):
    """A --template, --enable_thinking, --loss_scale or --reasoning_effort that the model cannot take."""


def think_block(reasoning: str) -> str:
    return "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n"


def split_reasoning(message: dict) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message, read as Qwen3's template reads them: its
    reasoning_content field, else what stands between <think> and </think> in its content."""
    content = message["content"]
    if isinstance(message.get("reasoning_content"), str):
        return message["reasoning_content"], content
    if "</think>" in content:
        before, _, _ = content.partition("</think>")
        return before.rstrip("\n").split("<think>")[-1].lstrip("\n"), content.split("</think>")[-1].lstrip("\n")
    return "", content


def with_reasoning_in_content(message: dict) -> dict:
    """An assistant message whose reasoning_content is written into its content as the template
    writes it (ms-swift drops that field; the same row with the reasoning in its content keeps it)."""
    if not isinstance(message.get("reasoning_content"), str):
        return message
    reasoning, answer = split_reasoning(message)
    return {"role": "assistant", "content": think_block(reasoning) + answer.lstrip("\n")}


def last_query(messages: list[dict]) -> int:
    """The index of the last user message that is not a tool's response (Qwen3's last_query_index)."""
    for i in range(len(messages) - 1, -1, -1):
        text = messages[i]["content"]
        if messages[i]["role"] == "user" and not (text.startswith("<tool_response>") and text.endswith("</tool_response>")):
            return i
    return len(messages) - 1


@dataclass(frozen=True)
class Template:
    """ChatML without thinking (Qwen2.5-Instruct, Qwen3-Instruct-2507), with the settings of a run."""

    name: str
    default_system: str | None = None  # written when a conversation has no system turn of its own
    thinks: str = "never"  # "never", "hybrid" (enable_thinking) or "always"
    system: str | None = None  # --system: "" writes no system turn, None the template's default
    enable_thinking: bool = True  # a hybrid model: think before answering
    loss_scale: str = "default"  # "ignore_empty_think": an empty think block carries no loss
    add_non_thinking_prefix: bool = True  # a hybrid model: write the empty block before an answer that has none
    preserve_thinking: bool | None = None  # the answers before the last question keep their reasoning (None:
    # as the template does, which keeps it where keeps_past_reasoning: ms-swift's TemplateMeta.preserve_thinking)
    keeps_past_reasoning: ClassVar[bool] = False

    def with_system(self, messages: list[dict]) -> list[dict]:
        """The conversation with its system prompt in front: its own, else --system, else the
        template's default. An empty one writes none, as ms-swift renders it: --system '', or the
        row's own "" (which also wins over --system; the Jinja template would write an empty block)."""
        if messages and messages[0]["role"] == "system":
            return list(messages[1:] if messages[0]["content"] == "" else messages)
        if self.system == "":
            return list(messages)
        system = self.default_system if self.system is None else self.system
        return ([{"role": "system", "content": system}] if system is not None else []) + list(messages)

    def prompt_turns(self, messages: list[dict]) -> list[dict]:
        """The turns as the checkpoint's Jinja template writes them: {"role", "content"} each."""
        return [{"role": m["role"], "content": m["content"]} for m in self.with_system(messages)]

    def generation_prompt(self) -> str:
        """What the template writes after `<|im_start|>assistant\\n` for the model to answer."""
        return ""

    def training_turns(self, messages: list[dict]) -> list[dict]:
        """The turns as ms-swift trains on them: {"role", "content"}, and for an assistant turn
        "untrained", how many characters at the start of its content carry no loss (an empty think block)."""
        turns, messages = [], self.with_system([with_reasoning_in_content(m) for m in messages])
        whole, last_round, query = "all" in self.loss_scale, "last_round" in self.loss_scale, last_query(messages)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":  # --loss_scale all: every turn trained whole, its header too
                turns.append({"role": "said", "content": f"{m['role']}\n{m['content']}"} if whole else
                             {"role": m["role"], "content": m["content"]})
                continue
            answer = self.past_answer(m["content"]) if i < query else self.training_answer(m["content"])
            if whole:  # (but an empty think block)
                answer["role"] = "whole"
            elif last_round and i < query:  # only the answers after the last question are trained
                answer = {"role": "past", "content": answer["content"]}
            turns.append(answer)
        return turns

    def past_answer(self, content: str) -> dict:
        """An answer before the last question, as ms-swift writes it (its Template._get_preserve_thinking):
        without its reasoning and empty think block unless preserve_thinking keeps them (unset: where every
        round trains, or the template keeps them itself). Kept where only the last round trains, it is
        context as written, no empty block added (Qwen3.8's template adds one)."""
        last_round, keep = "last_round" in self.loss_scale, self.preserve_thinking
        if keep is None:
            keep = self.keeps_past_reasoning or self.thinks == "never" or not last_round
        if not keep:
            return Template.training_answer(self, content.split("</think>")[-1].strip())
        if last_round and not self.keeps_past_reasoning:  # as written
            return Template.training_answer(self, content)
        return self.training_answer(content)

    def training_answer(self, content: str) -> dict:
        empty = EMPTY_THINK_RE.match(content) if "ignore_empty_think" in self.loss_scale else None
        return {"role": "assistant", "content": content, "untrained": empty.end() if empty else 0}


@dataclass(frozen=True)
class ThinkingTemplate(Template):
    """Qwen3 (hybrid) and Qwen3-Thinking-2507: reasoning in think blocks."""

    def prompt_turns(self, messages: list[dict]) -> list[dict]:
        messages = self.with_system(messages)
        query, turns = last_query(messages), []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                turns.append({"role": m["role"], "content": m["content"]})
                continue
            reasoning, answer = split_reasoning(m)
            # Only the turns after the last question keep their reasoning (the last always gets a block).
            keep = i > query and (i == len(messages) - 1 or reasoning)
            turns.append({"role": "assistant", "content": think_block(reasoning) + answer.lstrip("\n") if keep else answer})
        return turns

    def generation_prompt(self) -> str:
        if self.thinks == "always":
            return "<think>\n"  # Thinking-2507's prompt opens the block itself
        return "" if self.enable_thinking else EMPTY_THINK

    def training_answer(self, content: str) -> dict:
        """An answer as ms-swift trains on it (its ThinkingTemplate): a hybrid model's answer without
        a think block gets the empty one, so that it learns to answer so when told not to think."""
        if self.thinks == "hybrid" and self.add_non_thinking_prefix and not content.startswith("<think>"):
            content = EMPTY_THINK + content
        return super().training_answer(content)


@dataclass(frozen=True)
class Qwen35Template(ThinkingTemplate):
    """Qwen3.5 and Qwen3.6: Qwen3's hybrid format, but the prompt opens the think block itself
    (`<think>\\n`), every text is trimmed, and the answers after the last question always carry a
    block (empty when there is no reasoning). preserve_thinking (Qwen3.6's template) keeps the
    reasoning of every earlier answer too; Qwen3.5's own template ignores it."""

    def with_system(self, messages: list[dict]) -> list[dict]:
        return super().with_system([trimmed(m) for m in messages])

    def prompt_turns(self, messages: list[dict]) -> list[dict]:
        messages = self.with_system(messages)
        query, turns = last_query(messages), []
        for i, m in enumerate(messages):
            reasoning, answer = split_reasoning(m) if m["role"] == "assistant" else ("", m["content"])
            keep = m["role"] == "assistant" and (self.preserve_thinking or i > query)
            turns.append({"role": m["role"], "content": think_block(reasoning.strip()) + answer if keep else answer})
        return turns

    def generation_prompt(self) -> str:
        return "<think>\n" if self.enable_thinking else EMPTY_THINK


@dataclass(frozen=True)
class Qwen38Template(Qwen35Template):
    """Qwen3.8: Qwen3.5's format, but a thinking model's system turn opens with the reasoning effort's
    instruction (EFFORTS), every earlier answer keeps its reasoning unless preserve_thinking is false, and
    a prompt reads it from reasoning_content alone (a think block in the content is text to its template)."""

    reasoning_effort: str = "xhigh"
    keeps_past_reasoning: ClassVar[bool] = True

    def with_system(self, messages: list[dict]) -> list[dict]:  # training rows: as ms-swift's qwen3_8
        return self.with_effort(super().with_system(messages))

    def with_effort(self, messages: list[dict]) -> list[dict]:
        """The system turn opened with the effort's instruction (a turn of its own without one)."""
        effort = EFFORTS[self.reasoning_effort] if self.enable_thinking else ""
        if not effort:
            return messages
        if messages and messages[0]["role"] == "system":
            return [{"role": "system", "content": f"{effort}\n\n{messages[0]['content']}"}, *messages[1:]]
        return [{"role": "system", "content": effort}, *messages]

    def prompt_turns(self, messages: list[dict]) -> list[dict]:
        # trimmed, but not rewritten as Qwen35Template.with_system rewrites a think block in the content
        messages = self.with_effort(Template.with_system(self, [{**m, "content": m["content"].strip()}
                                                                for m in messages]))
        query, turns = last_query(messages), []
        for i, m in enumerate(messages):
            reasoning = m["reasoning_content"] if isinstance(m.get("reasoning_content"), str) else ""
            keep = m["role"] == "assistant" and (self.preserve_thinking is not False or i > query)
            turns.append({"role": m["role"], "content": think_block(reasoning.strip()) + m["content"] if keep
                          else m["content"]})
        return turns


def trimmed(message: dict) -> dict:
    """A message as Qwen3.5's template reads it (and ms-swift's qwen3_5): its text without surrounding
    whitespace, and an assistant's think block rewritten with the template's own newlines."""
    content = message["content"].strip()
    if message["role"] != "assistant":
        return {**message, "content": content}
    if "<think>" in content and "</think>" in content and not isinstance(message.get("reasoning_content"), str):
        reasoning, answer = split_reasoning({"content": content})
        content = think_block(reasoning.strip()) + answer
    return {**message, "content": content}


TEMPLATES = {
    "qwen2_5": Template("qwen2_5", default_system=QWEN25_SYSTEM),
    "qwen3": ThinkingTemplate("qwen3", thinks="hybrid", loss_scale="ignore_empty_think"),
    "qwen3_nothinking": Template("qwen3_nothinking"),
    "qwen3_thinking": ThinkingTemplate("qwen3_thinking", thinks="always"),
    "qwen3_5": Qwen35Template("qwen3_5", thinks="hybrid", loss_scale="ignore_empty_think"),
    "qwen3_8": Qwen38Template("qwen3_8", thinks="hybrid", loss_scale="ignore_empty_think"),
}


def template_name_of(model_dir, model_type: str) -> str:
    """The template of a checkpoint: recognised in its Jinja chat template, else the one of its
    model_type (qwen2: qwen2_5, qwen3: the hybrid qwen3, qwen3_5: qwen3_5, as Qwen3.8's config.json
    is Qwen3.6's)."""
    jinja = chat_template(model_dir, TemplateError)  # (checked: a text, else one paragraph)
    if "reasoning_effort" in jinja and "render_content" in jinja:  # Qwen3.8: Qwen3.5's, with an effort
        return "qwen3_8"
    if "enable_thinking" in jinja and "render_content" in jinja:  # Qwen3.5 / 3.6: vision content, thinking
        return "qwen3_5"
    if "enable_thinking" in jinja:
        return "qwen3"
    if "<|im_start|>assistant\\n<think>\\n" in jinja:  # the generation prompt opens the think block
        return "qwen3_thinking"
    if "You are Qwen, created by Alibaba Cloud" in jinja:
        return "qwen2_5"
    if model_type == "qwen3" and "<|im_start|>" in jinja:  # ChatML that never thinks: Instruct-2507
        return "qwen3_nothinking"
    return {"qwen3": "qwen3", "qwen3_5": "qwen3_5"}.get(model_type, "qwen2_5")


def choose_template(model_dir, model_type: str, name: str | None = None, system: str | None = None,
                    enable_thinking: bool | None = None, loss_scale: str | None = None,
                    add_non_thinking_prefix: bool = True, preserve_thinking: bool | None = None,
                    reasoning_effort: str | None = None) -> Template:
    """The template for this checkpoint (or --template `name`) with the run's settings; a setting
    the template cannot take is a TemplateError that says why."""
    detected = template_name_of(model_dir, model_type)
    name = name or detected
    if name not in TEMPLATES:
        raise TemplateError(f"--template {name}: no such template. The templates here are {', '.join(TEMPLATES)} "
                            f"(ms-swift's names); this checkpoint's own is {detected}. Leave --template out to use it.")
    t = TEMPLATES[name]
    if enable_thinking is not None and enable_thinking != (t.thinks != "never"):
        if t.thinks == "never" and enable_thinking:
            raise TemplateError(f"--enable_thinking true: the {name} template never thinks (a Qwen2.5 or Qwen3-*-Instruct-2507 "
                                "model cannot reason in <think> blocks). Leave the flag out, or use a Qwen3 hybrid "
                                "(Qwen/Qwen3-8B) or Thinking-2507 model.")
        if t.thinks == "always":
            raise TemplateError(f"--enable_thinking false: the {name} template (Qwen3-*-Thinking-2507) always thinks: its "
                                "prompt opens the <think> block. Leave the flag out, or use Qwen3-*-Instruct-2507 "
                                "for answers without reasoning.")
    if preserve_thinking is not None and not isinstance(t, Qwen35Template):
        raise TemplateError(f"--preserve_thinking: the {name} template has no such setting (Qwen3.6's and "
                            "Qwen3.8's templates, qwen3_5 and qwen3_8, have). Leave the flag out.")
    if reasoning_effort is not None and not isinstance(t, Qwen38Template):
        raise TemplateError(f"--reasoning_effort: the {name} template has no such setting (Qwen3.8's template, "
                            "qwen3_8, has). Leave the flag out.")
    if reasoning_effort is not None and reasoning_effort not in EFFORTS:
        raise TemplateError(f"--reasoning_effort {reasoning_effort}: Qwen3.8's template takes xhigh (its default), "
                            "medium or low.")
    settings = {"preserve_thinking": preserve_thinking, "reasoning_effort": reasoning_effort}
    t = replace(t, **{k: v for k, v in settings.items() if v is not None})
    if loss_scale is not None and loss_scale not in LOSS_SCALES:
        raise TemplateError(f"--loss_scale {loss_scale}: the loss scales here are {', '.join(LOSS_SCALES)}.")
    if t.thinks == "hybrid" and loss_scale in ("default", "last_round", "all"):  # ms-swift >= 4.3.1 adds it for hybrid models
        loss_scale = "ignore_empty_think" if loss_scale == "default" else f"{loss_scale}+ignore_empty_think"
    return replace(t, system=system, enable_thinking=t.enable_thinking if enable_thinking is None else enable_thinking,
                   loss_scale=loss_scale or t.loss_scale, add_non_thinking_prefix=add_non_thinking_prefix)


def with_trained_thinking(template: Template, args: dict) -> Template:
    """The template thinking, or not, as a model trained with these args.json settings (ours or
    ms-swift's) was trained to answer: its recorded enable_thinking; else, in the hybrid template,
    not thinking when its rows had the empty think block written before each answer without
    reasoning (--add_non_thinking_prefix, on unless turned off). Such a model learned its answers
    after that block: asked to think first, it reasons as its base did and may answer as the base
    did too. (ms-swift's infer answers without thinking in the hybrid template, for this reason.)"""
    if template.thinks != "hybrid":
        return template
    recorded = args.get("enable_thinking")
    if not isinstance(recorded, bool) and args.get("template") in ("qwen3", "qwen3_5", "qwen3_8"):
        recorded = not args.get("add_non_thinking_prefix", True)
    return replace(template, enable_thinking=recorded) if isinstance(recorded, bool) else template
