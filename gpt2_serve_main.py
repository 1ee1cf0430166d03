"""Serve a GPT-2 model over HTTP with OpenAI's completions API, to many clients at once.

Fine-tuned model: python gpt2_serve_main.py --checkpoint output/model.ckpt
OpenAI's 124M:    python gpt2_serve_main.py --pretrain_model_dir gpt2_pretrained_models/model_117M
Then:             curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
                      -d '{"model": "output", "prompt": "Hello", "max_tokens": 20}'

Endpoints: POST /v1/completions (prompt, max_tokens, temperature, top_p, n,
stop, seed, stream, echo, logprobs, presence/frequency_penalty, logit_bias,
and top_k / repetition_penalty as in gpt2_generate_main.py), GET /v1/models,
GET /health. Requests share the model: new ones join the running batch
between decoding steps and finished ones leave it (continuous batching).
The model flags are gpt2_generate_main.py's. Ctrl-C or SIGTERM stops: the
requests in flight end with an error, and the server exits within seconds.
"""
import argparse
import os
import signal
import socket
import sys

import torch
import uvicorn

from utils.checkpoints import hf_hub
from utils.checkpoints.weights import resolve_model
from utils.decoding.limits import require_generation_memory
from utils.decoding.loading import decoding_device, load_for_decoding, turn_on_compiled_step
from utils.errors import UserError, run_main
from utils.flags import add_model_args, weight_flags
from utils.processor import EOS_ID
from utils.serving.api import Model, build_app
from utils.serving.scheduler import Scheduler

# Rows decoded together by default: on a 2-core CPU a step of 8 rows of the
# 124M costs ~2x a step of one, so 8 clients get ~4x the tokens per second.
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 256
MAX_BATCH_LIMIT = 1024
API_KEY_VARIABLE = "GPT2_SERVE_API_KEY"
COMPILE_HELP = ("Run decoding steps that hold a single row (one client at a time) "
                "as compiled kernels (CPU, float32), built once per model shape, CPU "
                "and torch (needs a C++ compiler; about a minute) and stored in your "
                "cache; later starts load them in a fraction of a second. auto: try "
                "(not on Intel CPUs, where they are no faster), and serve uncompiled "
                "if it fails; on: fail if it cannot; off: never.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to listen on (default 127.0.0.1: this machine "
                             "only; 0.0.0.0 for every network, then set --api_key).")
    parser.add_argument("--port", type=int, default=8000,
                        help="Port to listen on (default 8000; 0: any free port, "
                             "printed at start).")
    parser.add_argument("--model_name", default=None,
                        help="The model's name in the API (default: its folder's "
                             "name, e.g. 'output' for output/model.ckpt).")
    parser.add_argument("--max_batch_size", type=int, default=DEFAULT_MAX_BATCH,
                        help=f"Rows (choices) decoded together (default "
                             f"{DEFAULT_MAX_BATCH}); more wait in the queue. The "
                             f"key/value cache for them is reserved at start.")
    parser.add_argument("--max_queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"Rows that may wait for a place in the batch (default "
                             f"{DEFAULT_MAX_QUEUE}); beyond, requests get 429 with "
                             f"Retry-After.")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_VARIABLE),
                        help=f"Require 'Authorization: Bearer KEY' on every /v1 "
                             f"request (default: ${API_KEY_VARIABLE}, which keeps "
                             f"the key out of the process list; none: no key).")
    add_model_args(parser, compile_help=COMPILE_HELP)
    return parser.parse_args(argv)


def check_args(args) -> None:
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535 (got {args.port})")
    if not 1 <= args.max_batch_size <= MAX_BATCH_LIMIT:
        raise UserError(f"--max_batch_size must be between 1 and {MAX_BATCH_LIMIT} "
                        f"(got {args.max_batch_size})")
    if args.max_queue < 1:
        raise UserError(f"--max_queue must be at least 1 (got {args.max_queue})")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty: give a key, or leave the flag out")
    if args.model_name is not None and not args.model_name.strip():
        raise UserError("--model_name is empty: give a name, or leave the flag out")


def default_model_name(args, resolved) -> str:
    """The model folder's name: 'output' for output/model.ckpt, '117M' for
    OpenAI's files in models/117M, NAME for hf:NAME."""
    if hf_hub.is_hub_name(args.pretrain_model_dir) and not args.checkpoint:
        return args.pretrain_model_dir.split(":", 1)[1]
    path = os.path.abspath(resolved.path or ".")
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return os.path.basename(folder) or "gpt2"


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port taken...)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except (OSError, OverflowError) as err:
        sock.close()
        reason = getattr(err, "strerror", None) or str(err)
        raise UserError(f"cannot listen on {host} port {port} ({reason}): choose "
                        f"another --port, or a --host of this machine") from None
    return sock


def check_memory(args, resolved, device) -> None:
    """Refuse a batch whose key/value cache cannot fit, before loading."""
    n_ctx = resolved.sizes["n_ctx"]
    dtype = "float32" if args.dtype == "int8" else args.dtype
    require_generation_memory(
        resolved.sizes, batch_size=args.max_batch_size,
        max_decoding_length=Scheduler.cache_slots(n_ctx) + 1,
        prompt_length=n_ctx - 1, dtype=getattr(torch, dtype), device=device,
        fix="use a smaller --max_batch_size, or --dtype bfloat16",
        model=resolved.describe())


def compile_step(model, args, device) -> None:
    if args.compile == "off":
        return
    if device.type != "cpu" or args.dtype != "float32":
        if args.compile == "on":
            raise UserError("--compile on needs --device cpu and --dtype float32 "
                            "(it compiles the CPU single-row step): use --compile auto")
        return
    turn_on_compiled_step(model, args.compile)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_args(args)
    device = decoding_device(args.dtype, args.device)
    resolved = resolve_model(**weight_flags(args))
    check_memory(args, resolved, device)
    sock = listen(args.host, args.port)  # a taken port fails before loading
    model, encoder = load_for_decoding(resolved, args.dtype, device)
    compile_step(model, args, device)
    name = args.model_name or default_model_name(args, resolved)
    scheduler = Scheduler(model, encoder, max_batch_size=args.max_batch_size,
                          max_queue=args.max_queue, end_token=EOS_ID)
    served = Model(scheduler, encoder, name, resolved.sizes["n_ctx"],
                   resolved.sizes["n_vocab"], EOS_ID)
    app = build_app(served, api_key=args.api_key,
                    log=lambda line: print(line, flush=True))
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            lifespan="off", timeout_graceful_shutdown=5)
    server = _Server(config, on_exit=scheduler.stop)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {name!r} at http://{shown}:{port}/v1 (OpenAI API; GET /health; "
          f"Ctrl-C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"note: listening on {args.host} without --api_key: anyone who can "
              f"reach this port can use the model", file=sys.stderr)
    # uvicorn raises the signal it stopped for again once it has finished:
    # SIGTERM then ends here quietly, after the scheduler has stopped.
    signal.signal(signal.SIGTERM, lambda *_: None)
    scheduler.start()
    try:
        server.run(sockets=[sock])
    finally:
        scheduler.close()
        sock.close()
    print("Stopped.", flush=True)
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server, telling the scheduler first when a signal stops it
    (so in-flight requests end with an error instead of holding it up)."""

    def __init__(self, config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame):
        self.on_exit()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    run_main(main)
