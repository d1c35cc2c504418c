"""The request bodies of the OpenAI API that ``tierflow serve`` accepts, as pydantic models.

Every field of the OpenAI request is either honoured or refused: a field tierflow does not know
is refused by the schema (``extra="forbid"``), and a known field tierflow cannot honour (``n`` > 1,
``tools``, a ``response_format`` other than text, penalties, ``logit_bias``) is accepted by the
schema only at its neutral value, else refused with the field's name — never silently ignored.
Three fields of vLLM's and llama.cpp's servers are accepted as extensions: ``top_k``,
``ignore_eos`` and ``stop_token_ids``.

``to_params`` turns a validated body into ``SamplingParams``; the engine's own checks (the
prompt, the context window, the vocabulary) run when the request is submitted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tierflow.config import SamplingParams
from tierflow.errors import UnsupportedRequestError as Unsupported

MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str


NonNegInt = Annotated[int, Field(ge=0, strict=True)]


class _Sampling(_Body):
    """Fields both endpoints share."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM, llama.cpp)
    top_k: NonNegInt | None = None
    ignore_eos: bool = False
    stop_token_ids: list[NonNegInt] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    def refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise Unsupported("n", f"n={self.n} is not supported: tierflow returns one choice per request; "
                                   "send n separate requests (they share each weight sweep)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise Unsupported(name, f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed with stream=true")

    def sampling(self, max_new_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0, seed=self.seed,
            stop=stop, stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise Unsupported("tools", "tools (function calling) are not supported")
        if self.tool_choice not in (None, "none"):
            raise Unsupported("tool_choice", "tool_choice is not supported (tools are not)")
        if self.parallel_tool_calls:
            raise Unsupported("parallel_tool_calls", "parallel_tool_calls is not supported (tools are not)")
        if self.response_format is not None and self.response_format.type != "text":
            raise Unsupported("response_format", f"response_format {self.response_format.type!r} is not "
                                                 "supported (only 'text')")
        for i, m in enumerate(self.messages):
            if m.name is not None:
                raise Unsupported(f"messages.{i}.name", "message names are not supported")

    def chat(self) -> list[dict[str, str]]:
        """The messages as the engine takes them, roles as sent: "developer" (the newer name of
        "system") stays "developer" where the checkpoint's template knows it (gpt-oss's Harmony)
        and is read as "system" where it does not, a decision the engine makes
        (``tierflow.engine.requests``), where the template is known."""
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def max_new_tokens(self) -> int | None:
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise Unsupported("max_tokens", "max_tokens and max_completion_tokens disagree; send one of them")
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[NonNegInt] | list[str] | list[list[NonNegInt]]
    max_tokens: int | None = Field(default=16, ge=1, strict=True)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise Unsupported("best_of", "best_of is not supported (only 1)")
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)) \
                and len(self.prompt) != 1:
            raise Unsupported("prompt", f"a batch of {len(self.prompt)} prompts is not supported; send one "
                                        "request per prompt (they share each weight sweep)")

    def engine_prompt(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]
