"""Prompts in, text out: encoding the three prompt forms, and incremental detokenization
with stop strings."""

from __future__ import annotations

from typing import Any, Sequence

from tierflow.errors import PromptError

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


def encode_prompt(prompt: Prompt, tokenizer: Any, vocab_size: int) -> list[int]:
    """``str`` → tokenizer's default encoding; ``list[int]`` → as given; chat messages →
    the checkpoint's chat template with the generation prompt appended."""
    if isinstance(prompt, str):
        if not prompt:
            raise PromptError("the prompt is empty; pass some text, token ids or chat messages")
        ids = list(_need_tokenizer(tokenizer, "a text prompt")(prompt)["input_ids"])
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        ids = _chat_ids(list(prompt), _need_tokenizer(tokenizer, "chat messages"))
    elif isinstance(prompt, Sequence) and not isinstance(prompt, (bytes, bytearray)):
        ids = list(prompt)
        if not ids:
            raise PromptError("the prompt is empty; pass some text, token ids or chat messages")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise PromptError(f"token ids must be ints in [0, {vocab_size}); found {bad[:5]}")
    else:
        raise PromptError(f"a prompt is a str, a list of token ids or a list of chat messages, "
                          f"got {type(prompt).__name__}")
    if not ids:
        raise PromptError("the prompt encodes to no tokens; pass some text")
    return ids


def _need_tokenizer(tokenizer: Any, what: str) -> Any:
    if tokenizer is None:
        raise PromptError(f"this checkpoint has no tokenizer, so {what} cannot be encoded; pass token ids")
    return tokenizer


def _chat_ids(messages: list[dict[str, Any]], tokenizer: Any) -> list[int]:
    for i, m in enumerate(messages):
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise PromptError(f"chat message {i} must have string 'role' and 'content', got {m!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this checkpoint's tokenizer has no chat template; pass a text prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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
