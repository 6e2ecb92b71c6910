"""The HTTP server: OpenAI-compatible endpoints over the batching scheduler.

    app = create_app(model, tokenizer, ServeConfig(model_name="tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Request handling is deliberately linear: parse (pydantic, 400 on any wrong field), check what
the sampler cannot express (n > 1, top_p, penalties: 400 rather than silently ignored), turn the
request into a prompt and `SamplingParams`, check those with the sampler's own
`validate_request`, submit a `Job`, then either wait for its final event or stream its events
as server-sent events. Every error leaves as an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..sampling import block_length_for, validate_request
from ..sampling.generate import validate_fast_options
from ..sampling.text import encode_prompt, stop_token_ids
from .batching import (BatchRunner, Failed, Finished, Job, QueueFull, RequestTimeout, SamplingParams, Scheduler,
                       ShuttingDown)
from .metrics import ServerMetrics
from .protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       ChunkChoice, Completion, CompletionChoice, CompletionRequest, Delta, ErrorBody,
                       ErrorResponse, ModelCard, ModelList, SamplingRequest, Usage, new_id, now)

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    """Server limits and the defaults for diffusion parameters a request leaves out."""

    model_name: str = "unmask"
    max_tokens_limit: int = 512      # largest max_tokens (= gen_length) a request may ask for
    default_max_tokens: int = 64
    block_length: int = 32           # preferred block length when a request gives none
    steps: int | None = None         # None: one step per generated token
    cfg_scale: float = 0.0
    temperature: float = 0.0
    remasking: str = "low_confidence"
    max_batch_size: int = 16
    max_queue: int = 256
    batch_window_ms: float = 10.0
    timeout_s: float = 300.0
    max_stop_sequences: int = 4


class APIError(Exception):
    """An error answered with an OpenAI-style body; `param` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.dump(), status_code=self.status, headers=self.headers)


def as_api_error(e: Exception) -> APIError:
    """Map scheduler and sampler exceptions to HTTP errors."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), code="shutting_down", type="server_error")
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), code="timeout", type="server_error")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def sampler_error(e: ValueError, prompt_field: str) -> APIError:
    """A `validate_request` message as a 400 naming the request field to change."""
    msg = str(e)
    if "exceeds the model's context" in msg:
        return APIError(400, msg, prompt_field, "context_length_exceeded")
    if "must be a multiple of block_length" in msg:
        return APIError(400, msg, "block_length")
    fields = {"steps": "steps", "gen_length": "max_tokens", "block_length": "block_length", "cfg_scale": "cfg_scale",
              "temperature": "temperature", "remasking": "remasking"}
    mentioned = [(msg.find(f), param) for f, param in fields.items() if f in msg]
    param = min(mentioned)[1] if mentioned else None   # the field the message starts with
    return APIError(400, msg, param)


class Server:
    """The model, its tokenizer, the scheduler and the per-request logic shared by both endpoints."""

    def __init__(self, model, tokenizer, config: ServeConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        mcfg = getattr(model, "config", None)
        self.mask_id = getattr(mcfg, "mask_token_id", None)
        if self.mask_id is None:
            self.mask_id = tokenizer.mask_token_id
        self.end_ids = set(stop_token_ids(model, tokenizer))
        self.eos_id = getattr(mcfg, "eos_token_id", None)
        if self.eos_id is None:
            self.eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.scheduler: Scheduler | None = None
        self.metrics = ServerMetrics(lambda: self.scheduler.queue_depth if self.scheduler else 0,
                                     lambda: self.scheduler.in_flight if self.scheduler else 0)
        self.runner = BatchRunner(model, tokenizer, mask_id=self.mask_id, pad_id=pad_id, eos_id=self.eos_id,
                                  end_ids=self.end_ids, metrics=self.metrics)

    # --- request -> job -------------------------------------------------------------------------

    def check_common(self, req: SamplingRequest) -> None:
        if req.model != self.config.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.config.model_name!r} "
                                "(see GET /v1/models)", "model", "model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n} is not supported: send n separate requests (concurrent requests "
                                "are batched together)", "n")
        if req.top_p not in (None, 1.0):
            raise APIError(400, "top_p is not supported by the diffusion sampler (leave it unset or 1)", "top_p")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name) not in (None, 0.0):
                raise APIError(400, f"{name} is not supported by the diffusion sampler (leave it unset or 0)", name)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")

    def stop_sequences(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.config.max_stop_sequences:
            raise APIError(400, f"at most {self.config.max_stop_sequences} stop sequences are allowed", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty strings", "stop")
        return stops

    def sampling_params(self, req: SamplingRequest, max_tokens: int | None, prompt_length: int,
                        prompt_field: str, max_tokens_field: str) -> SamplingParams:
        cfg = self.config
        gen_length = cfg.default_max_tokens if max_tokens is None else max_tokens
        if gen_length <= 0:
            raise APIError(400, f"{max_tokens_field} must be at least 1 (got {gen_length})", max_tokens_field)
        if gen_length > cfg.max_tokens_limit:
            raise APIError(400, f"{max_tokens_field} ({gen_length}) exceeds this server's limit of "
                                f"{cfg.max_tokens_limit}", max_tokens_field)
        steps = req.steps if req.steps is not None else cfg.steps
        block = req.block_length if req.block_length is not None else block_length_for(gen_length, cfg.block_length, steps)
        if steps is None or (req.steps is None and (steps % (gen_length // block) or steps // (gen_length // block) > block)):
            steps = gen_length
        params = SamplingParams(
            steps=steps, gen_length=gen_length, block_length=block,
            temperature=cfg.temperature if req.temperature is None else req.temperature,
            cfg_scale=cfg.cfg_scale if req.cfg_scale is None else req.cfg_scale,
            remasking=req.remasking or cfg.remasking, threshold=req.threshold, cache=req.cache,
            reuse_uncond=req.reuse_uncond)
        try:
            validate_request(self.model, prompt_length, params.steps, params.gen_length, params.block_length,
                             params.temperature, params.cfg_scale, params.remasking, self.mask_id,
                             parallel=params.threshold is not None)
        except ValueError as e:
            raise sampler_error(e, prompt_field) from None
        try:
            validate_fast_options(self.model, False, params.cache, "block", params.threshold, None, params.reuse_uncond)
        except ValueError as e:
            message = str(e)
            field = "reuse_uncond" if "reuse_uncond" in message else "cache" if "cache" in message else "threshold"
            raise APIError(400, message, field) from None
        return params

    def submit(self, req: SamplingRequest, prompt: list[int], params: SamplingParams) -> Job:
        job = Job(prompt=prompt, params=params, loop=asyncio.get_running_loop(),
                  deadline=time.monotonic() + self.config.timeout_s, stop=self.stop_sequences(req.stop),
                  seed=req.seed, stream=req.stream, progress=req.diffusion_progress and req.stream)
        try:
            self.scheduler.submit(job)
        except (QueueFull, ShuttingDown) as e:
            raise as_api_error(e) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return job

    # --- job -> response --------------------------------------------------------------------------

    async def final_event(self, job: Job, request: Request) -> Finished:
        """Wait for the job's result; cancel it if the client leaves or the deadline passes."""
        while True:
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=0.25)
            except asyncio.TimeoutError:  # no result yet: is anyone still waiting for it?
                if await request.is_disconnected():
                    self.cancel(job)
                    raise APIError(499, "client closed the request", code="client_closed")
                if time.monotonic() > job.deadline + 1.0:
                    self.cancel(job)
                    raise as_api_error(RequestTimeout("the request did not finish within its timeout"))
                continue
            if isinstance(event, Finished):
                return event
            if isinstance(event, Failed):
                raise as_api_error(event.error)

    def cancel(self, job: Job) -> None:
        if not job.done and not job.cancelled:
            job.cancelled = True
            self.metrics.cancelled.inc()

    async def sse(self, job: Job, chunk, prompt_tokens: int, include_usage: bool, first: dict | None = None):
        """Server-sent events for a streaming job. `chunk(text, finish_reason, progress)` builds one
        chunk object; the stream ends with a finish chunk, an optional usage chunk and [DONE]."""
        started = time.monotonic()
        first_text = True
        try:
            if first is not None:
                yield _sse(first)
            while True:
                timeout = max(job.deadline + 1.0 - time.monotonic(), 0.0)
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=timeout)
                except asyncio.TimeoutError:
                    event = Failed(RequestTimeout("the request did not finish within its timeout"))
                if isinstance(event, Failed):
                    yield _sse(as_api_error(event.error).response().body.decode())
                    break
                if event.text and first_text:
                    self.metrics.first_token.observe(time.monotonic() - started)
                    first_text = False
                if event.text or event.progress:
                    yield _sse(chunk(event.text, None, event.progress).dump())
                if isinstance(event, Finished):
                    yield _sse(chunk(None, event.ending.finish_reason, None).dump())
                    if include_usage:
                        usage = _usage(prompt_tokens, event.ending.completion_tokens)
                        yield _sse(chunk(None, None, None, usage).dump())
                    break
            yield "data: [DONE]\n\n"
        finally:  # also runs when the client disconnects and the response task is cancelled
            self.cancel(job)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens)


def _stream_response(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class CountRequests:
    """ASGI middleware: count responses by endpoint and status, and time them to their last byte
    (so a streamed response is timed to its end, not to its headers)."""

    ROUTES = {"/", "/health", "/version", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.ROUTES else "other"
        started, status = time.monotonic(), 500

        async def send_and_count(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=status)
            if endpoint.startswith("/v1/"):
                self.metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)


def create_app(model, tokenizer, config: ServeConfig | None = None) -> FastAPI:
    """A FastAPI app serving `model`; the scheduler starts and stops with the app's lifespan."""
    server = Server(model, tokenizer, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c = server.config
        server.scheduler = Scheduler(server.runner, max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                                     window_s=c.batch_window_ms / 1000)
        server.scheduler.start()
        yield
        await server.scheduler.close()

    app = FastAPI(title="unmask", lifespan=lifespan)
    app.state.server = server

    app.add_middleware(CountRequests, metrics=server.metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if err.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json").response()
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            message = f"unrecognized request argument supplied: {param}"
        elif err.get("type") == "missing":
            message = f"missing required field: {param}"
        else:
            message = f"invalid value for {param}: {err.get('msg')}"
        return APIError(400, message, param, err.get("type")).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return as_api_error(e).response()

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        if server.scheduler is None or server.scheduler.closing:
            raise APIError(503, "the server is not accepting requests", code="unavailable", type="server_error")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        from .. import __version__
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=server.config.model_name, created=now())]).dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        server.check_common(req)
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", "messages")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by the diffusion sampler", "logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        max_field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = encode_prompt(tokenizer, messages)
        except Exception as e:  # a template may reject an ordering of roles
            raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        params = server.sampling_params(req, max_tokens, len(prompt),
                                        "messages", max_field)
        job = server.submit(req, prompt, params)
        rid, created = new_id("chatcmpl"), now()

        if req.stream:
            def chunk(text, finish_reason, progress, usage=None):
                choices = [] if usage else [ChunkChoice(index=0, delta=Delta(content=text or None),
                                                        finish_reason=finish_reason)]
                return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choices,
                                           usage=usage, diffusion=progress)
            first = ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[
                ChunkChoice(index=0, delta=Delta(role="assistant", content=""), finish_reason=None)]).dump()
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(server.sse(job, chunk, len(prompt), include_usage, first))
        done = await server.final_event(job, request)
        return ChatCompletion(id=rid, created=created, model=req.model, choices=[
            ChatChoice(index=0, message=AssistantMessage(content=done.ending.text),
                       finish_reason=done.ending.finish_reason)],
            usage=_usage(len(prompt), done.ending.completion_tokens)).dump()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        server.check_common(req)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise APIError(400, "send one prompt per request (concurrent requests are batched together)", "prompt")
            req.prompt = req.prompt[0]
        if not req.prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if req.logprobs is not None:
            raise APIError(400, "logprobs are not supported by the diffusion sampler", "logprobs")
        if req.echo:
            raise APIError(400, "echo is not supported", "echo")
        prompt = tokenizer(req.prompt).input_ids
        params = server.sampling_params(req, req.max_tokens, len(prompt), "prompt", "max_tokens")
        job = server.submit(req, prompt, params)
        rid, created = new_id("cmpl"), now()

        if req.stream:
            def chunk(text, finish_reason, progress, usage=None):
                choices = [] if usage else [CompletionChoice(index=0, text=text or "", logprobs=None,
                                                             finish_reason=finish_reason)]
                return Completion(id=rid, created=created, model=req.model, choices=choices,
                                  usage=usage, diffusion=progress)
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _stream_response(server.sse(job, chunk, len(prompt), include_usage))
        done = await server.final_event(job, request)
        return Completion(id=rid, created=created, model=req.model, choices=[
            CompletionChoice(index=0, text=done.ending.text, logprobs=None, finish_reason=done.ending.finish_reason)],
            usage=_usage(len(prompt), done.ending.completion_tokens)).dump()

    return app
