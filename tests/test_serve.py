"""gpt2_serve_main.py as a user meets it: a live server on a free 127.0.0.1
port, called with the official `openai` client (and plain HTTP for what the
client cannot send).

Greedy texts are checked against Hugging Face transformers' greedy
continuations of the TF-written fixtures and against gpt2_generate_main.py;
sampled ones against the CLI with the same seed.
"""
import asyncio
import concurrent.futures
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from utils.decoding.generation import generate
from utils.model import build_model, gpt2_hparams
from utils.processor import EOS_ID, get_encoder
from utils.serving.request import APIError, parse_completion
from utils.serving.scheduler import Job, Scheduler
from utils.checkpoints.weights import checkpoint_model_fields, save_checkpoint
import script_server

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "tf_gpt2")
SERVE = os.path.join(REPO, "gpt2_serve_main.py")
ADDRESS = re.compile(r"at http://127\.0\.0\.1:(\d+)/v1")


class Server:
    """gpt2_serve_main.py in a subprocess; its stdout lines are collected."""

    def __init__(self, args, cwd=REPO, command=None):
        command = command or [sys.executable, SERVE]
        self.proc = subprocess.Popen(command + list(args) + ["--port", "0"],
                                     cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        first = self.proc.stdout.readline()
        match = ADDRESS.search(first)
        if not match:
            self.proc.kill()
            raise AssertionError(f"no address printed: {first!r} "
                                 f"{self.proc.stderr.read()}")
        self.port = int(match.group(1))
        self.url = f"http://127.0.0.1:{self.port}"
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def client(self, **kw):
        kw.setdefault("api_key", "none")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def raw(self, method, path, body=b"", headers=None):
        """(status, headers, parsed JSON body) of a plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        return response.status, dict(response.getheaders()), json.loads(data)

    def health(self):
        return self.raw("GET", "/health")[2]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def fixture(name):
    with open(os.path.join(FIXTURES, "reference", name + ".json")) as f:
        return os.path.join(FIXTURES, "models", name), json.load(f)


def reference_text(ref, greedy):
    """transformers' greedy continuation, up to the first <|endoftext|>."""
    ids = greedy["output_ids"][len(greedy["prompt_ids"]):]
    if 50256 in ids:
        ids = ids[:ids.index(50256)]
    return get_encoder().decode(ids)


@pytest.fixture(scope="module")
def tiny():
    """Servers of the TF fixtures tiny_a (n_ctx 32) and tiny_b (n_ctx 48)."""
    servers = {name: Server(["--pretrain_model_dir", fixture(name)[0],
                             "--compile", "off"]) for name in ("tiny_a", "tiny_b")}
    yield servers
    for server in servers.values():
        assert server.stop() == 0


def small_checkpoint(directory):
    """A random 2-layer GPT-2 with 1024 positions: decoding takes a while,
    so requests overlap."""
    torch.manual_seed(0)
    hparams = gpt2_hparams(50257, 1024, 64, 2, 2)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "model.ckpt")
    save_checkpoint(path, {"model": build_model(hparams).state_dict(),
                           **checkpoint_model_fields(hparams)})
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A server of the random 1024-position model: 4 rows a batch, 8 may wait,
    and an API key."""
    path = small_checkpoint(str(tmp_path_factory.mktemp("small") / "output"))
    server = Server(["--checkpoint", path, "--max_batch_size", "4",
                     "--max_queue", "8", "--api_key", "sesame", "--compile", "off"])
    yield server
    assert server.stop() == 0


def run_cli(args):
    result = script_server.run([sys.executable, "gpt2_generate_main.py", *args],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    return re.findall(r"=+ SAMPLE \d+ =+\n(.*?)\n(?==+)", result.stdout, re.S)


# --------------------------------------------------------------------- texts

def test_greedy_equals_transformers_and_the_cli(tiny):
    for name, server in tiny.items():
        model_dir, ref = fixture(name)
        n_ctx = ref["hparams"]["n_ctx"]
        client = server.client()
        served = []
        for greedy in ref["greedy"]:
            result = client.completions.create(
                model=name, prompt=greedy["prompt_text"], temperature=0,
                max_tokens=n_ctx - len(greedy["prompt_ids"]))
            served.append(result.choices[0].text)
            assert served[-1] == reference_text(ref, greedy)
            assert result.usage.prompt_tokens == len(greedy["prompt_ids"])
        prompts = [arg for g in ref["greedy"] for arg in ("--prompt", g["prompt_text"])]
        assert run_cli(["--pretrain_model_dir", model_dir, *prompts,
                        "--decoding_strategy", "greedy",
                        "--max_decoding_length", str(n_ctx)]) == served


def test_seeded_sample_equals_the_cli_with_that_seed(tiny):
    model_dir, _ = fixture("tiny_b")
    prompt = "Hello world"
    result = tiny["tiny_b"].client().completions.create(
        model="tiny_b", prompt=prompt, temperature=1.3, max_tokens=18, seed=5,
        extra_body={"top_k": 50})
    assert run_cli(["--pretrain_model_dir", model_dir, "--prompt", prompt,
                    "--seed", "5", "--temperature", "1.3", "--top_k", "50",
                    "--max_decoding_length", "20"]) == [result.choices[0].text]


def test_streamed_chunks_join_to_the_same_text(tiny):
    client = tiny["tiny_a"].client()
    whole = client.completions.create(model="tiny_a", prompt="Hello world",
                                      temperature=0, max_tokens=25)
    chunks = list(client.completions.create(
        model="tiny_a", prompt="Hello world", temperature=0, max_tokens=25,
        stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 1 and "".join(texts) == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_with_a_seed_is_reproducible(tiny):
    client = tiny["tiny_b"].client()

    def texts(seed):
        result = client.completions.create(model="tiny_b", prompt=["Hello", "The"],
                                           n=3, seed=seed, temperature=1.0,
                                           max_tokens=12)
        assert [c.index for c in result.choices] == list(range(6))
        return [c.text for c in result.choices]

    first = texts(11)
    assert texts(11) == first
    assert len(set(first[:3])) > 1  # the choices of one prompt differ
    assert texts(12) != first


def test_stop_strings_cut_the_text_plain_and_streamed(tiny):
    client = tiny["tiny_a"].client()
    full = client.completions.create(model="tiny_a", prompt="Hello world",
                                     temperature=0, max_tokens=25).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    cut = client.completions.create(model="tiny_a", prompt="Hello world",
                                    temperature=0, max_tokens=25,
                                    stop=["\u00e9\u00e9 never", stop])
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny_a", prompt="Hello world",
                                         temperature=0, max_tokens=25, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_echo_and_logprobs_shapes(tiny):
    client = tiny["tiny_a"].client()
    prompt = "Hello world"
    result = client.completions.create(model="tiny_a", prompt=prompt, temperature=0,
                                       max_tokens=6, echo=True, logprobs=3)
    choice = result.choices[0]
    plain = client.completions.create(model="tiny_a", prompt=prompt, temperature=0,
                                      max_tokens=6).choices[0].text
    assert choice.text == prompt + plain
    lp = choice.logprobs
    assert len(lp.tokens) == 2 + 6 == len(lp.token_logprobs) == len(lp.text_offset)
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[2] == len(prompt)
    for token, logprob, top in zip(lp.tokens[2:], lp.token_logprobs[2:],
                                   lp.top_logprobs[2:]):
        assert len(top) <= 3 and logprob <= 0
        # greedy: the chosen token is the most likely one
        assert top[token] == pytest.approx(max(top.values())) == pytest.approx(logprob)


def test_concurrent_requests_give_the_sequential_texts(small):
    client = small.client(api_key="sesame")
    requests = [dict(prompt="The quick brown fox" * k, max_tokens=40 + 30 * k,
                     temperature=0 if k % 2 else 0.9, seed=k, stop=None)
                for k in range(1, 5)]
    requests.append(dict(prompt=["Once upon", "a time"], n=2, max_tokens=50,
                         temperature=1.0, seed=3, stop="ing"))

    def complete(kw):
        result = client.completions.create(model="output", **kw)
        return [(c.text, c.finish_reason) for c in result.choices]

    sequential = [complete(kw) for kw in requests]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        concurrent_ = list(pool.map(complete, requests))
    assert concurrent_ == sequential


class InProcess:
    """A Scheduler of a random 2-layer, 1024-position GPT-2 on an asyncio loop
    thread, without HTTP. Its engine's forward pauses once at its first layer
    boundary after `hold` is set (then `paused` is set), until `resume` is;
    with `fail_prefill` set, the next prefill raises instead."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = build_model(gpt2_hparams(50257, 1024, 64, 2, 2)).eval()
        self.model.requires_grad_(False)
        self.encoder = get_encoder()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.scheduler = Scheduler(self.model, self.encoder, max_batch_size=6,
                                   max_queue=8, end_token=EOS_ID)
        self.hold, self.paused = threading.Event(), threading.Event()
        self.resume, self.fail_prefill = threading.Event(), threading.Event()
        self.whole_forward = self.scheduler.net.next_logits_by_layer
        self.scheduler.net.next_logits_by_layer = self.pausing_forward
        self.scheduler.start()

    def pausing_forward(self, ids, *args):
        if ids.shape[1] > 1 and self.fail_prefill.is_set():
            self.fail_prefill.clear()
            raise RuntimeError("a prefill failed (on purpose)")
        forward = self.whole_forward(ids, *args)
        while True:
            try:
                next(forward)
            except StopIteration as finished:
                return finished.value
            if self.hold.is_set():
                self.hold.clear()
                self.paused.set()
                self.resume.wait()
            yield

    def job(self, prompt, max_tokens, n=1):
        data = {"model": "m", "prompt": prompt, "temperature": 0,
                "max_tokens": max_tokens, "n": n}
        return Job(parse_completion(data, model_name="m", encoder=self.encoder,
                                    n_ctx=1024, n_vocab=50257, end_token=EOS_ID),
                   self.loop)

    async def _texts(self, job, first_piece):
        done, out = 0, [""] * job.request.rows
        while done < job.request.rows:
            items = await job.events.get()
            if isinstance(items, APIError):
                return items
            for piece in items:
                out[piece.choice] += piece.text
                done += piece.finish_reason is not None
                if first_piece is not None:
                    first_piece.set()
        return out

    def texts(self, job, first_piece=None) -> concurrent.futures.Future:
        """A future of each choice's text once all have finished (or of the
        job's APIError); `first_piece` is set when the first piece arrives."""
        return asyncio.run_coroutine_threadsafe(self._texts(job, first_piece), self.loop)

    def alone(self, job):
        future = self.texts(job)
        self.scheduler.submit(job)
        return future.result(timeout=300)

    def running(self, prompt, max_tokens):
        """(a job submitted and decoding, its texts' future)."""
        job, decoding = self.job(prompt, max_tokens), threading.Event()
        future = self.texts(job, decoding)
        self.scheduler.submit(job)
        assert decoding.wait(timeout=120)
        return job, future

    def close(self):
        self.scheduler.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        del self.scheduler.net.next_logits_by_layer  # the engine's own again


def test_rows_admitted_mid_decode_keep_their_greedy_texts():
    """The scheduler in-process: requests with prompts of different lengths
    join a batch whose row is mid-decode: two (one with n=2, whose rows share
    one prefill) arrive while a step is between two layers and join there;
    one, longer than the slots the running row has reached, joins at the
    step's end, when the slots can move. Every text equals the same request
    served alone and generate()'s greedy continuation (the CLI's)."""
    server = InProcess()
    encoder = server.encoder
    words = "the quick brown fox jumps over a lazy dog while it rains and".split()
    prompts = {"running": "Once upon a time", "long": " ".join(words * 4),
               "short": "Hi", "pair": "A lazy dog"}
    lengths = {name: len(encoder.encode(p)) for name, p in prompts.items()}
    assert lengths["long"] > 40 > lengths["running"] > lengths["short"]
    max_tokens = {"running": 400, "long": 30, "short": 25, "pair": 20}
    n = {"pair": 2}

    def job(name):
        return server.job(prompts[name], max_tokens[name], n.get(name, 1))

    try:
        by_itself = {name: server.alone(job(name)) for name in prompts}
        running, running_texts = server.running(prompts["running"], max_tokens["running"])
        server.hold.set()
        assert server.paused.wait(timeout=120)  # a step is between two layers
        assert [row.job for row in server.scheduler.rows] == [running]
        others = {name: job(name) for name in ("short", "pair", "long")}
        joined = threading.Event()
        futures = {"short": server.texts(others["short"], joined),
                   "pair": server.texts(others["pair"])}
        server.scheduler.submit(others["short"])
        server.scheduler.submit(others["pair"])
        server.resume.set()
        assert joined.wait(timeout=120)
        futures["long"] = server.texts(others["long"])
        server.scheduler.submit(others["long"])
        together = {name: f.result(timeout=300) for name, f in futures.items()}
        together["running"] = running_texts.result(timeout=300)
    finally:
        server.close()
    assert together == by_itself
    for name, prompt in prompts.items():
        context = encoder.encode(prompt)
        ids = generate(server.model, [context], len(context) + max_tokens[name],
                       strategy="greedy", end_token=EOS_ID)[0]
        assert by_itself[name] == [encoder.decode(ids)] * n.get(name, 1)


def test_a_failure_while_joining_mid_step_fails_those_requests_too():
    """A prefill that raises while a step is between two layers: the request
    being admitted gets the 500 error like the running one (none waits for
    ever), and the scheduler serves the next request."""
    server = InProcess()
    try:
        running, running_texts = server.running("Once upon a time", 400)
        server.hold.set()
        assert server.paused.wait(timeout=120)
        joining = server.job("Hi there", 10)
        joining_texts = server.texts(joining)
        server.fail_prefill.set()
        server.scheduler.submit(joining)
        server.resume.set()
        for future in (joining_texts, running_texts):
            error = future.result(timeout=120)
            assert isinstance(error, APIError) and error.status == 500
        assert not server.fail_prefill.is_set()  # the failing prefill ran
        assert server.alone(server.job("Hi", 10)) == server.alone(server.job("Hi", 10))
    finally:
        server.close()


# ------------------------------------------------------------- bad requests

@pytest.mark.parametrize("fields,param,message", [
    (dict(model="gpt-4"), "model", "does not exist"),
    (dict(max_tokens=0), "max_tokens", "max_tokens must be a whole number at least 1"),
    (dict(max_tokens=40), "max_tokens", "max_tokens 40 is beyond the context"),
    (dict(prompt="word " * 40), "prompt", "the prompt is 41 tokens"),
    (dict(temperature=2.5), "temperature", "temperature must be a number from 0 to 2"),
    (dict(top_p=1.5), "top_p", "top_p must be a number from 0 to 1"),
    (dict(n=0), "n", "n must be a whole number from 1 to 128"),
    (dict(stop=[""]), "stop", "stop must be a non-empty string"),
    (dict(logprobs=9), "logprobs", "logprobs must be a whole number from 0 to 5"),
    (dict(prompt=[50257]), "prompt", "outside the vocabulary"),
    (dict(presence_penalty=3), "presence_penalty", "from -2 to 2"),
    (dict(extra_body={"max_token": 5}), "max_token",
     "Unrecognized request argument supplied: max_token"),
])
def test_bad_request_is_a_400_with_openai_error_json(tiny, fields, param, message):
    kw = dict(model="tiny_a", prompt="Hello world", max_tokens=5)
    kw.update(fields)
    with pytest.raises(openai.BadRequestError) as caught:
        tiny["tiny_a"].client().completions.create(**kw)
    error = caught.value.body
    assert caught.value.status_code == 400
    assert message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,message", [
    (b'{"model": "tiny_a", "prompt": ', "not valid JSON"),
    (b'{"model": "tiny_a", "prompt": "\xff"}', "not valid UTF-8"),
    (b'["tiny_a"]', "must be a JSON object"),
    (b"[" * 200000, "more than 64 levels deep"),
    (b'{"model": "tiny_a", "prompt": "' + b"a" * (1024 * 1024) + b'"}',
     "larger than 1048576 bytes"),
])
def test_bad_body_is_a_400(tiny, body, message):
    status, _, error = tiny["tiny_a"].raw("POST", "/v1/completions", body,
                                          {"Content-Type": "application/json"})
    assert status == 400 and message in error["error"]["message"]


def test_chat_unknown_routes_and_models(tiny):
    server = tiny["tiny_a"]
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(
            model="tiny_a", messages=[{"role": "user", "content": "hi"}])
    assert "GPT-2 has no chat template" in caught.value.body["message"]
    status, _, error = server.raw("GET", "/v1/nothing")
    assert status == 404 and error["error"]["message"]
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny_a"]
    assert server.health()["status"] == "ok"  # still serving after it all


def test_api_key_is_required(small):
    with pytest.raises(openai.AuthenticationError):
        small.client(api_key="wrong").models.list()
    assert small.client(api_key="sesame").models.list().data[0].id == "output"
    assert small.health()["status"] == "ok"  # /health needs no key


def _wait_rows(server, rows, timeout=20):
    deadline = time.time() + timeout
    while server.health()["rows"] != rows:
        assert time.time() < deadline, f"rows stayed at {server.health()['rows']}"
        time.sleep(0.05)


def test_a_full_queue_is_429_and_disconnects_free_rows(small):
    client = small.client(api_key="sesame")
    long = dict(model="output", prompt="Hi", max_tokens=1000, temperature=1.0,
                n=4, stream=True)
    running = client.completions.create(**long)   # fills the batch of 4
    next(iter(running))
    waiting = [client.completions.create(**long) for _ in range(2)]  # 8 rows queued
    _wait_rows(small, 12)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="output", prompt="Hi", max_tokens=5)
    assert caught.value.response.headers["retry-after"] == "1"
    assert "too many requests are waiting" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="output", prompt="Hi", max_tokens=5, n=9)
    assert "more than the server queues" in caught.value.body["message"]
    running.close()   # the client goes away: its 4 rows leave, the queued join
    _wait_rows(small, 8)
    for stream in waiting:
        stream.close()
    _wait_rows(small, 0)
    done = client.completions.create(model="output", prompt="Hi", max_tokens=5)
    assert done.choices[0].finish_reason in ("length", "stop")


def test_sigterm_with_requests_in_flight_exits_within_seconds(tmp_path):
    path = small_checkpoint(str(tmp_path / "output"))
    server = Server(["--checkpoint", path, "--compile", "off"])
    client = server.client()
    stream = client.completions.create(model="output", prompt="Hi", max_tokens=1000,
                                       stream=True)
    next(iter(stream))
    outcome = {}

    def whole():
        try:
            client.completions.create(model="output", prompt="Hi", max_tokens=1000)
            outcome["whole"] = "finished"
        except openai.APIError as err:
            outcome["whole"] = err
    thread = threading.Thread(target=whole)
    thread.start()
    _wait_rows(server, 2)
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="shutting down"):
        for _ in stream:
            pass
    assert server.proc.wait(timeout=20) == 0
    thread.join(timeout=20)
    assert isinstance(outcome["whole"], openai.APIError)
    server.reader.join(timeout=5)
    assert server.lines[-1] == "Stopped."
    assert "Traceback" not in server.proc.stderr.read()


def test_the_readme_commands_work(tmp_path):
    """The README's "Serve a model" command, curl call and openai example."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme[readme.index("## Serve a model"):]
    section = section[:section.index("\n## ", 1)]
    bash, curl = re.findall(r"```bash\n(.*?)```", section, re.S)[:2]
    python_example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = bash.strip().split()
    assert command[:2] == ["python", "gpt2_serve_main.py"]
    small_checkpoint(str(tmp_path / "output"))  # what `output/model.ckpt` names
    server = Server(command[2:] + ["--compile", "off"], cwd=str(tmp_path))
    try:
        address = "http://127.0.0.1:8000"
        assert address in curl and address in python_example
        result = subprocess.run(["bash", "-c", curl.replace(address, server.url)],
                                capture_output=True, text=True, timeout=120)
        body = json.loads(result.stdout)
        assert body["model"] == "output" and 0 < body["usage"]["completion_tokens"] <= 20
        shown = subprocess.run([sys.executable, "-c",
                                python_example.replace(address, server.url)],
                               capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip()
    finally:
        assert server.stop() == 0
