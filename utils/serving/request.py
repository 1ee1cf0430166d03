"""A completion request's JSON body, checked into a `CompletionRequest`, or
an `APIError` that the server answers with OpenAI's error JSON.

Fields follow OpenAI's legacy completions API (POST /v1/completions); `top_k`
and `repetition_penalty` are extensions with the CLI's meaning. Every value
is checked here, before anything reaches the engine: a request the engine
cannot run is a 4xx naming the field, never a 500.
"""
import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

from utils import json_file
from utils.decoding.limits import MAX_SEED
from utils.decoding.sampling import SMALLEST_TEMPERATURE

MAX_BODY_BYTES = 1024 * 1024   # far above 1024 tokens of text, or of ids, per prompt
DEFAULT_MAX_TOKENS = 16        # OpenAI's default for this endpoint
MAX_N = 128                    # OpenAI's bound on n
MAX_LOGPROBS = 5               # OpenAI's bound on logprobs for this endpoint
MAX_STOPS = 4                  # OpenAI's bound on stop sequences
MAX_LOGIT_BIAS = 1024          # entries in logit_bias
PENALTY_LIMIT = 2.0            # presence/frequency penalties lie in [-2, 2]
LOGIT_BIAS_LIMIT = 100.0       # logit_bias values lie in [-100, 100]
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream",
          "stream_options", "logprobs", "echo", "stop", "presence_penalty",
          "frequency_penalty", "best_of", "logit_bias", "user", "seed", "suffix",
          "top_k", "repetition_penalty"}


class APIError(Exception):
    """An HTTP error answered with OpenAI's error JSON."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.kind, self.code, self.headers = kind, code, headers or {}

    def body(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind,
                          "param": self.param, "code": self.code}}


def bad(message: str, param: Optional[str] = None) -> APIError:
    return APIError(400, message, param)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens (temperature 0: greedy)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Tuple[Tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    model: str
    contexts: List[List[int]]   # token ids per prompt (an empty prompt: <|endoftext|>)
    prompt_texts: List[str]     # each prompt's text, for echo
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool
    echo: bool
    logprobs: Optional[int]
    stop: Tuple[str, ...]
    seed: Optional[int]
    sampling: Sampling

    @property
    def rows(self) -> int:
        """Rows the engine decodes: n per prompt."""
        return len(self.contexts) * self.n


def parse_json(body: bytes) -> Dict[str, Any]:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise bad(f"the request body is not valid UTF-8 (byte {err.start}): send "
                  f"JSON encoded as UTF-8") from None
    try:
        data = json_file.parse_json(text)  # the project's reader: nesting bounded
    except json_file.JSONProblem as err:
        raise bad(f"the request body {err}: send a JSON object "
                  f"such as {{\"model\": ..., \"prompt\": \"Hello\"}}") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object, not "
                  f"{type(data).__name__}")
    return data


def parse_completion(data: Dict[str, Any], *, model_name: str, encoder,
                     n_ctx: int, n_vocab: int, end_token: int) -> CompletionRequest:
    """`data` (a JSON object) checked into a CompletionRequest."""
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise bad("you must provide a model parameter: the served model is "
                  f"{model_name!r} (GET /v1/models)", "model")
    if model != model_name:
        raise bad(f"The model {model!r} does not exist: this server serves "
                  f"{model_name!r} (GET /v1/models)", "model")
    if data.get("suffix") not in (None, ""):
        raise bad("suffix is not supported: GPT-2 only continues text", "suffix")
    contexts, texts = _prompts(data.get("prompt"), encoder, n_vocab, end_token)
    n = _integer(data, "n", 1, 1, MAX_N)
    best_of = data.get("best_of")
    if best_of is not None and best_of != n:
        raise bad("best_of is not supported (only best_of = n): leave it out",
                  "best_of")
    max_tokens = _max_tokens(data, contexts, n_ctx)
    stream = _boolean(data, "stream", False)
    options = data.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)
                                or set(options) - {"include_usage"}):
        raise bad("stream_options must be an object such as {\"include_usage\": "
                  "true}, and only goes with stream: true", "stream_options")
    include_usage = _boolean(options or {}, "include_usage", False)
    logprobs = data.get("logprobs")
    if logprobs is not None:
        logprobs = _integer(data, "logprobs", None, 0, MAX_LOGPROBS)
    seed = data.get("seed")
    if seed is not None:
        seed = _integer(data, "seed", None, 0, MAX_SEED)
    return CompletionRequest(
        model=model, contexts=contexts, prompt_texts=texts, max_tokens=max_tokens,
        n=n, stream=stream, include_usage=include_usage,
        echo=_boolean(data, "echo", False), logprobs=logprobs,
        stop=_stops(data.get("stop")), seed=seed,
        sampling=_sampling(data, n_vocab))


def _prompts(prompt, encoder, n_vocab: int, end_token: int
             ) -> Tuple[List[List[int]], List[str]]:
    """(token ids, text) per prompt: a string, a list of strings, a list of
    token ids or a list of such lists. An empty prompt starts from
    <|endoftext|>, as the CLI does without one."""
    fix = ("give a string, a list of strings, a list of token ids or a list of "
           "such lists")
    if prompt is None:
        raise bad(f"you must provide a prompt: {fix}", "prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt:
        prompts = prompt
    else:
        raise bad(f"prompt must not be empty or {type(prompt).__name__}: {fix}",
                  "prompt")
    contexts, texts = [], []
    for item in prompts:
        if isinstance(item, str):
            ids = encoder.encode(item)
        elif isinstance(item, list) and all(_is_int(t) for t in item):
            ids = list(item)
            outside = [t for t in ids if not 0 <= t < n_vocab]
            if outside:
                raise bad(f"prompt token id {outside[0]} is outside the vocabulary "
                          f"(0 to {n_vocab - 1})", "prompt")
        else:
            raise bad(f"prompt holds a {type(item).__name__}: {fix}", "prompt")
        texts.append(item if isinstance(item, str) else encoder.decode(ids))
        contexts.append(ids or [end_token])
    return contexts, texts


def _max_tokens(data, contexts: List[List[int]], n_ctx: int) -> int:
    """max_tokens, checked against the context; when not given, 16 or the
    room the longest prompt leaves, whichever is less."""
    longest = max(len(c) for c in contexts)
    if longest >= n_ctx:
        raise bad(f"the prompt is {longest} tokens, and this model's context is "
                  f"{n_ctx} tokens with at least one for the completion: shorten "
                  f"the prompt", "prompt")
    room = n_ctx - longest
    if data.get("max_tokens") is None:
        return min(DEFAULT_MAX_TOKENS, room)
    max_tokens = _integer(data, "max_tokens", None, 1, None)
    if max_tokens > room:
        raise bad(f"max_tokens {max_tokens} is beyond the context: this model's "
                  f"context is {n_ctx} tokens and the prompt takes {longest}, so "
                  f"max_tokens may be at most {room}", "max_tokens")
    return max_tokens


def _stops(stop) -> Tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)):
        raise bad(f"stop must be a non-empty string or a list of up to {MAX_STOPS} "
                  f"non-empty strings", "stop")
    return tuple(stops)


def _sampling(data, n_vocab: int) -> Sampling:
    temperature = _number(data, "temperature", 1.0, 0.0, 2.0)
    if 0 < temperature < SMALLEST_TEMPERATURE:
        raise bad(f"temperature {temperature} is too small to divide by: use 0 for "
                  f"greedy decoding", "temperature")
    top_p = _number(data, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad("top_p must be in (0, 1]: 1 keeps every token", "top_p")
    repetition = _number(data, "repetition_penalty", 1.0, 0.0, None)
    if repetition == 0:
        raise bad("repetition_penalty must be > 0: 1 is off, 1.2 is common",
                  "repetition_penalty")
    return Sampling(
        temperature=temperature, top_p=top_p,
        top_k=_integer(data, "top_k", 0, 0, n_vocab),
        presence_penalty=_number(data, "presence_penalty", 0.0, -PENALTY_LIMIT,
                                 PENALTY_LIMIT),
        frequency_penalty=_number(data, "frequency_penalty", 0.0, -PENALTY_LIMIT,
                                  PENALTY_LIMIT),
        repetition_penalty=repetition,
        logit_bias=_logit_bias(data.get("logit_bias"), n_vocab))


def _logit_bias(bias, n_vocab: int) -> Tuple[Tuple[int, float], ...]:
    if bias is None:
        return ()
    fix = (f"logit_bias maps token ids (as strings, 0 to {n_vocab - 1}) to numbers "
           f"from -{LOGIT_BIAS_LIMIT:g} to {LOGIT_BIAS_LIMIT:g}")
    if not isinstance(bias, dict) or len(bias) > MAX_LOGIT_BIAS:
        raise bad(fix, "logit_bias")
    entries = []
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise bad(fix, "logit_bias") from None
        if (not 0 <= token < n_vocab or not _is_number(value)
                or not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT):
            raise bad(fix, "logit_bias")
        entries.append((token, float(value)))
    return tuple(sorted(entries))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _boolean(data, name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name)
    return value


def _integer(data, name: str, default, low: int, high: Optional[int]) -> int:
    value = data.get(name)
    if value is None and default is not None:
        return default
    bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
    if not _is_int(value) or value < low or (high is not None and value > high):
        raise bad(f"{name} must be a whole number {bounds} (got {value!r})", name)
    return value


def _number(data, name: str, default: float, low: float, high: Optional[float]) -> float:
    value = data.get(name)
    if value is None:
        return default
    bounds = f"from {low:g} to {high:g}" if high is not None else f"at least {low:g}"
    if not _is_number(value) or value < low or (high is not None and value > high):
        raise bad(f"{name} must be a number {bounds} (got {value!r})", name)
    return float(value)
