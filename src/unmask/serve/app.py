"""The HTTP server: OpenAI-compatible endpoints over the batching scheduler.

    app = create_app(model, tokenizer, ServeConfig(model_name="tiny"))
    uvicorn.run(app, host="127.0.0.1", port=8000)     # or `lifecycle.run`, which drains on SIGTERM

Request handling is deliberately linear, cheapest checks first: admit (the API key; 503 once
shutting down), parse (at most --max-body-bytes of JSON into the pydantic model, 400 naming any
wrong field), refuse what the sampler cannot express (n > 1, penalties, top_p for LLaDA models: 400
rather than silently ignored), build the request's options for the model's family (`SamplerOptions`
for LLaDA, `BlockOptions` for block-diffusion LLaDA2.x models) and check them, tokenize off the event
loop (client text stays text, see prompts.py), check the options against the model and this
prompt, and only then submit a `Job`, so a request that cannot run never joins a batch; then
wait for its final event or stream its events as server-sent events. Every error, from any
layer (a route that does not exist included), leaves as an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import jinja2
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..sampling import OptionError, block_length_for, check_seed, is_block_diffusion
from ..sampling.options import BlockOptions, SamplerOptions, context_length, options_for
from ..sampling.text import stop_token_ids
from .batching import (BatchRunner, Failed, Finished, FixedShapes, Job, QueueFull, RequestTimeout, Scheduler,
                       ShuttingDown)
from .metrics import ServerMetrics
from .prompts import PromptEncoder, PromptError
from .protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                       ChunkChoice, Completion, CompletionChoice, CompletionRequest, Delta, ErrorBody,
                       ErrorResponse, ModelCard, ModelList, SamplingRequest, Usage, new_id, now)
from .protocol import Request as RequestBody

STATIC = Path(__file__).parent / "static"
TOKENIZE_THREADS = 4   # prompts tokenized at once, so one client's long prompt does not queue the rest
SURROGATE = re.compile("[\ud800-\udfff]")
JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
# The flag that sets each server default, for ServeConfig.check's messages.
DEFAULT_FLAGS = {"steps": "--steps", "block_length": "--block-length", "gen_length": "--default-max-tokens",
                 "temperature": "--temperature", "cfg_scale": "--cfg-scale", "remasking": "--remasking",
                 "cache": "--cache", "cuda_graph": "--cuda-graph", "guidance": "--guidance"}


@dataclass
class ServeConfig:
    """Server limits and the defaults for diffusion parameters a request leaves out.

    The defaults' meaning depends on the model's family (`block_diffusion`, which the server
    takes from the model): for a LLaDA model `steps` is the total over all blocks, for a
    block-diffusion (LLaDA2.x) model it is per block, and a setting only the other family takes
    (`remasking` for LLaDA2.x) is an error naming its flag."""

    model_name: str = "unmask"
    max_tokens_limit: int = 512      # largest max_tokens (= gen_length) a request may ask for
    default_max_tokens: int = 64
    block_length: int = 32           # LLaDA: preferred block length; LLaDA2.x: the block length
    steps: int | None = None         # None: LLaDA one step per generated token, LLaDA2.x 32 per block
    cfg_scale: float = 0.0
    guidance: str | None = None      # the default form of CFG (None: the sampler's, constant w with the prompt masked)
    temperature: float = 0.0
    remasking: str | None = None     # None: the sampler's default (LLaDA only)
    cache: str | None = None         # LLaDA: the cache of requests that give none (None: off, or dual with cuda_graph)
    cuda_graph: bool = False         # LLaDA: replay dual-cache steps as CUDA graphs (batches padded to fixed shapes)
    max_batch_size: int = 16         # most rows in one step (continuous batching) or one whole call
    max_batch_tokens: int = 32768    # most canvas tokens in one step (a guided row counts twice)
    max_queue: int = 256
    batch_window_ms: float = 10.0
    timeout_s: float = 300.0
    max_stop_sequences: int = 4
    max_body_bytes: int = 4 * 2**20  # a larger request body is refused (413) before it is read
    header_timeout_s: float = 10.0   # a connection whose request headers take longer is closed
    body_timeout_s: float = 30.0     # a request body that takes longer to arrive is a 408
    max_connections: int = 1024      # open connections beyond this are answered 503
    api_key: str | None = None       # when set, /v1/* needs `Authorization: Bearer <key>`
    allowed_origins: tuple[str, ...] = ()   # CORS allow-list; empty: no cross-origin access
    shutdown_grace_s: float = 30.0   # how long a drain waits for accepted requests (lifecycle.run)

    def options(self, gen_length: int, block_diffusion: bool = False, steps: int | None = None,
                block_length: int | None = None, temperature: float | None = None, cfg_scale: float | None = None,
                remasking: str | None = None, cache: str | None = None, guidance: str | None = None,
                **given) -> SamplerOptions | BlockOptions:
        """A request's checked options for the model's family, each setting it leaves out (None)
        from the defaults; `given` are further sampler options (None: not given). Built and checked
        by `options_for`, as the CLI does. For a LLaDA model the block length defaults to
        `block_length_for` (shared with the lm-eval adapter); a LLaDA2.x model decodes any length
        in whole blocks of --block-length.

        `cuda_graph` is the server's, not the request's: it applies to every request that runs the
        dual cache, which is the default cache under --cuda-graph; a request that asks for the
        prefix cache runs it eagerly. (For a LLaDA2.x model --cache and --cuda-graph are errors.)"""
        if cache is None:
            cache = "dual" if self.cuda_graph and self.cache is None and not block_diffusion else self.cache
        graph = self.cuda_graph and (block_diffusion or cache == "dual")
        if block_diffusion:
            steps = self.steps if steps is None else steps
            block_length = self.block_length if block_length is None else block_length
        else:
            if block_length is None:
                block_length = block_length_for(gen_length, self.block_length, self.steps if steps is None else steps)
            if steps is None:
                steps = self.default_steps(gen_length, block_length)
        return options_for(block_diffusion, gen_length=gen_length, steps=steps, block_length=block_length,
                           temperature=self.temperature if temperature is None else temperature,
                           cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
                           remasking=self.remasking if remasking is None else remasking, cache=cache,
                           guidance=self.guidance if guidance is None else guidance, cuda_graph=graph or None,
                           **given)

    def default_steps(self, gen_length: int, block_length: int) -> int:
        """--steps where it fits this length and block (a whole number of steps per block, at most
        one per token), else one step per token, so every max_tokens works without `steps`.
        A block length that does not divide the length is left for the options' check to name."""
        if self.steps is None:
            return gen_length
        if block_length < 1 or gen_length % block_length:
            return self.steps
        blocks = gen_length // block_length
        return self.steps if self.steps % blocks == 0 and self.steps // blocks <= block_length else gen_length

    def check(self, block_diffusion: bool = False, device: str | torch.device | None = None) -> ServeConfig:
        """Refuse settings no request could work with, before any model is loaded (named by flag),
        under the rules of the model's family; with `device`, also what cannot run there
        (--cuda-graph off CUDA: `SamplerOptions.check`)."""
        positive = {"--max-tokens-limit": self.max_tokens_limit, "--default-max-tokens": self.default_max_tokens,
                    "--block-length": self.block_length, "--max-batch-size": self.max_batch_size,
                    "--max-batch-tokens": self.max_batch_tokens, "--max-queue": self.max_queue,
                    "--max-body-bytes": self.max_body_bytes,
                    "--max-connections": self.max_connections}
        if self.steps is not None:
            positive["--steps"] = self.steps
        for flag, value in positive.items():
            if type(value) is not int or value < 1:
                raise ValueError(f"{flag} must be a positive integer (got {value!r})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"--default-max-tokens ({self.default_max_tokens}) exceeds --max-tokens-limit "
                             f"({self.max_tokens_limit})")
        durations = {"--batch-window-ms": self.batch_window_ms, "--timeout": self.timeout_s,
                     "--shutdown-grace": self.shutdown_grace_s, "--header-timeout": self.header_timeout_s,
                     "--body-timeout": self.body_timeout_s}
        for flag, value in durations.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{flag} must be a finite number >= 0 (got {value!r})")
        for flag, value in {"--timeout": self.timeout_s, "--header-timeout": self.header_timeout_s,
                            "--body-timeout": self.body_timeout_s}.items():
            if value == 0:
                raise ValueError(f"{flag} must be more than 0 seconds")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty")
        try:   # a request that sets nothing must be valid, and (LLaDA) --steps must fit the default length
            options = self.options(self.default_max_tokens, block_diffusion)
            if not block_diffusion:
                options.check(device=device)
                if self.cuda_graph and not options.cuda_graph:
                    replace(options, cuda_graph=True).check()   # names what --cache must be
            if self.steps is not None and not block_diffusion:
                replace(options, steps=self.steps).check()
        except OptionError as e:
            raise ValueError(f"{DEFAULT_FLAGS.get(e.option, e.option)}: {e}") from None
        return self


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
    if isinstance(e, ClientDisconnect):
        return APIError(499, "client closed the request", code="client_closed")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")


def option_error(e: OptionError, max_tokens_field: str, prompt_field: str = "prompt") -> APIError:
    """A sampler option error as a 400 naming the request field to change: the sampler's
    `gen_length` is max_tokens (or max_completion_tokens), its prompt the prompt (or messages)."""
    param = {"gen_length": max_tokens_field, "prompt": prompt_field}.get(e.option, e.option)
    return APIError(400, str(e), param, "context_length_exceeded" if e.option == "prompt" else None)


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (dotted, e.g. messages.0.role)."""
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        message = f"unrecognized request argument supplied: {param}"
    elif err["type"] == "missing":
        message = f"missing required field: {param}"
    else:
        message = f"invalid value for {param}: {err['msg']}"
    return APIError(400, message, param, err["type"])


def chat_tuned(encoder: PromptEncoder, model_name: str) -> bool:
    """Whether the web page starts with the chat template ticked: the tokenizer has a template and
    the model's name says it was tuned for chat. A base model (the bundled one, LLaDA-8B-Base)
    often ships a template too, and answers a chat-formatted prompt with noise."""
    return encoder.has_chat_template and re.search(r"instruct|chat|sft", model_name, re.IGNORECASE) is not None


class Server:
    """The model, its tokenizer, the scheduler and the per-request logic shared by both endpoints.

    With `adapters` (a `models.adapters.AdapterSet` on `model`) it serves the base under
    `config.model_name` and each adapter under its own name; a request's `model` picks one."""

    def __init__(self, model, tokenizer, config: ServeConfig, adapters=None):
        self.block_diffusion = is_block_diffusion(model)   # LLaDA2.x: block_generate and BlockOptions
        self.model, self.tokenizer, self.config = model, tokenizer, config.check(self.block_diffusion)
        self.served = {config.model_name: None} | {name: name for name in (adapters.names if adapters else ())}
        mcfg = getattr(model, "config", None)
        self.mask_id = getattr(mcfg, "mask_token_id", None)
        if self.mask_id is None:
            self.mask_id = tokenizer.mask_token_id
        self.end_ids = set(stop_token_ids(model, tokenizer))
        self.eos_id = getattr(mcfg, "eos_token_id", None)
        if self.eos_id is None:
            self.eos_id = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.prompts = PromptEncoder(tokenizer)
        self.tokenize_threads = ThreadPoolExecutor(max_workers=TOKENIZE_THREADS, thread_name_prefix="unmask-tokenize")
        self.scheduler: Scheduler | None = None
        self.metrics = ServerMetrics(lambda: self.scheduler.queue_depth if self.scheduler else 0,
                                     lambda: self.scheduler.in_flight if self.scheduler else 0)
        self.runner = BatchRunner(model, tokenizer, mask_id=self.mask_id, pad_id=pad_id, eos_id=self.eos_id,
                                  end_ids=self.end_ids, metrics=self.metrics, shapes=FixedShapes(config.max_batch_size),
                                  adapters=adapters)

    @property
    def accepting(self) -> bool:
        return self.scheduler is not None and self.scheduler.accepting

    # --- request -> job -------------------------------------------------------------------------

    async def admit(self, request: Request) -> None:
        """Every /v1 request: the API key when one is set (as vLLM's --api-key), then 503 once
        the server has stopped taking work."""
        key = self.config.api_key
        if key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                       f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not self.accepting:
            raise as_api_error(ShuttingDown("the server is shutting down"))

    def deadline(self) -> float:
        """When a request starting now must be done: --timeout covers tokenizing as well as generating."""
        return time.monotonic() + self.config.timeout_s

    async def parse(self, request: Request, model: type[RequestBody]) -> RequestBody:
        """The body as `model`: JSON (415 for another or no content type, which also keeps a
        browser's cross-origin "simple" requests out), at most --max-body-bytes (413) arriving within
        --body-timeout (408), UTF-8, an object, its text Unicode (no lone surrogates, which no
        tokenizer can encode), every field known and well typed (400 naming the field)."""
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            raise APIError(415, "the request body must be JSON, sent with Content-Type: application/json "
                                f"(got {content_type or 'none'})", code="unsupported_media_type")
        body = await self.read_body(request)
        try:
            data = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "the request body is not valid UTF-8", code="invalid_json") from None
        except json.JSONDecodeError as e:
            message = "the request body is empty" if not body.strip() else f"the request body is not valid JSON: {e}"
            raise APIError(400, message, code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
        except ValueError:   # an integer of more digits than Python converts (sys.get_int_max_str_digits)
            raise APIError(400, "the request body has a number with too many digits", code="invalid_json") from None
        if not isinstance(data, dict):
            kind = JSON_KINDS.get(type(data), "a number")
            raise APIError(400, f"the request body must be a JSON object, not {kind}", code="invalid_json")
        check_unicode(data)
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None

    async def read_body(self, request: Request) -> bytes:
        """The body, refused as soon as it is known to exceed the limit (so it is never held), or
        once it has taken --body-timeout to arrive (so a client trickling it cannot hold a slot)."""
        limit, timeout = self.config.max_body_bytes, self.config.body_timeout_s
        too_large = APIError(413, f"the request body exceeds this server's limit of {limit} bytes",
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {timeout:g} s", code="request_timeout",
                           headers={"Connection": "close"}) from None
        return b"".join(chunks)

    def check_common(self, req: SamplingRequest) -> None:
        if req.model not in self.served:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.served))} (see GET /v1/models)", "model", "model_not_found")
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n} is not supported: send n separate requests (concurrent requests "
                                "are batched together)", "n")
        if req.top_p not in (None, 1.0) and not self.block_diffusion:
            raise APIError(400, "top_p is not supported by the diffusion sampler of this (LLaDA) model: leave it "
                                "unset or 1", "top_p")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name) not in (None, 0.0):
                raise APIError(400, f"{name} is not supported by the diffusion sampler (leave it unset or 0)", name)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
        if req.diffusion_progress and not req.stream:
            raise APIError(400, "diffusion_progress rides on stream chunks: send it with stream=true",
                           "diffusion_progress")

    def stop_sequences(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.config.max_stop_sequences:
            raise APIError(400, f"at most {self.config.max_stop_sequences} stop sequences are allowed", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop sequences must be non-empty strings", "stop")
        return stops

    def options(self, req: SamplingRequest, max_tokens: int | None,
                max_tokens_field: str) -> SamplerOptions | BlockOptions:
        """The request's sampler options (of the model's family) and seed, checked before anything
        costly (tokenizing). A field only the other family takes is a 400 naming it."""
        cfg = self.config
        gen_length = cfg.default_max_tokens if max_tokens is None else max_tokens
        if gen_length <= 0:
            raise APIError(400, f"{max_tokens_field} must be at least 1 (got {gen_length})", max_tokens_field)
        if gen_length > cfg.max_tokens_limit:
            raise APIError(400, f"{max_tokens_field} ({gen_length}) exceeds this server's limit of "
                                f"{cfg.max_tokens_limit}", max_tokens_field)
        try:
            check_seed(req.seed)
            return cfg.options(gen_length, self.block_diffusion, steps=req.steps, block_length=req.block_length,
                               temperature=req.temperature, cfg_scale=req.cfg_scale, remasking=req.remasking,
                               threshold=req.threshold, cache=req.cache, reuse_uncond=req.reuse_uncond,
                               guidance=req.guidance,
                               top_k=req.top_k, top_p=req.top_p if self.block_diffusion else None)
        except OptionError as e:
            raise option_error(e, max_tokens_field) from None

    def check_size(self, options: SamplerOptions | BlockOptions, characters: int, prompt_field: str,
                   max_tokens_field: str) -> None:
        """Refuse a prompt too long for the context before tokenizing it (which takes seconds for a
        few megabytes): more characters than the tokens left after gen_length can spell."""
        limit = context_length(self.model)
        if limit is None:
            return
        most = self.prompts.max_characters(limit - options.gen_length)
        if characters > most:
            raise option_error(OptionError("prompt", f"the prompt ({characters} characters) cannot fit the model's "
                                                     f"context of {limit} tokens with gen_length {options.gen_length} "
                                                     f"(at most {most} characters with this tokenizer); shorten "
                                                     "the prompt or lower gen_length"),
                               max_tokens_field, prompt_field)

    async def tokenize(self, encode, text, infill: bool, prompt_field: str, deadline: float) -> list[int]:
        """Token ids, computed in a tokenizer thread: a long prompt takes seconds, which on the event
        loop would stall every other request and /health. Several threads, so one client's prompt
        does not queue everyone else's; the request's timeout runs meanwhile."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self.tokenize_threads, encode, text, infill),
                                          timeout=max(deadline - time.monotonic(), 0.0))
        except asyncio.TimeoutError:
            raise as_api_error(RequestTimeout("the request did not finish within its timeout (while tokenizing "
                                              "the prompt)")) from None
        except PromptError as e:
            raise APIError(400, str(e), prompt_field) from None
        except jinja2.TemplateError as e:   # a template may reject an ordering of roles
            raise APIError(400, f"the chat template rejected these messages: {e}", prompt_field) from None

    def check_prompt(self, options: SamplerOptions | BlockOptions, prompt: list[int], infill: bool,
                     prompt_field: str, max_tokens_field: str) -> None:
        """What needs the prompt: its length against the context, and masks in it (infilling;
        a block-diffusion model decodes only after the prompt, so it cannot fill them)."""
        masked = self.mask_id in prompt
        if masked and not infill:   # a tokenizer that ignores split_special_tokens, or a non-special mask token
            raise APIError(400, "the prompt encodes to the mask token, which this tokenizer cannot encode as text: "
                                'remove it, or send "infill": true to fill those positions', prompt_field)
        if masked and self.block_diffusion:
            raise APIError(400, "infilling is not supported by block-diffusion (LLaDA2.x) models: they decode the "
                                "blocks after the prompt, so masks in the prompt would stay masks", "infill")
        try:
            options.check_for_model(self.model, len(prompt), self.mask_id,
                                    **({} if self.block_diffusion else {"prompt_masked": masked}))
        except OptionError as e:
            raise option_error(e, max_tokens_field, prompt_field) from None

    def submit(self, req: SamplingRequest, prompt: list[int], options: SamplerOptions, deadline: float) -> Job:
        job = Job(prompt=prompt, options=options, loop=asyncio.get_running_loop(),
                  deadline=deadline, stop=self.stop_sequences(req.stop),
                  seed=req.seed, stream=req.stream, progress=req.diffusion_progress and req.stream,
                  adapter=self.served[req.model])
        try:
            self.scheduler.submit(job)
        except (QueueFull, ShuttingDown) as e:
            raise as_api_error(e) from None
        self.metrics.prompt_tokens.inc(len(prompt))
        return job

    # --- shutdown ---------------------------------------------------------------------------------

    async def drain(self, grace_s: float) -> int:
        """Stop taking work (new requests and /health answer 503; the server keeps listening), give
        accepted requests up to `grace_s` seconds, then end the rest cleanly: a 503 body, or an
        error event and [DONE] on a stream. Returns how many had to be ended."""
        scheduler = self.scheduler
        scheduler.stop_accepting()
        deadline = time.monotonic() + grace_s
        while scheduler.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        unfinished = scheduler.queue_depth + scheduler.in_flight
        await scheduler.close()
        return unfinished

    async def close(self) -> None:
        await self.scheduler.close()
        self.tokenize_threads.shutdown(wait=True)

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


def check_unicode(data) -> None:
    """Refuse text with a lone UTF-16 surrogate (JSON's "\\ud800" escape), which is no Unicode
    character: a 400 naming the field, rather than a tokenizer's error. Walks the body iteratively,
    so its depth (already bounded by the JSON parser) costs no recursion."""
    stack = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str) and SURROGATE.search(value):
            param = ".".join(map(str, path)) or None
            raise APIError(400, f"invalid value for {param}: the text contains a lone surrogate (a \\ud800-\\udfff "
                                "escape not paired into one character), which is not Unicode", param, "invalid_text")
        if isinstance(value, dict):
            for key, item in value.items():
                if SURROGATE.search(key):
                    param = ".".join(map(str, path)) or None
                    raise APIError(400, "a field name contains a lone surrogate, which is not Unicode", param,
                                   "invalid_text")
                stack.append(((*path, key), item))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in enumerate(value))


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
    (so a streamed response is timed to its end, not to its headers).

    An exception that reaches it before a response started is counted as the status the client
    gets for it (`as_api_error`); one that ends as a client error (4xx) is answered here, so it is
    neither counted nor logged as a 500 with a traceback, which stays for real server errors."""

    ROUTES = {"/", "/health", "/version", "/metrics", "/rows", "/v1/models", "/v1/chat/completions", "/v1/completions"}

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.ROUTES else "other"
        started, status, responded = time.monotonic(), 500, False

        async def send_and_count(message):
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except Exception as e:
            if responded:   # the response had started: it is what the client got
                raise
            error = as_api_error(e)
            status = error.status
            if status >= 500:
                raise
            await error.response()(scope, receive, send)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=status)
            if endpoint.startswith("/v1/"):
                self.metrics.latency.observe(time.monotonic() - started, endpoint=endpoint)


class OpenAICORS(CORSMiddleware):
    """Starlette's CORS, with a refused preflight (an origin, method or header not allowed) in the
    OpenAI error shape like every other error, instead of plain text."""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return APIError(400, f"CORS preflight refused: {response.body.decode()} (see --allowed-origins)",
                        code="cors_refused", headers=headers).response()


def create_app(model, tokenizer, config: ServeConfig | None = None, adapters=None) -> FastAPI:
    """A FastAPI app serving `model` (and with `adapters`, an AdapterSet on it, each adapter under
    its name); the scheduler starts and stops with the app's lifespan."""
    server = Server(model, tokenizer, config or ServeConfig(), adapters)
    page = (STATIC / "index.html").read_text(encoding="utf-8").replace("{{page_config}}", json.dumps(
        {"chat": chat_tuned(server.prompts, server.config.model_name), "api_key": server.config.api_key is not None,
         "block_diffusion": server.block_diffusion}))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        c = server.config
        server.scheduler = Scheduler(server.runner, max_batch_size=c.max_batch_size, max_queue=c.max_queue,
                                     window_s=c.batch_window_ms / 1000, max_batch_tokens=c.max_batch_tokens)
        server.scheduler.start()
        yield
        await server.close()

    app = FastAPI(title="unmask", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    app.add_middleware(CountRequests, metrics=server.metrics)
    if server.config.allowed_origins:
        app.add_middleware(OpenAICORS, allow_origins=list(server.config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """Routing errors (404, 405) in the same shape as every other error."""
        what = f"{request.method} {request.url.path}"
        message = {404: f"{what}: no such endpoint (see docs/serve.md)",
                   405: f"{what}: method not allowed (allowed: {(e.headers or {}).get('Allow', '?')})"}
        code = {404: "not_found", 405: "method_not_allowed"}
        return APIError(e.status_code, message.get(e.status_code, str(e.detail)), code=code.get(e.status_code),
                        headers=e.headers).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return as_api_error(e).response()

    v1 = [Depends(server.admit)]

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if not server.accepting:
            raise APIError(503, "the server is not accepting requests", code="unavailable", type="server_error")
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        from .. import __version__
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/rows")
    async def rows():
        """The running rows and the step each is at, and how many wait (the live page polls it)."""
        scheduler = server.scheduler
        return {"rows": scheduler.snapshot() if scheduler else [], "queued": scheduler.queue_depth if scheduler else 0}

    @app.get("/v1/models", dependencies=v1)
    async def models():
        created = now()
        base = server.config.model_name
        return ModelList(data=[ModelCard(id=name, created=created, parent=None if adapter is None else base)
                               for name, adapter in server.served.items()]).dump()

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(request: Request):
        deadline = server.deadline()
        req = await server.parse(request, ChatCompletionRequest)
        server.check_common(req)
        if not req.messages:
            raise APIError(400, "messages must contain at least one message", "messages")
        if req.logprobs:
            raise APIError(400, "logprobs are not supported by the diffusion sampler", "logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", "max_completion_tokens")
        max_field = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        max_tokens = req.max_tokens if req.max_completion_tokens is None else req.max_completion_tokens
        options = server.options(req, max_tokens, max_field)
        for i, m in enumerate(req.messages):
            if m.name is not None:
                raise APIError(400, "message names are not supported: the chat template has no place for them "
                                    "(drop name)", f"messages.{i}.name")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        server.check_size(options, sum(len(m["content"]) for m in messages), "messages", max_field)
        prompt = await server.tokenize(server.prompts.chat, messages, req.infill, "messages", deadline)
        server.check_prompt(options, prompt, req.infill, "messages", max_field)
        job = server.submit(req, prompt, options, deadline)
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

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request):
        deadline = server.deadline()
        req = await server.parse(request, CompletionRequest)
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
        options = server.options(req, req.max_tokens, "max_tokens")
        server.check_size(options, len(req.prompt), "prompt", "max_tokens")
        prompt = await server.tokenize(server.prompts.completion, req.prompt, req.infill, "prompt", deadline)
        server.check_prompt(options, prompt, req.infill, "prompt", "max_tokens")
        job = server.submit(req, prompt, options, deadline)
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
