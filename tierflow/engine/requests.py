"""What the engine keeps per request, and the request's text in and out.

``Request`` is the driver's record of one request: its tokens, sampling state, KV handle and
outcome. ``encode_prompt`` turns the three prompt forms (text, token ids, chat messages) into
ids, and refuses with a PromptError that names the message or position anything the tokenizer
or the chat template would otherwise trip on (a lone surrogate, an unknown role, a non-int id);
``Detokenizer`` turns generated ids into text deltas with stop strings; ``deadline_after``
turns a request's ``timeout_s`` into a loop deadline.

Chat roles. The checkpoint's own template renders the messages (gpt-oss's Harmony template, a
Llama or ChatML one), so the roles tierflow accepts are the ones every chat API has: system,
developer, user, assistant; a template's own refusal (its ``raise_exception``) is a PromptError.
"developer" is the newer name of "system" (OpenAI's): it stays "developer" for a template that
names the role as a string literal (Harmony renders it as the "# Instructions" of its developer
message), and becomes "system" for one that does not, which would otherwise print an unknown
role's name into the prompt. The decision is made here, where the template is known, so the HTTP
server and in-process callers get the same prompt. A template may also drop a message without
raising (Harmony renders only the first system or developer message); instructions that do not
appear in the rendered prompt are a PromptError rather than a prompt silently without them.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tierflow.config import SamplingParams
from tierflow.config.checks import show
from tierflow.errors import ConfigError, PromptError, SamplingError
from tierflow.outputs import TokenLogprob
from tierflow.tiers.kv.handle import KVHandle

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]
# Tool messages are left out: a tool call's assistant message has no string content (it carries
# tool_calls instead), which these checks refuse, so a tool result would answer nothing.
CHAT_ROLES = ("system", "user", "assistant", "developer")
INSTRUCTION_ROLES = ("system", "developer")   # their text must reach the prompt (see _check_rendered)


@dataclass(eq=False)
class Request:
    id: int
    prompt_ids: list[int]
    params: SamplingParams
    kv: KVHandle                              # SequenceKV, or PagedSequenceKV with a paged KV cache
    detok: Detokenizer
    generator: torch.Generator | None
    score: bool = False                       # return prompt logits instead of generating
    most_tokens: int = 0                      # the most tokens (prompt and generated) it may reach
    output_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)   # per output token, when params.logprobs is set
    finish_reason: str | None = None
    error: BaseException | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float = 0.0
    finished_s: float = 0.0
    cached_tokens: int = 0                    # prompt tokens whose KV came from the prefix cache
    remembered_blocks: int = 0                # full KV blocks offered to the prefix cache so far
    preemptions: int = 0                      # times its KV was dropped to make room (then recomputed)
    prompt_done: int = 0                      # prompt tokens prefilled so far (counted once, recomputed or not)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def token(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


def deadline_after(timeout_s: float | None) -> float | None:
    """The loop time ``timeout_s`` from now (None: no deadline); ConfigError for a bad value."""
    if timeout_s is None:
        return None
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a number of seconds > 0 or None, got {timeout_s!r}")
    return asyncio.get_running_loop().time() + timeout_s



def encode_prompt(prompt: Prompt, tokenizer: Any, vocab_size: int) -> list[int]:
    """``str`` → tokenizer's default encoding; ``list[int]`` → as given, each id in
    [0, vocab_size); chat messages (a list of ``{"role", "content"}`` dicts, role one of
    ``CHAT_ROLES``; "developer" read as "system" by a template that does not name it) → the
    checkpoint's chat template with the generation prompt appended.
    Text must be valid Unicode (no lone surrogate). Anything else is a PromptError that says
    what was found and where."""
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is empty; pass some text, token ids or chat messages")
        _check_unicode(prompt, "the prompt")
        ids = list(_need_tokenizer(tokenizer, "a text prompt")(prompt)["input_ids"])
    elif isinstance(prompt, Mapping):
        raise PromptError("the prompt is a single dict; chat messages go in a list: [{'role': 'user', 'content': ...}]")
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        if not prompt:
            raise PromptError("the prompt is empty; pass some text, token ids or chat messages")
        if any(isinstance(m, Mapping) for m in prompt):
            ids = _chat_ids(list(prompt), tokenizer)
        else:
            ids = _token_ids(list(prompt), vocab_size)
    else:
        raise PromptError(f"a prompt is a str, a list of token ids or a list of chat messages, "
                          f"got {type(prompt).__name__}")
    if not ids:
        raise PromptError("the prompt encodes to no tokens; pass some text")
    return ids


def check_stop_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """A stop token the model cannot produce would never stop anything: a SamplingError."""
    bad = [i for i in params.stop_token_ids if i >= vocab_size]
    if bad:
        raise SamplingError(f"SamplingParams.stop_token_ids holds {_show_list(bad)}, beyond this model's vocabulary "
                            f"of {vocab_size} tokens (ids 0 to {vocab_size - 1}); pass ids below {vocab_size}")


def _token_ids(ids: list[Any], vocab_size: int) -> list[int]:
    bad = [(i, t) for i, t in enumerate(ids) if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        where = ", ".join(f"{show(t)} at position {i}" for i, t in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PromptError(f"token ids must be ints in [0, {vocab_size}) (this model's vocabulary); found {where}{more}")
    return ids


def _show_list(values: list[Any]) -> str:
    return ", ".join(show(v) for v in values[:5]) + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def _check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(f"{where} is not valid Unicode: it holds a lone surrogate {text[exc.start]!r} at character "
                          f"{exc.start} (text decoded with errors='surrogateescape', or a broken \\u escape); pass "
                          f"valid text") from None


def _need_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise PromptError(f"this checkpoint has no tokenizer, so {what} cannot be encoded; pass token ids")
    return tokenizer


def _check_messages(messages: list[Any]) -> None:
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise PromptError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__} "
                              f"{show(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise PromptError(f"chat message {i} must have string 'role' and 'content', got {show(m)}")
        if role not in CHAT_ROLES:
            raise PromptError(f"chat message {i} has role {show(role)}; the roles are {', '.join(CHAT_ROLES)}")
        for key, value in m.items():
            if isinstance(value, str):
                _check_unicode(value, f"chat message {i}'s {show(key)}")


def _chat_ids(messages: list[Any], tokenizer: Any) -> list[int]:
    from jinja2 import TemplateError

    _check_messages(messages)
    tokenizer = _need_tokenizer(tokenizer, "chat messages")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise PromptError("this checkpoint's tokenizer has no chat template; pass a text prompt instead")
    try:
        text = tokenizer.apply_chat_template([_with_role(m, template) for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as exc:         # the template's raise_exception(...), e.g. roles that must alternate
        raise PromptError(f"the checkpoint's chat template refused these messages: {exc}") from None
    _check_rendered(messages, text)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_names_role(template: str | Mapping[str, str], role: str) -> bool:
    """Whether a chat template (or any of a tokenizer's named templates) compares against or
    prints ``role`` as a quoted string literal: ``message.role == "developer"``."""
    sources = [template] if isinstance(template, str) else [t for t in template.values() if isinstance(t, str)]
    literal = re.compile(rf"""(['"]){re.escape(role)}\1""")
    return any(literal.search(source) for source in sources)


def _with_role(message: Mapping[str, Any], template: str | Mapping[str, str]) -> dict[str, Any]:
    message = dict(message)
    if message["role"] == "developer" and not _template_names_role(template, "developer"):
        message["role"] = "system"
    return message


def _check_rendered(messages: list[Mapping[str, Any]], text: str) -> None:
    for i, m in enumerate(messages):
        content = m["content"].strip()      # templates may trim
        if m["role"] in INSTRUCTION_ROLES and content and content not in text:
            raise PromptError(f"the checkpoint's chat template left chat message {i} (role {show(m['role'])}) out "
                              f"of the prompt: its text is not in what the template rendered (gpt-oss's template, "
                              f"for one, renders only the first system or developer message); put all the "
                              f"instructions in one message, the first")


class Detokenizer:
    """Turns generated ids into text deltas as they arrive, holding back what could still
    change (an incomplete UTF-8 sequence, the start of a stop string)."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self._tokenizer, self._stop = tokenizer, stop
        self._ids: list[int] = []
        self._prefix = self._read = 0
        self.text = ""          # all decoded text so far (stop string cut off once found)
        self._emitted = 0
        self.stopped = False

    def add(self, token_id: int) -> None:
        if self._tokenizer is None or self.stopped:
            return
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
            hits = [i for s in self._stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def take(self, final: bool) -> str:
        """Text not yet handed out; unless ``final``, minus a tail that may begin a stop string."""
        hold = 0 if final or self.stopped else max((len(s) - 1 for s in self._stop), default=0)
        end = max(self._emitted, len(self.text) - hold)
        delta, self._emitted = self.text[self._emitted:end], end
        return delta
