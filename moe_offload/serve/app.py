"""The OpenAI-compatible routes: /v1/models, /v1/models/{id}, /v1/completions, /v1/chat/completions (plain
and SSE streaming), /health, /metrics (Prometheus text).

Every error has OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 (a bad or unsupported
parameter, named in `param`: nothing is silently dropped, see serve/protocol.py), 401 (API key), 404
(unknown model or route), 405 (method), 408 (body too slow), 413 (body too large, checked while
reading), 422, 500 (the engine failed).

Completions take a prompt as a string, a list of strings, a list of token ids or a list of lists; `n`
choices per prompt; `echo` with prompt logprobs (also with max_tokens 0); `logprobs` up to 20 (the
model's own distribution, as vLLM returns it). Stop strings are held back while streaming: text that
could be the start of a stop string is sent only once it cannot be, so the concatenated stream equals the
non-streamed text. A client that disconnects cancels its request (streaming or not): its batch row is
freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MoeOffloadError
from ..generate import TextStreamer
from .chat import ChatTemplate
from .engine import Engine
from .protocol import MAX_CHOICES, ApiError, Job, has_surrogates, parse_chat, parse_completion
from .sampling import ChoiceSampler
from .tokens import ServerTokenizer, wrap_contents

if TYPE_CHECKING:
    from ..runtime import OffloadedModel

__all__ = ["ApiError", "ServeConfig", "create_app"]


@dataclass(frozen=True)
class ServeConfig:
    """Server settings; validated on construction. `header_timeout_s`: a request's headers must arrive
    within this many seconds of the connection opening or the previous response (else 408 and the
    connection is closed; serve.http); `body_timeout_s`: its body within this many seconds of the
    headers (else 408)."""

    model_id: str = "moe-offload"
    max_batch: int = 8
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 16  # completions (OpenAI's and vLLM's default); chat: up to the context
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise MoeOffloadError(f"--max-batch must be an integer >= 1, got {self.max_batch!r}")
        if self.api_key is not None and not self.api_key:
            raise MoeOffloadError("--api-key must not be empty")
        if self.max_body_bytes < 1024:
            raise MoeOffloadError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if not self.body_timeout_s > 0:
            raise MoeOffloadError(f"body_timeout_s must be > 0, got {self.body_timeout_s}")
        if not self.header_timeout_s > 0:
            raise MoeOffloadError(f"header_timeout_s must be > 0, got {self.header_timeout_s}")


FINISH = {"eos": "stop", "stop": "stop", "stop_id": "stop", "length": "length", "context": "length",
          "cancelled": "stop", "error": "error"}


def _error(status: int, message: str, param: str | None = None, code: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(ApiError(status, message, param, code, kind).body(), status_code=status)


class Guard:
    """Pure ASGI middleware: API key, body size (Content-Length and while reading), body timeout, and the
    per-route counters / latency histogram (labels are route templates: a fixed set)."""

    def __init__(self, app, cfg: ServeConfig, engine: Engine):
        self.app, self.cfg, self.engine = app, cfg, engine

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, counters = self.cfg, self.engine.counters
        t0, status = time.perf_counter(), [500]

        async def send_wrap(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if cfg.api_key is not None and scope["path"] != "/health" and \
                    headers.get("authorization") != f"Bearer {cfg.api_key}":
                return await _error(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                    code="invalid_api_key")(scope, receive, send_wrap)
            size = headers.get("content-length")
            if size is not None and size.strip().isdigit() and int(size) > cfg.max_body_bytes:
                return await _error(413, f"request body of {size} bytes exceeds the limit of {cfg.max_body_bytes}",
                                    code="request_too_large")(scope, receive, send_wrap)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = bytearray()
                deadline = time.monotonic() + cfg.body_timeout_s
                while True:
                    left = deadline - time.monotonic()
                    try:
                        if left <= 0:
                            raise asyncio.TimeoutError
                        msg = await asyncio.wait_for(receive(), left)
                    except asyncio.TimeoutError:
                        return await _error(408, f"the request body did not arrive within {cfg.body_timeout_s:g} s",
                                            code="request_timeout")(scope, receive, send_wrap)
                    if msg["type"] == "http.disconnect":
                        status[0] = 499
                        return
                    body += msg.get("body", b"")
                    if len(body) > cfg.max_body_bytes:
                        return await _error(413, f"request body exceeds the limit of {cfg.max_body_bytes} bytes",
                                            code="request_too_large")(scope, receive, send_wrap)
                    if not msg.get("more_body", False):
                        break
                replayed = [False]

                async def replay():
                    if not replayed[0]:
                        replayed[0] = True
                        return {"type": "http.request", "body": bytes(body), "more_body": False}
                    return await receive()  # after the body: waits for the disconnect

                return await self.app(scope, replay, send_wrap)
            return await self.app(scope, receive, send_wrap)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            key = (label, status[0])
            counters.requests[key] = counters.requests.get(key, 0) + 1
            if status[0] >= 400:
                counters.errors[status[0]] = counters.errors.get(status[0], 0) + 1
            counters.latency.observe(time.perf_counter() - t0)


@dataclass
class Choice:
    """One choice being generated: its engine stream, sampler and stop rules."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    stream: Any  # engine.TokenStream
    sampler: ChoiceSampler
    stops: list[str]
    stop_ids: frozenset[int]
    n_tokens: int = 0
    finish: str | None = None
    offset: int = 0  # text_offset of the next logprobs token
    pending: list[int] = field(default_factory=list)  # generated token positions not yet reported


def create_app(om: "OffloadedModel", cfg: ServeConfig | None = None) -> FastAPI:
    """The ASGI app serving `om`; its engine thread starts now and stops at app shutdown."""
    cfg = cfg or ServeConfig()
    engine = Engine(om, cfg.max_batch)
    template = ChatTemplate.from_model_dir(om.path)
    tokenizer = ServerTokenizer(om)
    started = time.time()
    vocab, eos = om.config.vocab_size, tuple(om.config.eos_token_ids)
    context = om.runtime.max_seq_len

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()  # at server shutdown

    app = FastAPI(title="moe_offload", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(Guard, cfg=cfg, engine=engine)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = {404: f"no route {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return JSONResponse(ApiError(exc.status_code, msg, code=code).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok" if engine.error is None else "degraded", "model": cfg.model_id}

    def model_card() -> dict[str, Any]:
        return {"id": cfg.model_id, "object": "model", "created": int(started), "owned_by": "moe_offload",
                "max_model_len": context}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != cfg.model_id:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {cfg.model_id!r}",
                           "model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request, cfg)
        job, prompt = parse_completion(body, vocab, eos)
        for text, ids in _prompts(prompt):
            if ids is None:
                try:
                    ids = tokenizer.encode_prompt(text)
                except MoeOffloadError as exc:
                    raise ApiError(400, str(exc), "prompt") from None
            job.prompts.append(ids)
            job.prompt_texts.append(text)
        return await _respond(job, request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request, cfg)
        job, messages = parse_chat(body, vocab, eos)
        if template is None:
            raise ApiError(400, f"this model has no chat template (no chat_template in {om.path}/"
                                "tokenizer_config.json); use /v1/completions", "messages",
                           code="missing_chat_template")
        try:
            ids = tokenizer.encode_chat(
                lambda wrap: template.render(wrap_contents(messages, wrap), add_generation_prompt=True))
        except MoeOffloadError as exc:
            raise ApiError(400, str(exc), "messages") from None
        job.prompts, job.prompt_texts = [ids], [None]
        return await _respond(job, request)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(_metrics(om, engine), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- generation -------------------------------------------------------------------------------
    def _start(job: Job) -> list[Choice]:
        if len(job.prompts) * job.n > MAX_CHOICES:
            raise ApiError(400, f"{len(job.prompts)} prompts x n={job.n} choices exceeds {MAX_CHOICES}", "n")
        plans = []
        for p, ids in enumerate(job.prompts):
            if not ids:
                raise ApiError(400, "the prompt encodes to no tokens", "prompt")
            if max(ids) >= vocab or min(ids) < 0:
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
            room = context - len(ids)
            mt = job.max_tokens
            if mt is None:
                mt = max(room, 0) if job.kind == "chat.completion" else min(cfg.default_max_tokens, max(room, 0))
            if mt > room or (room <= 0 and not (mt == 0 and room == 0)):
                name = "max_completion_tokens" if job.kind == "chat.completion" else "max_tokens"
                raise ApiError(400, f"prompt ({len(ids)} tokens) + max_tokens ({mt}) exceeds the context of "
                                    f"{context} tokens", name if room > 0 else "prompt",
                               code="context_length_exceeded")
            if job.min_tokens > mt:
                raise ApiError(400, f"min_tokens ({job.min_tokens}) must not exceed max_tokens ({mt})", "min_tokens")
            plans.append((p, ids, mt))
        choices = []
        try:
            for p, ids, mt in plans:
                for j in range(job.n):
                    params = job.params(mt, j)
                    sampler = ChoiceSampler(
                        params, list(ids), top_k=job.top_k, repetition_penalty=job.repetition_penalty,
                        frequency_penalty=job.frequency_penalty, presence_penalty=job.presence_penalty,
                        logit_bias=job.logit_bias, min_tokens=job.min_tokens,
                        min_ids=tuple(sorted(set(eos) | set(job.stop_ids))), logprobs=job.logprobs,
                        prompt_logprobs=job.logprobs if job.echo and job.logprobs is not None else None)
                    stream = engine.submit(ids, params, sampler, stop_ids=tuple(job.stop_ids))
                    text = job.prompt_texts[p]
                    choices.append(Choice(p * job.n + j, ids, text if text is not None else om.decode(ids),
                                          stream, sampler, job.stops, frozenset(job.stop_ids)))
        except BaseException:
            for c in choices:
                c.stream.cancel()
            raise
        return choices

    async def _deltas(c: Choice) -> AsyncIterator[str]:
        """The choice's text deltas; text that could still become a stop string is held back. Sets
        c.finish and c.n_tokens; c.pending gathers the token positions the deltas cover."""
        streamer, sent = TextStreamer(om.decode), 0
        async for tok in c.stream:
            c.pending.append(c.n_tokens)
            c.n_tokens += 1
            if tok in c.stop_ids:
                continue  # ends the request; its text is not part of the output
            streamer.push(tok)
            text = streamer.text
            cut = _stop_at(text, c.stops)
            if cut is not None:
                c.finish = "stop"
                yield text[sent:cut]
                return
            safe = len(text) - _holdback(text, c.stops)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
        streamer.finish()
        c.finish = FINISH.get(c.stream.request.finish_reason or "length", "length")
        if c.stream.request.finish_reason == "error":
            raise ApiError(500, f"the engine failed: {engine.error}", kind="server_error")
        yield streamer.text[sent:]

    def _logprobs(job: Job, c: Choice, entries: list, first: bool) -> Any:
        if job.logprobs is None:
            return None
        tt = tokenizer.token_text
        if job.kind == "chat.completion":
            return {"content": [{"token": tt(t), "logprob": lp, "bytes": list(tt(t).encode("utf-8")),
                                 "top_logprobs": [{"token": tt(i), "logprob": v, "bytes": list(tt(i).encode("utf-8"))}
                                                  for i, v in top]} for t, lp, top in entries]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first and job.echo:
            entries = list(zip(c.prompt_ids, c.sampler.prompt_entries or [None] * len(c.prompt_ids))) + \
                [(e[0], e) for e in entries]
        else:
            entries = [(e[0], e) for e in entries]
        for tid, e in entries:
            s = tt(tid)
            out["tokens"].append(s)
            out["text_offset"].append(c.offset)
            c.offset += len(s)
            if e is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
            else:
                top = {tt(i): v for i, v in e[2]}
                top.setdefault(s, e[1])  # vLLM: the chosen token is always among them
                out["token_logprobs"].append(e[1])
                out["top_logprobs"].append(top)
        return out

    def _take(c: Choice) -> list:
        entries = [c.sampler.entries[i] for i in c.pending if i < len(c.sampler.entries)]
        c.pending = []
        return entries

    def _usage(job: Job, choices: list[Choice]) -> dict[str, int]:
        p = sum(len(ids) for ids in job.prompts)
        n = sum(c.n_tokens for c in choices)
        return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}

    async def _respond(job: Job, request: Request):
        choices = _start(job)
        rid = ("cmpl-" if job.kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex[:24]
        if job.stream:
            return StreamingResponse(_sse(job, choices, rid), media_type="text/event-stream")

        async def collect(c: Choice) -> dict[str, Any]:
            try:
                text = "".join([d async for d in _deltas(c)])
            finally:
                c.stream.cancel()
            lp = _logprobs(job, c, _take(c), True)
            if job.kind == "text_completion":
                return {"index": c.index, "text": (c.prompt_text if job.echo else "") + text, "logprobs": lp,
                        "finish_reason": c.finish}
            return {"index": c.index, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                    "finish_reason": c.finish}

        work = asyncio.ensure_future(asyncio.gather(*(collect(c) for c in choices)))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():  # the client went away: free every row now
                for c in choices:
                    c.stream.cancel()
                work.cancel()
            gone.cancel()
        if work.cancelled():
            return PlainTextResponse("", status_code=499)
        out = work.result()
        return {"id": rid, "object": job.kind, "created": int(time.time()), "model": cfg.model_id,
                "choices": out, "usage": _usage(job, choices)}

    async def _sse(job: Job, choices: list[Choice], rid: str) -> AsyncIterator[str]:
        chat = job.kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        def chunk(cs: list[dict[str, Any]], usage: Any = None, last: bool = False) -> str:
            d: dict[str, Any] = {"id": rid, "object": obj, "created": created, "model": cfg.model_id, "choices": cs}
            if job.include_usage:
                d["usage"] = usage
            return "data: " + json.dumps(d) + "\n\n"

        def piece(c: Choice, delta: str | None, finish: str | None, entries: list, first: bool = False
                  ) -> dict[str, Any]:
            lp = _logprobs(job, c, entries, first)
            if not chat:
                return {"index": c.index, "text": delta or "", "logprobs": lp, "finish_reason": finish}
            d: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if delta:
                d["content"] = delta
            return {"index": c.index, "delta": d, "logprobs": lp if entries or not first else None,
                    "finish_reason": finish}

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for delta in _deltas(c):
                    if delta:
                        await queue.put((c, delta, None, _take(c)))
                await queue.put((c, None, c.finish, _take(c)))
            except ApiError:
                await queue.put((c, None, "error", _take(c)))
            finally:
                c.stream.cancel()

        tasks: list[asyncio.Task] = []
        try:
            if chat:
                for c in choices:
                    yield chunk([piece(c, None, None, [], first=True)])
            tasks = [asyncio.ensure_future(pump(c)) for c in choices]
            echoed: set[int] = set()
            left = len(choices)
            while left:
                c, delta, finish, entries = await queue.get()
                if job.echo and c.index not in echoed:  # the prompt's logprobs exist once it was prefilled
                    echoed.add(c.index)
                    yield chunk([piece(c, c.prompt_text, None, [], first=True)])
                if finish is not None:
                    left -= 1
                yield chunk([piece(c, delta, finish, entries)])
            if job.include_usage:
                yield chunk([], _usage(job, choices))
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the generator is closed)
            for t in tasks:
                t.cancel()
            for c in choices:
                c.stream.cancel()

    return app


async def _disconnected(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


def _prompts(prompt: Any) -> list[tuple[str | None, list[int] | None]]:
    """prompt: a string, a list of strings, a list of token ids, or a list of lists of ids."""
    def is_ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        return [(prompt, None)]
    if is_ids(prompt):
        return [(None, list(prompt))]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
        return [(None, list(p)) for p in prompt]
    raise ApiError(400, "prompt must be a string, a list of strings, a non-empty list of token ids, or a list of "
                        "such lists", "prompt")


async def _body(request: Request, cfg: ServeConfig) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8") from None
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if has_surrogates(body):
        raise ApiError(400, "request body contains a lone UTF-16 surrogate (\\ud800-\\udfff): not valid Unicode")
    if body.get("model") != cfg.model_id:
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "model is required (see GET /v1/models)", "model")
        raise ApiError(404, f"the model {body['model']!r} does not exist; this server serves {cfg.model_id!r}",
                       "model", code="model_not_found")
    return body


def _stop_at(text: str, stops: list[str]) -> int | None:
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(cuts) if cuts else None


def _holdback(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _metrics(om: "OffloadedModel", engine: Engine) -> str:
    c = engine.counters
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP moe_offload_{name} {help_}")
        lines.append(f"# TYPE moe_offload_{name} {kind}")
        lines.extend(f"moe_offload_{name}{labels} {value:g}" for labels, value in samples)

    def histogram(name: str, help_: str, h) -> None:
        lines.append(f"# HELP moe_offload_{name} {help_}")
        lines.append(f"# TYPE moe_offload_{name} histogram")
        acc = 0
        for b, n in zip(list(h.bounds) + ["+Inf"], h.counts):
            acc += n
            le = b if isinstance(b, str) else f"{b:g}"
            lines.append(f'moe_offload_{name}_bucket{{le="{le}"}} {acc}')
        lines.append(f"moe_offload_{name}_sum {h.sum:g}")
        lines.append(f"moe_offload_{name}_count {h.count}")

    metric("requests_total", "counter", "HTTP requests by route template and status.",
           [(f'{{route="{_esc(r)}",status="{s}"}}', v) for (r, s), v in sorted(c.requests.items())] or [("", 0)])
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
    histogram("time_to_first_token_seconds", "Time from submission to a request's first token.", c.ttft)
    histogram("inter_token_latency_seconds", "Time between consecutive tokens of a request.", c.itl)
    histogram("request_duration_seconds", "HTTP request handling time (streams: until the handler returns).",
              c.latency)
    cache = om.expert_cache
    if cache is not None:
        st = cache.stats
        metric("expert_cache_hits_total", "counter", "Routed experts found resident.", [("", int(st.hits.sum()))])
        metric("expert_cache_misses_total", "counter", "Routed experts copied on demand.", [("", int(st.misses.sum()))])
        metric("expert_cache_bytes_h2d_total", "counter", "Expert bytes copied host to device.",
               [("", int(st.bytes_h2d.sum()))])
        metric("expert_prefetch_hits_total", "counter", "Hits on prefetched experts.",
               [("", int(st.prefetch_hits.sum()))])
        if st.page_cache == "mincore":  # a memory-mapped store (GGUF) on an OS that reports residency
            metric("expert_page_cache_miss_bytes_total", "counter",
                   "Expert bytes loads read that were not in the OS page cache (read from disk; mincore).",
                   [("", int(st.page_cache_miss_bytes.sum()))])
    return "\n".join(lines) + "\n"
