"""The HTTP side: an ASGI app (Starlette) speaking OpenAI's completions API.

Routes: POST /v1/completions (JSON, or server-sent events with stream:
true, ending in `data: [DONE]`), GET /v1/models, GET /v1/models/{id},
GET /health. POST /v1/chat/completions answers 404: GPT-2 has no chat
template. Every error, from a bad body to an unknown route, is OpenAI's
error JSON ({"error": {"message", "type", "param", "code"}}). With an API
key, every /v1 route needs `Authorization: Bearer KEY`.

A request's body is read up to MAX_BODY_BYTES, checked
(utils/serving/request.py) and handed to the scheduler as a Job; its pieces
come back on the job's queue. A client that goes away, streaming or not,
cancels its job, and the scheduler drops its rows before the next step.
One line per request is printed when it ends: method, path, status, tokens
and seconds.
"""
import asyncio
import hmac
import json
import time
import uuid
from typing import Callable, Dict, List, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from utils.serving.request import (MAX_BODY_BYTES, APIError, bad, parse_completion,
                                   parse_json)
from utils.serving.scheduler import Job, Piece, Scheduler

OWNER = "gpt2-texar"
# Seconds a stream may take to send its last pieces once the server stops.
SHUTDOWN_GRACE_S = 3.0


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Model:
    """What the app serves: the scheduler, the tokenizer and the model's name
    and sizes."""

    def __init__(self, scheduler: Scheduler, encoder, name: str, n_ctx: int,
                 n_vocab: int, end_token: int):
        self.scheduler, self.encoder, self.name = scheduler, encoder, name
        self.n_ctx, self.n_vocab, self.end_token = n_ctx, n_vocab, end_token
        self.created = int(time.time())

    def card(self) -> Dict:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": OWNER, "max_model_len": self.n_ctx}


def build_app(model: Model, api_key: Optional[str] = None,
              log: Callable[[str], None] = print) -> "RequestLog":
    async def health(request: Request):
        return JSONResponse({"status": "ok", "model": model.name,
                             "rows": model.scheduler.busy_rows})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [model.card()]})

    async def one_model(request: Request):
        if request.path_params["name"] != model.name:
            raise APIError(404, f"The model {request.path_params['name']!r} does not "
                                f"exist: this server serves {model.name!r}",
                           code="model_not_found")
        return JSONResponse(model.card())

    async def chat(request: Request):
        raise APIError(404, "this server has no /v1/chat/completions: GPT-2 has no "
                            "chat template. Use /v1/completions with a prompt",
                       code="unsupported_endpoint")

    async def completions(request: Request):
        data = parse_json(await _read_body(request))
        completion = parse_completion(data, model_name=model.name,
                                      encoder=model.encoder, n_ctx=model.n_ctx,
                                      n_vocab=model.n_vocab,
                                      end_token=model.end_token)
        job = Job(completion, asyncio.get_running_loop())
        model.scheduler.submit(job)
        usage = request.scope.setdefault("usage", {})
        usage["prompt_tokens"] = sum(len(c) for c in completion.contexts)
        response = _Response(job, model.name, usage)
        if completion.stream:
            return EventSourceResponse(response.stream(), ping=15,
                                       shutdown_event=asyncio.Event(),
                                       shutdown_grace_period=SHUTDOWN_GRACE_S)
        return await response.whole(request)

    async def api_error(request: Request, error: APIError):
        return error_response(error)

    async def server_error(request: Request, error: Exception):
        return error_response(APIError(500, "the server failed on this request (see "
                                            "its log)", kind="server_error"))

    async def http_error(request: Request, error: HTTPException):
        kind = "invalid_request_error"
        return error_response(APIError(error.status_code, f"{request.method} "
                                       f"{request.url.path}: {error.detail}",
                                       kind=kind, headers=error.headers))

    app = Starlette(routes=[
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ], exception_handlers={APIError: api_error, HTTPException: http_error,
                           Exception: server_error})
    return RequestLog(_Auth(app, api_key) if api_key else app, log)


async def _read_body(request: Request) -> bytes:
    """The body, refused (without reading it all) past MAX_BODY_BYTES."""
    too_big = bad(f"the request body is larger than {MAX_BODY_BYTES} bytes: send "
                  f"fewer or shorter prompts")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


class _Response:
    """A job's pieces assembled into OpenAI's completion objects."""

    def __init__(self, job: Job, model_name: str, usage: Dict):
        self.job, self.request = job, job.request
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_name, self.usage = model_name, usage
        self.usage["completion_tokens"] = 0
        self.unfinished = self.request.rows

    async def _pieces(self) -> List[Piece]:
        """The next pieces; raises the job's APIError when it failed."""
        items = await self.job.events.get()
        if isinstance(items, APIError):
            raise items
        for piece in items:
            if piece.finish_reason:
                self.unfinished -= 1
                self.usage["completion_tokens"] += piece.completion_tokens
        return items

    def _choice(self, piece_text: str, choice: int, records, finish_reason):
        logprobs = None
        if self.request.logprobs is not None:
            logprobs = {"tokens": [r.token for r in records],
                        "token_logprobs": [r.logprob for r in records],
                        "top_logprobs": [r.top for r in records],
                        "text_offset": [r.offset for r in records]}
        return {"index": choice, "text": piece_text, "logprobs": logprobs,
                "finish_reason": finish_reason}

    def _object(self, choices, usage=False) -> Dict:
        body = {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model_name, "choices": choices}
        if usage:
            body["usage"] = self._usage()
        return body

    def _usage(self) -> Dict[str, int]:
        prompt, completion = self.usage["prompt_tokens"], self.usage["completion_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    async def whole(self, request: Request) -> Response:
        """All choices at once; the job is cancelled if the client leaves."""
        texts = [[] for _ in range(self.request.rows)]
        records = [[] for _ in range(self.request.rows)]
        reasons = [None] * self.request.rows
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while self.unfinished:
                waiting = asyncio.ensure_future(self._pieces())
                await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():
                    waiting.cancel()
                    self.job.cancel()
                    return Response(status_code=499)  # nobody reads it
                for piece in waiting.result():
                    texts[piece.choice].append(piece.text)
                    records[piece.choice] += piece.logprobs
                    reasons[piece.choice] = piece.finish_reason or reasons[piece.choice]
        finally:
            gone.cancel()
        choices = [self._choice("".join(t), i, r, f)
                   for i, (t, r, f) in enumerate(zip(texts, records, reasons))]
        return JSONResponse(self._object(choices, usage=True))

    async def stream(self):
        """Server-sent events: one chunk per decoded piece, then [DONE]."""
        try:
            while self.unfinished:
                try:
                    pieces = await self._pieces()
                except APIError as error:
                    yield {"data": json.dumps(error.body())}
                    return
                for piece in pieces:
                    chunk = self._choice(piece.text, piece.choice, piece.logprobs,
                                         piece.finish_reason)
                    yield {"data": json.dumps(self._object([chunk]))}
            if self.request.include_usage:
                yield {"data": json.dumps(self._object([], usage=True))}
            yield {"data": "[DONE]"}
        finally:
            if self.unfinished:
                self.job.cancel()  # the client went away, or the server stops


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Auth:
    """Every /v1 route needs `Authorization: Bearer <key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect or missing API key: send the "
                                      "server's --api_key as 'Authorization: Bearer "
                                      "KEY'", code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        await self.app(scope, receive, send)


class RequestLog:
    """Prints one line per HTTP request when its response ends."""

    def __init__(self, app, log: Callable[[str], None]):
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = {"code": 0}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            usage = scope.get("usage", {})
            tokens = (f" prompt {usage.get('prompt_tokens', 0)} completion "
                      f"{usage.get('completion_tokens', 0)} tokens" if usage else "")
            code = status["code"] or "disconnected"
            self.log(f"{scope['method']} {scope['path']} {code}{tokens} "
                     f"{time.perf_counter() - start:.2f} s")
