"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (plain and SSE
streaming), /health, /metrics (Prometheus text). Errors use OpenAI's shape:
{"error": {"message", "type", "param", "code"}} with 400 (bad parameter, named in `param`), 401 (API key),
404 (unknown model or route), 413 (body too large) and 500 (the engine failed).

Requests are bounded before any work: the body size (ServeConfig.max_body_bytes), n == 1, max_tokens,
and prompt tokens + max_tokens within the context. A client that disconnects mid-stream cancels its
request: its batch row is freed at the next step.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import MoeOffloadError
from ..generate import SamplingParams, TextStreamer
from .chat import ChatTemplate
from .engine import Engine

if TYPE_CHECKING:
    from ..runtime import OffloadedModel


@dataclass(frozen=True)
class ServeConfig:
    """Server settings; validated on construction."""

    model_id: str = "moe-offload"
    max_batch: int = 8
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise MoeOffloadError(f"--max-batch must be an integer >= 1, got {self.max_batch!r}")
        if self.api_key is not None and not self.api_key:
            raise MoeOffloadError("--api-key must not be empty")
        if self.max_body_bytes < 1024:
            raise MoeOffloadError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "cancelled": "stop",
          "error": "error"}


def create_app(om: "OffloadedModel", cfg: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving `om`; its engine thread starts now and stops at app shutdown."""
    cfg = cfg or ServeConfig()
    engine = Engine(om, cfg.max_batch)
    template = ChatTemplate.from_model_dir(om.path)
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # at server shutdown

    app = FastAPI(title="moe_offload", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine = engine

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if cfg.api_key is not None and path != "/health":
            if request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                return ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                code="invalid_api_key").response()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            return ApiError(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}",
                            code="request_too_large").response()
        engine.counters.requests[path] = engine.counters.requests.get(path, 0) + 1
        try:
            return await call_next(request)
        except ApiError as exc:
            return exc.response()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        engine.counters.errors[exc.status] = engine.counters.errors.get(exc.status, 0) + 1
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.error is None else "degraded", "model": cfg.model_id}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": cfg.model_id, "object": "model", "created": int(started),
                                            "owned_by": "moe_offload"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, cfg)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = om.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise ApiError(400, "prompt must be a string or a list of token ids", "prompt")
        return await _respond(body, ids, "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, cfg)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise ApiError(400, "messages must be a non-empty list of {role, content} objects with string "
                                "content", "messages")
        if template is None:
            raise ApiError(400, f"this model has no chat template (no chat_template in {om.path}/"
                                "tokenizer_config.json); use /v1/completions", "messages",
                           code="missing_chat_template")
        try:
            text = template.render(messages, add_generation_prompt=True)
        except MoeOffloadError as exc:
            raise ApiError(400, str(exc), "messages") from None
        return await _respond(body, om.encode(text), "chat.completion", request)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(om, engine), media_type="text/plain; version=0.0.4")

    async def _respond(body: dict[str, Any], ids: list[int], kind: str, request: Request):
        params, stops = _params(body, cfg, len(ids), om.runtime.max_seq_len)
        if not om.config.vocab_size > max(ids) or min(ids) < 0:
            raise ApiError(400, f"prompt token ids must be in [0, {om.config.vocab_size})", "prompt")
        rid = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        stream = engine.submit(ids, params)
        if body.get("stream"):
            return StreamingResponse(_sse(stream, stops, rid, kind, len(ids), request),
                                     media_type="text/event-stream")
        try:
            text, n, reason = await _collect(stream, stops)
        finally:
            stream.cancel()
        if reason == "error":
            raise ApiError(500, f"the engine failed: {engine.error}", kind="server_error")
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        choice: dict[str, Any] = {"index": 0, "finish_reason": FINISH[reason], "logprobs": None}
        if kind == "text_completion":
            choice["text"] = text
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return {"id": rid, "object": kind, "created": int(time.time()), "model": cfg.model_id,
                "choices": [choice], "usage": usage}

    async def _collect(stream, stops: list[str]) -> tuple[str, int, str]:
        streamer, n = TextStreamer(om.decode), 0
        async for tok in stream:
            n += 1
            streamer.push(tok)
            cut = _stop_at(streamer.text, stops)
            if cut is not None:
                return streamer.text[:cut], n, "stop"
        streamer.finish()
        return streamer.text, n, stream.request.finish_reason or "length"

    async def _sse(stream, stops: list[str], rid: str, kind: str, n_prompt: int, request: Request
                   ) -> AsyncIterator[str]:
        chunk_kind = "text_completion" if kind == "text_completion" else "chat.completion.chunk"
        created = int(time.time())

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
            if kind == "text_completion":
                c: dict[str, Any] = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            else:
                d: dict[str, Any] = {"role": "assistant"} if first else {}
                if delta:
                    d["content"] = delta
                c = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": chunk_kind, "created": created,
                                          "model": cfg.model_id, "choices": [c]}) + "\n\n"

        streamer, sent, n, reason = TextStreamer(om.decode), 0, 0, None
        try:
            if kind != "text_completion":
                yield chunk(None, None, first=True)
            async for tok in stream:
                n += 1
                streamer.push(tok)
                cut = _stop_at(streamer.text, stops)
                end = len(streamer.text) if cut is None else cut
                if end > sent:
                    yield chunk(streamer.text[sent:end], None)
                    sent = end
                if cut is not None:
                    reason = "stop"
                    break
            if reason is None:
                streamer.finish()
                if len(streamer.text) > sent:
                    yield chunk(streamer.text[sent:], None)
                reason = stream.request.finish_reason or "length"
            yield chunk(None, FINISH[reason])
            yield "data: [DONE]\n\n"
        finally:  # normal end, stop string, or the client went away (the generator is closed)
            stream.cancel()

    return app


async def _body(request: Request, cfg: ServeConfig) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > cfg.max_body_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {cfg.max_body_bytes}",
                       code="request_too_large")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if body.get("model") != cfg.model_id:
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "model is required (see GET /v1/models)", "model")
        raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {cfg.model_id!r}",
                       "model", code="model_not_found")
    return body


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ApiError(400, f"{name} must be a number in [{lo}, {hi}], got {v!r}", name)
    return float(v)


def _params(body: dict[str, Any], cfg: ServeConfig, n_prompt: int, context: int) -> tuple[SamplingParams, list[str]]:
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, f"n must be 1 (one choice per request), got {n!r}", "n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", cfg.default_max_tokens))
    if max_tokens is None:
        max_tokens = context - n_prompt
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ApiError(400, f"max_tokens must be an integer >= 0, got {max_tokens!r}", "max_tokens")
    if n_prompt + max_tokens > context:
        raise ApiError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                            f"{context} tokens", "max_tokens" if n_prompt < context else "prompt",
                       code="context_length_exceeded")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be > 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"seed must be an integer in [0, 2**63), got {seed!r}", "seed")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", "stop")
    try:
        params = SamplingParams(max_tokens, temperature if temperature >= 1e-6 else 0.0, top_p, seed)
    except MoeOffloadError as exc:
        raise ApiError(400, str(exc)) from None
    return params, stops


def _stop_at(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _metrics(om: "OffloadedModel", engine: Engine) -> str:
    c = engine.counters
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP moe_offload_{name} {help_}")
        lines.append(f"# TYPE moe_offload_{name} {kind}")
        lines.extend(f"moe_offload_{name}{labels} {value:g}" for labels, value in samples)

    metric("requests_total", "counter", "HTTP requests by path.",
           [(f'{{path="{p}"}}', v) for p, v in sorted(c.requests.items())] or [("", 0)])
    metric("errors_total", "counter", "Error responses by HTTP status.",
           [(f'{{status="{s}"}}', v) for s, v in sorted(c.errors.items())] or [("", 0)])
    metric("prompt_tokens_total", "counter", "Prompt tokens submitted.", [("", c.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated and sent.", [("", c.generation_tokens)])
    metric("cancelled_requests_total", "counter", "Requests cancelled (client gone or stop string).",
           [("", c.cancelled)])
    metric("tokens_per_second", "gauge", "Generated tokens per second of engine busy time.",
           [("", c.generation_tokens / c.busy_seconds if c.busy_seconds > 0 else 0.0)])
    metric("queue_length", "gauge", "Requests waiting for a batch row.", [("", engine.scheduler.queue_length)])
    metric("active_requests", "gauge", "Requests decoding in the batch.", [("", engine.active)])
    cache = om.expert_cache
    if cache is not None:
        st = cache.stats
        metric("expert_cache_hits_total", "counter", "Routed experts found resident.", [("", int(st.hits.sum()))])
        metric("expert_cache_misses_total", "counter", "Routed experts copied on demand.", [("", int(st.misses.sum()))])
        metric("expert_cache_bytes_h2d_total", "counter", "Expert bytes copied host to device.",
               [("", int(st.bytes_h2d.sum()))])
        metric("expert_prefetch_hits_total", "counter", "Hits on prefetched experts.",
               [("", int(st.prefetch_hits.sum()))])
    return "\n".join(lines) + "\n"
