"""The HTTP side of rmtorch.serve: request schemas, routes, errors, the API key and the body limit (FastAPI).

Every scoring route turns its request into token-id rows (in a thread of its own, so the event loop keeps
answering), hands them to the model worker (`rmtorch.serve.batcher`) and answers when its rows are scored. Full
texts (`/get_reward`, `/classify`) are scored token for token as sent: tokenized with add_special_tokens=False and
nothing appended, as OpenRLHF's server does and as verl asks of vLLM (vLLM's own default adds special tokens;
`/classify` takes `add_special_tokens` as vLLM does), so the client's chat template must be the one the reward
model was trained with. `/score` formats rows as training did (`RewardScorer.split`). `/score` with part "steps"
(a process reward model) runs `RewardScorer.score_steps` in a thread of its own, outside the batcher: its forward
takes the model's lock, so other requests' forwards wait for it and go on after.

Every error is a JSON body `{"error": {"type": ..., "message": ...}}` with its status: 400 bad request, 401 API
key, 413 body or request too large, 499 client gone (never read), 500 the forward of the request's batch raised
(or gave a non-finite reward), 503 queue full or shutting down (with Retry-After).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import re
import secrets
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from rmtorch.config import ServeConfig
from rmtorch.formatting import chat_opening, restore_chat_bos
from rmtorch.normalize import RewardNormalizer
from rmtorch.score import RewardScorer
from rmtorch.serve.batcher import Batcher, ForwardFailed, Overloaded, RequestTooLarge, Scored
from rmtorch.serve.metrics import ServeMetrics
from rmtorch.steps import AGGREGATIONS, DEFAULT_SEPARATOR, run_step_options
from rmtorch.thinking import PARTS, SplitCompletions, split_rows

router = APIRouter()
logger = logging.getLogger(__name__)
NonEmptyIds = Annotated[list[int], Field(min_length=1)]
# json.loads joins a valid surrogate pair into one character: a surrogate left in a string stands alone.
UNPAIRED_SURROGATE = re.compile("[\ud800-\udfff]")


# ------------------------------------------------------------------------------------------------ requests


def unpaired_surrogate_message(field: str, surrogate: str, position: int) -> str:
    return (
        f"{field} holds an unpaired UTF-16 surrogate (\\u{ord(surrogate):04x}) at character {position}: that is not "
        "Unicode text and no tokenizer reads it (a text cut inside a surrogate pair, an emoji say, ends so). Repair "
        "the text where it is made, or replace the character (e.g. with U+FFFD)."
    )


def check_unicode(value: Any, field: str) -> Any:
    """`value` unchanged, or a ValueError naming the first string in it (a text, or one inside lists and messages)
    that holds an unpaired surrogate: the tokenizer raises on it, and no answer or log line can encode it."""
    stack = [(field, value)]  # a loop, not recursion: JSON may nest deeper than Python's recursion limit
    while stack:
        where, item = stack.pop()
        if isinstance(item, str) and (found := UNPAIRED_SURROGATE.search(item)):
            raise ValueError(unpaired_surrogate_message(where, found[0], found.start()))
        if isinstance(item, list):
            stack.extend((f"{where}[{i}]", item[i]) for i in reversed(range(len(item))))
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                stack.append((f"{where}.{key}", inner))
                stack.append((f"A key of {where}", key))
    return value


def unicode_fields(*fields: str):
    """A validator of a request model's `fields` (see check_unicode): a 400 naming the field, row and character."""
    return field_validator(*fields)(lambda value, info: check_unicode(value, info.field_name))


class ScoreRequest(BaseModel):
    """rmtorch's own: rows formatted as training formatted them, or token ids as they are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[Any] | None = Field(None, description="Strings, message lists or nulls, one per completion.")
    completions: list[Any] | None = Field(None, min_length=1, description="Strings or message lists.")
    input_ids: list[NonEmptyIds] | None = Field(None, min_length=1, description="Formatted rows as token ids.")
    prompt_lengths: list[int] | None = Field(None, description="Prompt tokens of each input_ids row (default 0).")
    part: Literal[(*PARTS, "steps")] = Field("full", description="'steps': step rewards of a process reward model.")
    step_separator: str | None = Field(None, min_length=1, description="part steps: the text after each step.")
    aggregation: Literal[AGGREGATIONS] | None = Field(None, description="part steps: a row's reward from its steps.")
    return_details: bool = False

    _texts_are_unicode = unicode_fields("prompts", "completions", "step_separator")

    @model_validator(mode="after")
    def _one_kind_of_rows(self) -> ScoreRequest:
        if (self.completions is None) == (self.input_ids is None):
            raise ValueError("Give either completions (with prompts) or input_ids, one of the two.")
        if self.prompts is not None and self.completions is None:
            raise ValueError("prompts go with completions; with input_ids, give prompt_lengths.")
        if self.prompt_lengths is not None:
            if self.input_ids is None:
                raise ValueError("prompt_lengths go with input_ids; with completions, give prompts.")
            if len(self.prompt_lengths) != len(self.input_ids):
                raise ValueError(
                    f"Got {len(self.prompt_lengths)} prompt_lengths for {len(self.input_ids)} input_ids rows; give "
                    "one per row."
                )
        if self.part != "steps" and (self.step_separator is not None or self.aggregation is not None):
            raise ValueError("step_separator and aggregation go with part 'steps'.")
        if self.part == "steps" and self.completions is None:
            raise ValueError(
                "part 'steps' takes prompts and completions (each a list of step strings, or one string the step "
                "separator splits), not input_ids."
            )
        return self


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model request (other fields are ignored, as its own server does)."""

    model_config = ConfigDict(strict=True)

    query: list[str] = Field(min_length=1, description="Full texts: prompt and response, chat template applied.")
    prompts: list[str | None] | None = Field(None, description="Accepted, not needed: shared prefixes are found.")
    labels: list[Any] | None = Field(None, description="Accepted and ignored (rule-based rewards use them).")

    _texts_are_unicode = unicode_fields("query")


class ClassifyRequest(BaseModel):
    """vLLM's /classify request as verl's reward loop sends it (other vLLM fields are ignored)."""

    model_config = ConfigDict(strict=True)

    model: str | None = Field(None, description="Accepted, not checked: verl sends the model's path.")
    input: list[str] = Field(min_length=1, description="A full text, or a list of them.")
    use_activation: bool | None = Field(None, description="Sigmoid of the reward (vLLM's default); false: the reward.")
    activation: bool | None = Field(None, description="use_activation's older name in vLLM.")
    add_special_tokens: bool = Field(False, description="Let the tokenizer add its special tokens (e.g. a BOS).")

    @field_validator("input", mode="before")
    @classmethod
    def _one_text_is_a_list(cls, value):
        return [value] if isinstance(value, str) else value

    _texts_are_unicode = unicode_fields("input")


# -------------------------------------------------------------------------------------------------- errors


class ApiError(HTTPException):
    """An error answered as {"error": {"type": kind, "message": ...}}. An HTTPException, so FastAPI passes it
    unchanged out of its body reading (where the body limit raises it)."""

    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.kind = kind


STATUS_KINDS = {404: "not_found", 405: "method_not_allowed"}  # errors Starlette raises itself


def error_response(metrics: ServeMetrics, status: int, kind: str, message: str, headers=None) -> JSONResponse:
    metrics.errors.labels(kind).inc()
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def describe_validation_error(error: dict) -> str:
    """A pydantic error as a sentence naming the field, e.g. `query[2]: Input should be a valid string (got 3).`"""
    if error["type"] == "json_invalid":
        return f"The request body is not valid JSON: {error['ctx']['error']} at character {error['loc'][-1]}."
    field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error["loc"][1:]).lstrip(".")
    if error["type"] == "value_error":  # the request models' own checks: already a sentence
        return str(error["ctx"]["error"])
    if error["type"] == "string_unicode" and (found := UNPAIRED_SURROGATE.search(str(error["input"]))):
        return unpaired_surrogate_message(f"A key of {field or 'the request body'}", found[0], found.start())
    if error["type"] == "missing":
        return f"{field or 'The request body'} is required: send a JSON object."
    if isinstance(error["input"], (bytes, str)) and not field:
        return "The body was not read as JSON: send it with the header 'Content-Type: application/json'."
    got = repr(error["input"])
    got = got if len(got) <= 80 else got[:77] + "..."
    return f"{field or 'The request body'}: {error['msg']} (got {got})."


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(request.app.state.serve.metrics, exc.status_code, exc.kind, exc.detail, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = STATUS_KINDS.get(exc.status_code, "http_error")
    return error_response(request.app.state.serve.metrics, exc.status_code, kind, str(exc.detail), exc.headers)


class CatchAll:
    """ASGI middleware: anything unexpected is a JSON 500, logged with its traceback, and the connection serves on.
    (An exception handler for Exception runs in Starlette's outermost middleware, which re-raises after answering,
    so uvicorn would print a second traceback and close the client's keep-alive connection.)"""

    def __init__(self, app, metrics: ServeMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_and_note(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        except Exception as exc:
            logger.exception("Unexpected error answering %s", scope.get("path"))
            if started:  # the answer is half sent: nothing left to do but drop the connection
                raise
            message = f"The server failed on this request: {exc!r}. The server log has the traceback."
            await error_response(self.metrics, 500, "internal_error", message)(scope, receive, send)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    message = describe_validation_error(exc.errors()[0])
    return error_response(request.app.state.serve.metrics, 400, "invalid_request", message)


# ----------------------------------------------------------------------------------- key and body limit


class ApiKeyCheck:
    """ASGI middleware: every path but /health needs `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str, metrics: ServeMetrics):
        self.app, self.expected, self.metrics = app, f"Bearer {api_key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = Headers(scope=scope).get("authorization", "")
            if not secrets.compare_digest(given.encode(), self.expected):
                message = (
                    "Wrong API key." if given else "Missing API key: send the header 'Authorization: Bearer KEY'."
                )
                response = error_response(self.metrics, 401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body over `max_bytes` gets 413, by its Content-Length or, sent in chunks, as it arrives."""

    def __init__(self, app, max_bytes: int, metrics: ServeMetrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    def _message(self, size: str) -> str:
        return (
            f"The request body has {size} bytes; the server takes at most {self.max_bytes} (--max_body_mb). Send "
            "fewer rows per request."
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(self.metrics, 413, "request_too_large", self._message(declared))
            return await response(scope, receive, send)
        received = 0

        async def receive_at_most():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise ApiError(413, "request_too_large", self._message(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, receive_at_most, send)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to log when the server binds beyond this machine without an API key (None: nothing to say)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        loopback = False
    if loopback or api_key:
        return None
    return (
        f"Serving on {host} without an API key: anyone who can reach this port can use the reward model. Pass "
        "--api_key (or set RMTORCH_SERVE_API_KEY), or bind 127.0.0.1."
    )


# -------------------------------------------------------------------------------------------------- state


@dataclass
class ServeState:
    scorer: RewardScorer
    cfg: ServeConfig
    normalizer: RewardNormalizer | None
    metrics: ServeMetrics
    batcher: Batcher
    # Tokenizing runs here, one call at a time: a fast tokenizer is not safe to share across threads, and the
    # event loop stays free to take requests meanwhile.
    tokenizer_thread: ThreadPoolExecutor
    chat_opening: str | None  # with --chat_bos restore: how a rendered chat starts after its BOS text
    # part "steps": score_steps runs here, one request at a time, outside the batcher (see score_steps_request)
    steps_thread: ThreadPoolExecutor
    step_separator: str  # part "steps" without one: the model's run's --step_separator, else "\n"

    def tokenize_texts(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Full texts as OpenRLHF and verl send them → ids, a stripped chat BOS restored (`restore_chat_bos`);
        not when the tokenizer adds its own BOS (add_special_tokens with a BOS-adding tokenizer)."""
        tokenizer = self.scorer.tokenizer
        if self.chat_opening and not (add_special_tokens and self.scorer.bos_id is not None):
            texts = [restore_chat_bos(text, tokenizer, self.chat_opening) for text in texts]
        return [list(ids) for ids in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    async def prepare(self, fn, *args):
        """`fn(*args)` in the tokenizer thread; a ValueError (a bad row) becomes a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.tokenizer_thread, functools.partial(fn, *args)
            )
        except ValueError as err:
            raise ApiError(400, "invalid_request", str(err)) from None

    def normalize(self, rewards: list[float]) -> list[float]:
        if self.normalizer is None:
            return rewards
        return self.normalizer(torch.tensor(rewards), update=False).tolist()


def build_app(scorer: RewardScorer, cfg: ServeConfig, normalizer: RewardNormalizer | None = None) -> FastAPI:
    """The server's FastAPI app around `scorer`; its lifespan starts the model worker and, at shutdown, lets it
    finish what is queued. Serve it with uvicorn (see rmtorch.serve.__main__).

    The scorer carries the model's options (max_length, max_tokens_per_batch, packing, precision); `cfg` gives the
    serving ones (max_wait_ms, max_queue_tokens, on_long_row, api_key, max_body_mb, and the model's name).
    """
    metrics = ServeMetrics()
    batcher = Batcher(
        scorer, max_wait_s=cfg.max_wait_ms / 1000, max_queue_tokens=cfg.max_queue_tokens, metrics=metrics
    )
    metrics.watch_queue(batcher)
    opening = chat_opening(scorer.tokenizer) if cfg.chat_bos == "restore" else None
    state = ServeState(
        scorer, cfg, normalizer, metrics, batcher, ThreadPoolExecutor(1, "rmtorch-serve-tokenizer"), opening,
        ThreadPoolExecutor(1, "rmtorch-serve-steps"),
        run_step_options(cfg.model).get("step_separator", DEFAULT_SEPARATOR),
    )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        # uvicorn has stopped accepting and answered the requests in flight; end the worker after the queue.
        await asyncio.to_thread(batcher.stop)
        state.tokenizer_thread.shutdown()
        state.steps_thread.shutdown()

    app = FastAPI(title="rmtorch.serve", lifespan=lifespan)
    app.state.serve = state
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(CatchAll, metrics=metrics)  # added first: the innermost, around the routes
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * 1e6), metrics=metrics)
    if cfg.api_key:
        app.add_middleware(ApiKeyCheck, api_key=cfg.api_key, metrics=metrics)  # added last: checked first
    return app


# --------------------------------------------------------------------------------------------- scoring


def check_rows(
    cfg: ServeConfig, max_length: int | None, sequences: list[list[int]], field: str, part: str = "full"
) -> None:
    """400 for a row with no tokens, and with --on_long_row refuse for one longer than max_length."""
    for row, ids in enumerate(sequences):
        if not ids and part != "full":
            raise ApiError(
                400, "invalid_request",
                f"{field}[{row}] has no tokens in part={part!r}: nothing stands there (no reasoning end token before "
                "the answer, or nothing after it). Score part='full', or send a prompt with the row.",
            )  # fmt: skip
        if not ids:
            raise ApiError(400, "invalid_request", f"{field}[{row}] has no tokens: there is nothing to score.")
        if cfg.on_long_row == "refuse" and max_length is not None and len(ids) > max_length:
            raise ApiError(
                400, "invalid_request",
                f"{field}[{row}] has {len(ids)} tokens, more than --max_length {max_length}. Shorten it, or start the "
                "server with --on_long_row keep_last to score its last max_length tokens.",
            )  # fmt: skip


@contextmanager
def answer_seconds(serve: ServeState, endpoint: str):
    """Times a request's scoring into the latency histogram when it is answered; errors are counted by kind instead
    (their quick answers would pull the latencies down under overload)."""
    start = time.perf_counter()
    yield
    serve.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)


async def _client_gone(receive) -> None:
    """Returns when the client disconnects (the body was read, so receive() has nothing else to report)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def score_sequences(request: Request, sequences: list[list[int]], field: str, part: str = "full") -> Scored:
    """Queue the rows, wait for the worker's answer, and map the worker's failures to HTTP errors."""
    serve: ServeState = request.app.state.serve
    check_rows(serve.cfg, serve.scorer.max_length, sequences, field, part)
    try:
        job = serve.batcher.submit(sequences)
    except RequestTooLarge as err:
        raise ApiError(413, "request_too_large", str(err)) from None
    except Overloaded as err:
        raise ApiError(503, "overloaded", str(err), {"Retry-After": str(err.retry_after)}) from None
    gone = asyncio.ensure_future(_client_gone(request.receive))
    try:
        await asyncio.wait((job.future, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not job.future.done():  # the client left first: free the queue of its rows
        serve.batcher.cancel(job)
        job.future.cancel()
        raise ApiError(499, "client_closed", "The client closed the connection before its rewards were ready.")
    try:
        scored = job.future.result()
    except ForwardFailed as err:
        raise ApiError(500, "forward_failed", str(err)) from None
    nonfinite = [row for row, reward in enumerate(scored.rewards) if not math.isfinite(reward)]
    if nonfinite:  # JSON has no NaN; a silent null or 0 would pass as a reward
        raise ApiError(
            500, "nonfinite_reward",
            f"The reward model gave a non-finite reward (NaN or inf) to {field}{nonfinite[:10]}; with --bf16, try "
            "fp32 (--bf16 false).",
        )  # fmt: skip
    return scored


def _score_request_split(scorer: RewardScorer, body: ScoreRequest) -> SplitCompletions:
    if body.input_ids is None:
        prompts = body.prompts if body.prompts is not None else [None] * len(body.completions)
        return scorer.split(prompts, body.completions)
    vocab_size = scorer.vocab_size
    for row, ids in enumerate(body.input_ids):
        bad = next((i for i in ids if not 0 <= i < vocab_size), None)
        if bad is not None:
            raise ValueError(
                f"input_ids[{row}] holds the id {bad}, outside the model's vocabulary 0..{vocab_size - 1}."
            )
    prompt_lengths = body.prompt_lengths or [0] * len(body.input_ids)
    for row, (ids, prompt_length) in enumerate(zip(body.input_ids, prompt_lengths)):
        if not 0 <= prompt_length < len(ids):
            raise ValueError(
                f"prompt_lengths[{row}] is {prompt_length}; it must leave input_ids[{row}] ({len(ids)} ids) at least "
                "one completion token."
            )
    split = split_rows(body.input_ids, prompt_lengths, scorer.think)
    split.dropped_text = torch.zeros(len(body.input_ids), dtype=torch.bool)  # no chat template: nothing left out
    return split


async def score_steps_request(serve: ServeState, body: ScoreRequest) -> JSONResponse:
    """/score with part "steps": `RewardScorer.score_steps` (the same ids, step ends and forward as the library), in
    the steps thread, not the batcher: its rows are scored in the scorer's own micro-batches under the model's
    lock (`lock_of`), so the batcher's forwards wait while it runs and the event loop keeps answering. Rewards are
    raw: a --normalize fitted on outcome rewards does not apply to step rewards."""
    scorer = serve.scorer
    if scorer.reward_model is None:
        raise ApiError(400, "invalid_request", "part 'steps' needs the torch engine; this server runs vLLM.")
    separator = body.step_separator or serve.step_separator
    aggregation = body.aggregation or "min"
    prompts = body.prompts if body.prompts is not None else [None] * len(body.completions)  # refused by row
    if len(prompts) != len(body.completions):
        message = f"Got {len(prompts)} prompts for {len(body.completions)} completions; give one prompt each."
        raise ApiError(400, "invalid_request", message)
    call = functools.partial(
        scorer.score_steps, prompts, body.completions, separator=separator, aggregation=aggregation
    )
    try:
        scored = await asyncio.get_running_loop().run_in_executor(serve.steps_thread, call)
    except ValueError as err:  # a bad row (names its row and field), or one longer than max_length
        raise ApiError(400, "invalid_request", str(err)) from None
    except Exception as err:  # the forward failed: the request's 500, the server goes on
        logger.exception("part 'steps' forward failed")
        raise ApiError(500, "forward_failed", f"The forward of this request failed: {err!r}.") from None
    step_rewards = [r.tolist() for r in scored.step_rewards]
    rewards = scored.rewards.tolist()
    nonfinite = [row for row, (r, steps) in enumerate(zip(rewards, step_rewards))
                 if not all(math.isfinite(v) for v in [r, *steps])]  # fmt: skip
    if nonfinite:
        raise ApiError(
            500, "nonfinite_reward",
            f"The reward model gave a non-finite step reward to completions{nonfinite[:10]}; with --bf16, try fp32.",
        )  # fmt: skip
    answer = {
        "rewards": rewards, "step_rewards": step_rewards, "aggregation": aggregation, "step_separator": separator,
        "normalized": False,
    }  # fmt: skip
    if body.return_details:
        answer["details"] = {"raw_rewards": rewards, "num_tokens": scored.num_tokens.tolist()}
    return JSONResponse(answer)


@router.post("/score")
async def score(body: ScoreRequest, request: Request) -> JSONResponse:
    """rmtorch's own: rewards of prompts + completions formatted as in training, or of token-id rows; with part
    "steps", a process reward model's step rewards and each row's aggregated reward."""
    serve: ServeState = request.app.state.serve
    if body.part == "steps":
        with answer_seconds(serve, "/score"):
            return await score_steps_request(serve, body)
    if body.part != "full" and serve.scorer.think.end_id is None:
        raise ApiError(
            400, "invalid_request",
            f"part={body.part!r} splits completions at the reasoning end token, which this model's tokenizer lacks. "
            "Score part='full'.",
        )  # fmt: skip
    with answer_seconds(serve, "/score"):
        split = await serve.prepare(_score_request_split, serve.scorer, body)
        field = "completions" if body.input_ids is None else "input_ids"
        scored = await score_sequences(request, split.sequences(body.part), field, body.part)
    answer = {"rewards": serve.normalize(scored.rewards), "normalized": serve.normalizer is not None}
    if body.return_details:
        answer["details"] = {
            "raw_rewards": scored.rewards,
            "num_tokens": scored.num_tokens,
            "truncated": scored.truncated,
            "unclosed_think": split.unclosed_think.tolist(),
            "dropped_text": split.dropped_text.tolist(),
        }
        if scored.attributes is not None:  # a rating model: its attributes by name, per row
            names = serve.scorer.attribute_names
            answer["details"]["attributes"] = [dict(zip(names, row)) for row in scored.attributes]
    return JSONResponse(answer)


@router.post("/get_reward")
async def get_reward(body: GetRewardRequest, request: Request) -> JSONResponse:
    """OpenRLHF's remote reward model: {"query": [...]} → {"rewards", "scores", "extra_logs"}."""
    serve: ServeState = request.app.state.serve
    with answer_seconds(serve, "/get_reward"):
        sequences = await serve.prepare(serve.tokenize_texts, body.query, False)
        scored = await score_sequences(request, sequences, "query")
    rewards = serve.normalize(scored.rewards)
    extra_logs = {"truncated": [float(t) for t in scored.truncated]}
    if serve.normalizer is not None:
        extra_logs["raw_reward"] = scored.rewards
    return JSONResponse(
        {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs, "normalized": serve.normalizer is not None}
    )


@router.post("/classify")
async def classify(body: ClassifyRequest, request: Request) -> JSONResponse:
    """vLLM's classification API: verl reads `data[-1]["probs"][-1]` (with use_activation false: the reward)."""
    serve: ServeState = request.app.state.serve
    with answer_seconds(serve, "/classify"):
        sequences = await serve.prepare(serve.tokenize_texts, body.input, body.add_special_tokens)
        scored = await score_sequences(request, sequences, "input")
    rewards = serve.normalize(scored.rewards)
    activation = next((a for a in (body.use_activation, body.activation) if a is not None), True)
    label = serve.scorer.config.id2label.get(0, "LABEL_0")
    tokens = sum(scored.num_tokens)
    return JSONResponse(
        {
            "id": f"classify-{uuid.uuid4().hex}",
            "object": "list",
            "created": int(time.time()),
            "model": serve.cfg.model,
            "data": [
                {"index": i, "label": label, "probs": [_sigmoid(r) if activation else r], "num_classes": 1}
                for i, r in enumerate(rewards)
            ],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0,
                      "prompt_tokens_details": None},
            "normalized": serve.normalizer is not None,
        }
    )  # fmt: skip


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the model worker runs; 503 once it has stopped (a load balancer then routes around it)."""
    serve: ServeState = request.app.state.serve
    alive = serve.batcher.alive
    return JSONResponse({
        "status": "ok" if alive else "model worker stopped",
        "model": serve.cfg.model,
        "engine": serve.scorer.engine.name,
        "precision": serve.scorer.precision,
        "max_length": serve.scorer.max_length,
        "normalized": serve.normalizer is not None,
        "queue_tokens": serve.batcher.queued_tokens,
    }, status_code=200 if alive else 503)  # fmt: skip


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    serve: ServeState = request.app.state.serve
    return Response(serve.metrics.render(), media_type=serve.metrics.content_type)
