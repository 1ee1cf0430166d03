"""Serving a model to many clients at once over OpenAI's HTTP API (gpt2_serve_main.py).

`request` checks a completion request's JSON into a CompletionRequest (or an
APIError, answered with OpenAI's error JSON); `api` is the ASGI app (Starlette,
streams through sse-starlette) that turns requests into jobs and their pieces
into completion objects or server-sent events; `scheduler` runs the engine of
utils/decoding/engine.py on one thread with continuous batching: new rows are prefilled
and join the running KV-cached batch between steps, finished or abandoned rows
leave it; `sampler` picks each row's tokens with its own settings, penalties and
seed; `text` turns a row's tokens into whole characters, cut at its stop strings.
"""
