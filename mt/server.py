"""`mt serve`: the HTTP API and web page over `mt.serving`'s batching workers (FastAPI + uvicorn).

- `POST /translate`, `GET /languages`: LibreTranslate's API (JSON or form bodies), so its clients work.
- `POST /v1/translate`: segments plus decoding options -> one result per segment (n-best with
  scores, cross-attention weights, piece alignment).
- `GET /health`, `GET /metrics` (Prometheus text), `GET /docs` (OpenAPI), `GET /` (the web page).

Every problem with a request is a 4xx `{"error": "..."}` naming it; a worker never dies of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from mt.config import directions
from mt.decoding import DecodeOptions
from mt.errors import MTError
from mt.serving import BatchingWorker, Job, Metrics, ServeLimits
from mt.translate import Translator

log = logging.getLogger(__name__)

LANGUAGE_NAMES = {
    "ar": "Arabic", "cs": "Czech", "de": "German", "en": "English", "es": "Spanish", "fi": "Finnish",
    "fr": "French", "hi": "Hindi", "it": "Italian", "ja": "Japanese", "ko": "Korean", "nl": "Dutch",
    "pl": "Polish", "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "tr": "Turkish",
    "uk": "Ukrainian", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip


class RequestError(Exception):
    """A request the server cannot serve: answered with `status` and `{"error": message}`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Model:
    """One served model: its directions (one pair, or a multilingual model's), translator and batching worker."""

    def __init__(self, translator: Translator, limits: ServeLimits, metrics: Metrics):
        self.directions = [(d.src, d.tgt) for d in directions(translator.config.data)]
        self.name = ",".join(f"{s}-{t}" for s, t in self.directions)
        self.translator = translator
        self.worker = BatchingWorker(self.name, translator, limits, metrics)


@dataclass(frozen=True)
class Route:
    """Where a request for `source` -> `target` goes."""

    model: Model
    source: str
    target: str

    @property
    def name(self) -> str:
        return f"{self.source}-{self.target}"

    def options(self) -> DecodeOptions:
        """The model's decoding defaults, into `target` (a multilingual model's tag)."""
        return self.model.translator.options(tgt_lang=self.target)


class Service:
    """The served models and what a request may ask of them; HTTP-free apart from the key's headers."""

    def __init__(self, translators: list[Translator], limits: ServeLimits, api_key: str | None):
        self.limits, self.api_key, self.metrics = limits, api_key, Metrics()
        self.routes: dict[str, Route] = {}  # direction (de-en) -> the model that serves it
        self.models: dict[str, Model] = {}
        for translator in translators:
            model = Model(translator, limits, self.metrics)
            for source, target in model.directions:
                route = Route(model, source, target)
                if route.name in self.routes:
                    raise MTError(f"two models for {route.name}: serve one model per direction")
                self.routes[route.name] = route
            self.models[model.name] = model

    def stop(self) -> None:
        """Finish what is queued, then end the workers."""
        for model in self.models.values():
            model.worker.stop()

    def languages(self) -> list[dict[str, Any]]:
        targets: dict[str, list[str]] = {}
        for route in self.routes.values():
            targets.setdefault(route.source, []).append(route.target)
        return [{"code": c, "name": LANGUAGE_NAMES.get(c, c), "targets": t} for c, t in sorted(targets.items())]

    def pick(self, source: Any, target: Any) -> Route:
        if not isinstance(source, str) or not isinstance(target, str):
            raise RequestError("source and target: expected language codes (strings), e.g. de and en")
        if source == "auto":
            matches = [r for r in self.routes.values() if r.target == target]
            if len(matches) == 1:
                return matches[0]
            raise RequestError(f"source auto: {len(matches)} models translate into {target!r}; name the source")
        route = self.routes.get(f"{source}-{target}")
        if route is None:
            raise RequestError(f"no model for {source}-{target}; this server has {', '.join(self.routes)}")
        return route

    def check_key(self, body: dict[str, Any], headers: Any) -> None:
        """The API key from the body's `api_key`, an X-API-Key or a Bearer header, compared in constant time."""
        if self.api_key is None:
            return
        given = body.get("api_key") or headers.get("x-api-key") or ""
        bearer = headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:]
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise RequestError("invalid or missing API key", 403)

    async def run(self, model: Model, job: Job) -> Any:
        try:
            return await asyncio.wrap_future(model.worker.submit(job))
        except MTError as exc:  # e.g. a beam wider than the vocabulary
            raise RequestError(str(exc)) from None

    async def libretranslate(self, body: dict[str, Any]) -> dict[str, Any]:
        route = self.pick(body.get("source"), body.get("target"))
        model = route.model
        q = body.get("q")
        segments = _segments(q, "q", self.limits)
        if body.get("format", "text") != "text":
            raise RequestError("format: only text is supported")
        alternatives = _integer(body.get("alternatives", 0), "alternatives", 0, self.limits.max_beam - 1)
        options = route.options()
        if alternatives:
            options = replace(options, beam=max(options.beam, alternatives + 1), nbest=alternatives + 1)
        found = await self.run(model, Job(segments, options))
        texts = [hyps[0].text for hyps in found]
        answer: dict[str, Any] = {"translatedText": texts if isinstance(q, list) else texts[0]}
        if alternatives:
            others = [[h.text for h in hyps[1:]] for hyps in found]
            answer["alternatives"] = others if isinstance(q, list) else others[0]
        return answer

    async def translate_v1(self, body: dict[str, Any]) -> dict[str, Any]:
        known = {"segments", "source", "target", "beam", "length_penalty", "nbest", "attention", "alignment"}
        unknown = sorted(set(body) - known - {"api_key"})
        if unknown:
            raise RequestError(f"{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        route = self.pick(body.get("source"), body.get("target"))
        model = route.model
        segments = _segments(body.get("segments"), "segments", self.limits, require_list=True)
        options = _options(route.options(), body, self.limits)
        attention, alignment = _flag(body, "attention"), _flag(body, "alignment")
        if not (attention or alignment):
            found = await self.run(model, Job(segments, options))
            return {"model": route.name, "results": [_result(hyps, options) for hyps in found]}
        if len(segments) > 1:
            raise RequestError("attention and alignment: one segment per request")
        if not segments[0].strip():
            return {"model": route.name, "results": [{"translation": "", "score": 0.0}]}
        found = await self.run(model, Job(segments, options, attention=True))
        return {"model": route.name, "results": [_attention_result(*found, attention, alignment)]}


def create_app(
    translators: list[Translator],
    limits: ServeLimits = ServeLimits(),
    api_key: str | None = None,
    cors_origin: str | None = None,
) -> FastAPI:
    """The FastAPI application serving `translators`, keyed by their language pair."""
    service = Service(translators, limits, api_key)
    metrics = service.metrics

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.to_thread(service.stop)  # after the last request

    app = FastAPI(
        title="mt translation server",
        description="LibreTranslate-compatible `/translate` and `/languages`, and mt's own `/v1/translate`.",
        version="1",
        lifespan=lifespan,
    )
    if cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"])
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error(request, metrics, str(exc), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(request, metrics, str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:  # a bug, not the request's fault
        log.exception("%s failed", request.url.path)
        return _error(request, metrics, f"internal error ({type(exc).__name__}); see the server's log", 500)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("mt").joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", summary="Liveness, and the served models")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(service.routes)}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics_text() -> PlainTextResponse:
        queued = {name: model.worker.jobs.qsize() for name, model in service.models.items()}
        return PlainTextResponse(metrics.render(queued), media_type="text/plain; version=0.0.4")

    @app.get("/languages", summary="LibreTranslate: the languages and their targets")
    async def languages() -> list[dict[str, Any]]:
        return service.languages()

    @app.post("/translate", summary="LibreTranslate: translate q (a string or a list of strings)")
    async def libretranslate(request: Request) -> JSONResponse:
        started, body = time.monotonic(), await _body(request)
        service.check_key(body, request.headers)
        return _ok(request, metrics, await service.libretranslate(body), started)

    @app.post("/v1/translate", summary="Segments and decoding options -> one result per segment, in order")
    async def translate_v1(request: Request) -> JSONResponse:
        started, body = time.monotonic(), await _body(request)
        service.check_key(body, request.headers)
        return _ok(request, metrics, await service.translate_v1(body), started)

    return app


def _result(hyps: list, options: DecodeOptions) -> dict[str, Any]:
    result: dict[str, Any] = {"translation": hyps[0].text, "score": hyps[0].score}
    if options.nbest > 1:
        result["nbest"] = [{"translation": h.text, "score": h.score} for h in hyps]
    return result


def _attention_result(
    weights: Tensor, src_pieces: list[str], tgt_pieces: list[str], text: str, attention: bool, alignment: bool
) -> dict:
    """What `Translator.attention` returned, as JSON: the pieces, and the weights and/or an alignment."""
    result: dict[str, Any] = {"translation": text, "source_pieces": src_pieces, "target_pieces": tgt_pieces}
    if attention:  # (layers, heads, target pieces, source pieces), to 4 decimals: enough to draw
        result["attention"] = weights.mul(10_000).round().div(10_000).tolist()
    if alignment:  # each target piece to the source piece the last layer attends to most (heads averaged)
        best = weights[-1].mean(dim=0).argmax(dim=-1).tolist()
        result["alignment"] = [[t, s] for t, s in enumerate(best)]
    return result


def _options(defaults: DecodeOptions, body: dict[str, Any], limits: ServeLimits) -> DecodeOptions:
    beam = _integer(body.get("beam", defaults.beam), "beam", 1, limits.max_beam)
    nbest = _integer(body.get("nbest", 1), "nbest", 1, beam)
    penalty = body.get("length_penalty", defaults.length_penalty)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 <= penalty <= 5:
        raise RequestError("length_penalty: expected a number between 0 and 5")
    return replace(defaults, beam=beam, nbest=nbest, length_penalty=float(penalty))


def _segments(value: Any, name: str, limits: ServeLimits, require_list: bool = False) -> list[str]:
    segments = value if isinstance(value, list) else None if require_list else [value]
    if segments is None or not all(isinstance(s, str) for s in segments):
        kind = "a list of strings" if require_list else "a string or a list of strings"
        raise RequestError(f"{name}: expected {kind}")
    if not segments:
        raise RequestError(f"{name}: empty list")
    if len(segments) > limits.max_segments:
        raise RequestError(f"{name}: {len(segments)} segments, at most {limits.max_segments} per request", 413)
    longest = max(len(s) for s in segments)
    if longest > limits.max_chars:
        raise RequestError(f"{name}: a segment of {longest} characters, at most {limits.max_chars}", 413)
    return segments


def _integer(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # form bodies carry text
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{name}: expected a whole number from {low} to {high}")
    return value


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"{name}: expected true or false")
    return value


async def _body(request: Request) -> dict[str, Any]:
    """A JSON object, or form fields (urlencoded or multipart), as LibreTranslate accepts."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw = await request.body()
    if kind == "application/x-www-form-urlencoded":
        try:
            pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw), errors="strict")
        except UnicodeDecodeError:
            raise RequestError("the form body is not UTF-8 (after %-decoding)") from None
        except ValueError:
            raise RequestError("the form body is not key=value pairs (JSON needs a JSON content type)") from None
        return _form(pairs)
    if kind == "multipart/form-data":
        try:
            form = await request.form()
        except Exception as exc:  # python-multipart's errors vary by version
            raise RequestError(f"the multipart body cannot be read ({exc})") from None
        return _form([(k, v) for k, v in form.multi_items() if isinstance(v, str)])
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RequestError(f"the body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    return body


def _form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for key, value in pairs:
        if key == "q" and "q" in body:  # q repeated: several segments
            body["q"] = [*body["q"], value] if isinstance(body["q"], list) else [body["q"], value]
        else:
            body[key] = value
    return body


def _ok(request: Request, metrics: Metrics, answer: dict[str, Any], started: float) -> JSONResponse:
    metrics.request(request.url.path, 200, time.monotonic() - started)
    return JSONResponse(answer)


def _error(request: Request, metrics: Metrics, message: str, status: int) -> JSONResponse:
    metrics.request(request.url.path, status, 0.0)
    return JSONResponse({"error": message}, status_code=status)


class _BodyLimit:
    """Refuse a request body over `max_bytes` with 413, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise RequestError(f"the body is larger than {self.max_bytes} bytes", 413)
            return message

        try:
            await self.app(scope, counted, send)
        except RequestError:  # raised while the body streamed in, before any answer was started
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps({"error": f"the body is larger than {self.max_bytes} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _Server(uvicorn.Server):
    """uvicorn's server with mt's signal handling: uvicorn's own re-raises SIGTERM once it has shut
    down, which would end the process by that signal instead of with exit code 0."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(app: FastAPI, host: str, port: int) -> None:
    """Run `app` until SIGINT/SIGTERM: then stop accepting, answer the requests in progress, return."""
    mt_log = logging.getLogger("mt")
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's lines go where mt's go: stderr
        logging.getLogger(name).handlers = list(mt_log.handlers)
        logging.getLogger(name).setLevel(mt_log.level)
        logging.getLogger(name).propagate = False
    server = _Server(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False))
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s: anyone who can reach this address can use the server", host)

    def stop(number: int, frame) -> None:
        log.info("%s received: answering the requests in progress, then stopping", signal.Signals(number).name)
        server.should_exit = True

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, stop)
    server.run()
