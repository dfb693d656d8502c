"""Request parsing for /v1/completions and /v1/chat/completions: every field is either honoured or
refused with a 400 that names it (`param`); null means unset for every optional field.

Refused (400, named): tools / tool_choice (other than none), functions / function_call,
response_format other than {"type": "text"}, best_of other than n, suffix, any field not listed below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import MoeOffloadError
from ..generate import MIN_TEMPERATURE, SamplingParams
from ..validate import SEED_MAX


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


SAMPLING = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stream_options", "stop",
            "stop_token_ids", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
            "min_tokens", "seed", "user", "logprobs"}
COMPLETION_FIELDS = SAMPLING | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = SAMPLING | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                          "parallel_tool_calls", "response_format"}
MAX_CHOICES = 256  # prompts x n in one request
MAX_LOGPROBS = 20


@dataclass
class Job:
    """One parsed request: its prompts (token ids) and everything that shapes the choices."""

    kind: str  # "text_completion" | "chat.completion"
    prompts: list[list[int]] = field(default_factory=list)
    prompt_texts: list[str | None] = field(default_factory=list)
    n: int = 1
    max_tokens: int | None = None  # None: up to the context (chat) / 16 clipped to it (completions)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    stop_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_tokens: int = 0
    logprobs: int | None = None  # top-k per token; None: no logprobs
    echo: bool = False
    stream: bool = False
    include_usage: bool = False

    def params(self, max_tokens: int, choice: int) -> SamplingParams:
        seed = None if self.seed is None else (self.seed + choice) % SEED_MAX
        t = self.temperature if self.temperature >= MIN_TEMPERATURE else 0.0
        try:
            return SamplingParams(max_tokens, t, self.top_p, seed)
        except MoeOffloadError as exc:
            raise ApiError(400, str(exc)) from None


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, got {v!r}", name)
    return v


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ApiError(400, f"{name} must be an integer {rng}, got {v!r}", name)
    return v


def _num(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
            or (lo_open and v == lo):
        raise ApiError(400, f"{name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}", name)
    return float(v)


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for k in body:
        if k not in allowed:
            raise ApiError(400, f"unsupported parameter {k!r}: this server does not implement it (the "
                                "request would not be honoured)", k, code="unsupported_parameter")


def parse_common(body: dict[str, Any], job: Job, vocab: int, eos_ids: tuple[int, ...]) -> None:
    job.stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not job.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(so, dict):
            raise ApiError(400, "stream_options must be an object", "stream_options")
        for k in so:
            if k != "include_usage":
                raise ApiError(400, f"unsupported stream_options field {k!r}", f"stream_options.{k}",
                               code="unsupported_parameter")
        job.include_usage = _bool(so, "include_usage")
    job.n = _int(body, "n", 1, 128) or 1
    job.temperature = _num(body, "temperature", 1.0, 0.0, 2.0)
    job.top_p = _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    top_k = _int(body, "top_k", -1, vocab)
    job.top_k = 0 if top_k in (None, -1) else top_k
    seed = _int(body, "seed", 0, SEED_MAX - 1)
    job.seed = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else ([] if stop is None else stop)
    if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 16 of them", "stop")
    job.stops = stops
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise ApiError(400, f"stop_token_ids must be a list of token ids in [0, {vocab})", "stop_token_ids")
        job.stop_ids = list(ids)
    job.presence_penalty = _num(body, "presence_penalty", 0.0, -2.0, 2.0)
    job.frequency_penalty = _num(body, "frequency_penalty", 0.0, -2.0, 2.0)
    job.repetition_penalty = _num(body, "repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict) or len(bias) > 300:
            raise ApiError(400, "logit_bias must be an object {token id: bias} of at most 300 entries", "logit_bias")
        for k, v in bias.items():
            try:
                tid = int(k)
            except ValueError:
                tid = -1
            if not 0 <= tid < vocab or str(tid) != str(k).strip():
                raise ApiError(400, f"logit_bias: {k!r} is not a token id in [0, {vocab})", "logit_bias")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise ApiError(400, f"logit_bias: the bias of {k} must be a number in [-100, 100], got {v!r}",
                               "logit_bias")
            job.logit_bias[tid] = float(v)
    job.min_tokens = _int(body, "min_tokens", 0) or 0
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise ApiError(400, "user must be a string", "user")


def parse_max_tokens(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:  # the first non-null wins (max_completion_tokens over max_tokens)
        v = _int(body, name, 0)
        if v is not None:
            return v
    return None


def parse_completion(body: dict[str, Any], vocab: int, eos_ids: tuple[int, ...]) -> tuple[Job, Any]:
    check_fields(body, COMPLETION_FIELDS)
    job = Job("text_completion")
    parse_common(body, job, vocab, eos_ids)
    job.max_tokens = parse_max_tokens(body, ("max_tokens",))
    job.echo = _bool(body, "echo")
    job.logprobs = _int(body, "logprobs", 0, MAX_LOGPROBS)
    best_of = _int(body, "best_of", 1)
    if best_of is not None and best_of != job.n:
        raise ApiError(400, "best_of is not supported (only best_of == n, which returns every choice)", "best_of",
                       code="unsupported_parameter")
    if body.get("suffix") is not None:
        raise ApiError(400, "suffix (insertion) is not supported", "suffix", code="unsupported_parameter")
    return job, body.get("prompt")


def parse_chat(body: dict[str, Any], vocab: int, eos_ids: tuple[int, ...]) -> tuple[Job, list[dict[str, Any]]]:
    check_fields(body, CHAT_FIELDS)
    job = Job("chat.completion")
    parse_common(body, job, vocab, eos_ids)
    job.max_tokens = parse_max_tokens(body, ("max_completion_tokens", "max_tokens"))
    want = body.get("logprobs")
    if want is not None and not isinstance(want, bool):
        raise ApiError(400, f"logprobs must be true or false for chat, got {want!r}", "logprobs")
    top = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise ApiError(400, "top_logprobs requires logprobs: true", "top_logprobs")
    job.logprobs = (top or 0) if want else None
    tools = body.get("tools")
    if tools not in (None, []):
        raise ApiError(400, "tools are not supported by this server (no tool-call parsing)", "tools",
                       code="unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise ApiError(400, "tool_choice is not supported (only \"none\")", "tool_choice",
                       code="unsupported_parameter")
    if body.get("parallel_tool_calls") not in (None, False, True) or (body.get("parallel_tool_calls") and tools):
        raise ApiError(400, "parallel_tool_calls is not supported", "parallel_tool_calls")
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise ApiError(400, "response_format other than {\"type\": \"text\"} is not supported (no constrained "
                            "decoding)", "response_format", code="unsupported_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role", f"messages[{i}]")
        for k in m:
            if k not in ("role", "content", "name"):
                raise ApiError(400, f"messages[{i}].{k} is not supported", f"messages[{i}].{k}",
                               code="unsupported_parameter")
        out.append({**m, "content": _content(m.get("content"), i, m["role"])})
    return job, out


def _content(c: Any, i: int, role: str) -> str:
    if isinstance(c, str):
        return c
    if c is None and role == "assistant":
        return ""
    if isinstance(c, list):
        texts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"messages[{i}].content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                    "...}) are supported", f"messages[{i}].content[{j}]")
            if set(part) - {"type", "text"}:
                raise ApiError(400, f"messages[{i}].content[{j}] has unsupported fields "
                                    f"{sorted(set(part) - {'type', 'text'})}", f"messages[{i}].content[{j}]")
            texts.append(part["text"])
        return "\n".join(texts)  # vLLM joins text parts with newlines
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def has_surrogates(x: Any) -> bool:
    if isinstance(x, str):
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(x, dict):
        return any(has_surrogates(k) or has_surrogates(v) for k, v in x.items())
    if isinstance(x, list):
        return any(has_surrogates(v) for v in x)
    return False
