"""Continuous batching: many requests' rows decoded as one KV-cached batch.

One thread owns the engine (utils/decoding/engine.py). It admits waiting rows
between two decoding steps and also between two layers of a step (so that a
new request waits for one layer, not a whole step, before its prefill), and
drops finished or abandoned ones between steps:

- Admit: the new rows' prompts run through the network together (left-
  padded, as utils/decoding/generation.py prefills a batch), their keys and
  values written straight into free rows of the running cache so that they
  end where the running rows' next token goes (mid-step: at the slot that
  step writes); each row picks its first token from its prompt's last
  logits, and it goes out at once. All rows then advance one slot per step.
- Step: every row feeds its last token at the same cache slot, with its own
  position id; a row attends only to its own slots (a mask, when the rows
  start at different slots). Each row picks its token with its own settings,
  seed, penalties and stop strings (utils/serving/sampler.py, text.py).
- Leave: a finished row (end of text, a stop string, max_tokens) or one
  whose client went away is replaced by the batch's last row (one row's
  cache copied), so the batch stays dense and the next step is smaller.

The cache has n_ctx + n_ctx/4 slots. Attention reads only the window from
the oldest live row's first slot; when the next slot would be past the end,
the window moves back to slot 0 (at most once every n_ctx/4 steps, as no
row is longer than n_ctx). Rows are the unit: a request's prompts x n rows
may be decoded at different times, and each row's text is the same whether
its batch holds 1 row or 16, up to float rounding in the batched products
(the greedy tests compare them).

Tokens and text go back to each request's asyncio queue through
loop.call_soon_threadsafe, once per request per step.
"""
import asyncio
import collections
import dataclasses
import sys
import threading
import traceback
from typing import Dict, List, Optional

import torch

from utils.decoding.engine import engine_for
from utils.decoding.generation import PaddedBatch, forward_logits
from utils.serving.request import APIError, CompletionRequest
from utils.serving.sampler import RowSampler, choice_seed, top_logprobs
from utils.serving.text import RowText

LENGTH, STOP = "length", "stop"


@dataclasses.dataclass
class TokenLogprob:
    token: str
    logprob: Optional[float]            # None for a prompt's first token
    top: Optional[Dict[str, float]]
    offset: int                         # in the choice's text (echo included)


@dataclasses.dataclass
class Piece:
    """New text of one choice, the tokens it covers, and how it ended."""
    choice: int
    text: str
    logprobs: List[TokenLogprob]
    finish_reason: Optional[str] = None
    completion_tokens: int = 0


class Job:
    """One HTTP request: its rows' pieces arrive in `events` (lists of
    Piece, or an APIError when the request failed as a whole)."""

    def __init__(self, request: CompletionRequest, loop: asyncio.AbstractEventLoop):
        self.request, self.loop = request, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client went away: its rows leave

    def post(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def cancel(self) -> None:
        self.cancelled = True


class _Row:
    """One choice of one job, waiting or in the batch."""

    def __init__(self, job: Job, choice: int, context: List[int], encoder,
                 n_vocab: int, device: torch.device):
        request = job.request
        self.job, self.choice, self.context = job, choice, context
        self.prompt_text = request.prompt_texts[choice // request.n]
        seed = None if request.seed is None else choice_seed(request.seed, choice)
        self.sampler = RowSampler(request.sampling, seed, context, n_vocab, device)
        self.text = RowText(encoder, request.stop)
        self.offset = len(self.prompt_text) if request.echo else 0
        self.generated = 0
        self.last = -1          # the token to feed at the next step
        self.start = 0          # the row's first cache slot
        self.position = 0       # position id of the token fed next
        self.records: List[TokenLogprob] = []
        self.sent_records = 0
        self.finish_reason: Optional[str] = None


class Scheduler:
    """Decodes every submitted job's rows, admitting and dropping rows
    between steps. submit/stop/close are called from other threads."""

    def __init__(self, model, encoder, *, max_batch_size: int, max_queue: int,
                 end_token: int):
        self.model, self.encoder, self.end_token = model, encoder, end_token
        self.net = engine_for(model)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.capacity = self.cache_slots(self.net.n_ctx)
        self.cache = self.net.new_cache(max_batch_size, self.capacity)
        # Fault every page in now, at start-up: the first write to fresh
        # (huge-page) memory costs far more than the write, and would land on
        # the first token of whichever request first uses a row or slot
        # (benchmarks/README.md, "Serving").
        for part in self.cache:
            part.zero_()
        self.rows: List[_Row] = []
        self.next_slot = 0  # the slot every row writes at the next step
        self.waiting: "collections.deque[_Row]" = collections.deque()
        self.lock = threading.Condition()
        self.stopping = False
        self.outbox: Dict[Job, list] = {}
        self.thread = threading.Thread(target=self._run, name="gpt2-scheduler",
                                       daemon=True)

    @staticmethod
    def cache_slots(n_ctx: int) -> int:
        """Slots per cache row: n_ctx, and a quarter more so that the window
        moves back rarely."""
        return n_ctx + n_ctx // 4

    # ------------------------------------------------------------ other threads

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job's rows; APIError 503 when stopping, 429 when full."""
        request = job.request
        rows = [_Row(job, i, request.contexts[i // request.n], self.encoder,
                     self.net.n_vocab, self.net.device) for i in range(request.rows)]
        if len(rows) > self.max_queue:
            raise APIError(400, f"this request needs {len(rows)} rows (prompts x n), "
                                f"more than the server queues (--max_queue "
                                f"{self.max_queue}): send fewer prompts or a smaller n",
                           param="n")
        with self.lock:
            if self.stopping:
                raise _shutting_down()
            if len(self.waiting) + len(rows) > self.max_queue:
                raise APIError(429, f"too many requests are waiting ({len(self.waiting)} "
                                    f"rows queued, at most {self.max_queue}): retry "
                                    f"shortly", kind="rate_limit_error",
                               headers={"Retry-After": "1"})
            self.waiting.extend(rows)
            self.lock.notify()

    def stop(self) -> None:
        """Fail every job not finished yet and stop (at the next step boundary)."""
        with self.lock:
            self.stopping = True
            self.lock.notify()

    def close(self) -> None:
        self.stop()
        self.thread.join(timeout=30)

    @property
    def busy_rows(self) -> int:
        return len(self.rows) + len(self.waiting)

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self.lock:
                while not (self.waiting or self.rows or self.stopping):
                    self.lock.wait()
                if self.stopping:
                    break
                new = self._take_waiting()
            try:
                with torch.inference_mode():
                    self._leave([i for i, r in enumerate(self.rows) if r.job.cancelled])
                    if new:
                        self._join(new)
                    if self.rows:
                        self._step()
            except Exception:  # a bug or out of memory: fail these rows, keep serving
                traceback.print_exc(file=sys.stderr)
                failed = {r.job for r in self.rows + new}
                self.rows = []
                self._fail(failed, APIError(500, "the server failed while generating "
                                                 "this completion (see its log)",
                                            kind="server_error"))
            self._send()
        with self.lock:
            jobs = {r.job for r in list(self.waiting) + self.rows}
            self.waiting.clear()
        self.rows = []
        self._fail(jobs, _shutting_down())
        self._send()

    def _take_waiting(self) -> List[_Row]:
        taken = []
        while self.waiting and len(self.rows) + len(taken) < self.max_batch_size:
            row = self.waiting.popleft()
            if not row.job.cancelled:
                taken.append(row)
        return taken

    def _join(self, new: List[_Row]) -> None:
        """Admit rows between two steps: room for their prompts before the
        slot the batch writes next, and their first tokens out at once."""
        width = max(len(r.context) for r in new)
        if not self.rows:
            self.next_slot = width
        elif self.next_slot < width:
            self._move_window(width - self.next_slot)
        self._admit(new, self.next_slot)
        self._leave_finished()
        self._send()

    def _join_mid_step(self, end: int) -> None:
        """Admit waiting rows while a step is under way (between two of its
        layers), so that a request does not wait for the step to end: their
        prompts end at the slot the step writes (`end` - 1, in other rows),
        and they join the next step with the others. Rows whose prompts do
        not fit before `end` wait for the step's end (the window moves only
        between steps). Rows that finish at once leave after the step."""
        with self.lock:
            if self.stopping:
                return
            new = self._take_waiting()
            if new and max(len(r.context) for r in new) > end:
                self.waiting.extendleft(reversed(new))
                return
        if new:
            try:
                self._admit(new, end)
            except Exception:  # _run fails the batch's jobs: these rows' too
                self.rows += [r for r in new if r not in self.rows]
                raise
            self._send()

    def _admit(self, new: List[_Row], end: int) -> None:
        """Prefill the new rows' prompts straight into free rows of the
        cache, ending before slot `end`, and pick their first tokens. Rows
        sharing a prompt (n > 1) prefill it once: the first of them is
        computed, the others get a copy of its cache row."""
        net = self.net
        unique: Dict[tuple, int] = {}  # prompt -> its row among `firsts`
        firsts, copies = [], []
        for row in new:
            key = tuple(row.context)
            if key in unique:
                copies.append(row)
            else:
                unique[key] = len(firsts)
                firsts.append(row)
        contexts = [r.context for r in firsts]
        width, first = max(len(c) for c in contexts), len(self.rows)
        batch = PaddedBatch(net, contexts, 1, width)
        prompts = tuple(part[:, first:first + len(firsts), :, end - width:]
                        for part in self.cache)
        logits = net.next_logits(batch.ids, batch.positions, prompts, 0,
                                 batch.prefill_mask)
        for j, row in enumerate(copies):
            index, source = first + len(firsts) + j, first + unique[tuple(row.context)]
            for part in self.cache:
                part[:, index, :, end - width:end] = part[:, source, :, end - width:end]
        joined = firsts + copies  # their order in the batch
        for row in joined:
            row.start, row.position = end - len(row.context), len(row.context)
            self.rows.append(row)
            if row.job.request.echo:
                self._echo(row)
        self._pick([logits[unique[tuple(row.context)]] for row in joined], joined)

    def _step(self) -> None:
        """Feed every row its last token at the next slot; pick the next ones.
        Requests that arrive meanwhile join between two layers."""
        if self.next_slot == self.capacity:
            self._move_window(-min(r.start for r in self.rows))
        rows, slot = list(self.rows), self.next_slot
        base = min(r.start for r in rows)
        starts = torch.tensor([r.start - base for r in rows], device=self.net.device)
        mask = None
        if bool(starts.any()):  # rows begin at different slots
            window = torch.arange(slot - base + 1, device=self.net.device)
            mask = (window[None, :] >= starts[:, None])[:, None, None, :]
        ids = torch.tensor([[r.last] for r in rows], device=self.net.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.net.device)
        cache = tuple(part[:, :len(rows), :, base:] for part in self.cache)
        forward = self.net.next_logits_by_layer(ids, positions, cache, slot - base, mask)
        while True:
            try:
                next(forward)
            except StopIteration as finished:
                logits = finished.value
                break
            if self.waiting:
                self._join_mid_step(slot + 1)
        self.next_slot += 1
        for row in rows:
            row.position += 1
        self._pick(list(logits), rows)
        self._leave_finished()

    def _pick(self, logits: List[torch.Tensor], rows: List[_Row]) -> None:
        """Each row's next token from its logits [V]."""
        greedy = [i for i, r in enumerate(rows) if r.sampler.plain_greedy]
        argmax = {}
        if greedy:
            stacked = torch.stack([logits[i] for i in greedy])
            argmax = dict(zip(greedy, torch.argmax(stacked, dim=-1).tolist()))
        for i, row in enumerate(rows):
            token = argmax.get(i)
            if token is None:
                token = row.sampler.choose(logits[i][None])
            row.sampler.chosen(token)
            self._advance(row, token, logits[i])

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> None:
        row.generated += 1
        row.last = token
        k = row.job.request.logprobs
        if token == self.end_token:
            row.finish_reason = STOP
        else:
            if k is not None:
                logprob, top = top_logprobs(logits, token, k, self._token_text)
                row.records.append(TokenLogprob(self._token_text(token), logprob, top,
                                                row.offset + len(row.text.text)))
            row.text.add(token)
            if row.text.stopped:
                row.finish_reason = STOP
        if row.finish_reason is None and row.generated >= row.job.request.max_tokens:
            row.finish_reason = LENGTH
        if row.finish_reason:
            row.text.finish()
        text = row.text.release(final=row.finish_reason is not None)
        if text or row.finish_reason:
            released = row.offset + row.text.released
            records = [r for r in row.records[row.sent_records:] if r.offset < released]
            row.sent_records += len(records)
            self._post(row.job, Piece(row.choice, text, records, row.finish_reason,
                                      row.generated))

    def _echo(self, row: _Row) -> None:
        """The prompt as the first piece of an echo request (with its tokens'
        log-probabilities when asked for)."""
        records = []
        k = row.job.request.logprobs
        if k is not None:
            ids = row.context
            logits = forward_logits(self.model, torch.tensor([ids]))[0]
            offset = 0
            for t, token in enumerate(ids):
                text = self._token_text(token)
                if t == 0:
                    records.append(TokenLogprob(text, None, None, 0))
                else:
                    logprob, top = top_logprobs(logits[t - 1], token, k,
                                                self._token_text)
                    records.append(TokenLogprob(text, logprob, top, offset))
                offset += len(text)
        self._post(row.job, Piece(row.choice, row.prompt_text, records))

    def _leave_finished(self) -> None:
        """Drop the rows that have finished (stop text, end token, length)."""
        self._leave([i for i, r in enumerate(self.rows) if r.finish_reason])

    def _leave(self, indices: List[int]) -> None:
        """Drop rows: the batch's last row moves into each freed place."""
        for i in sorted(indices, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                moved = self.rows[last]
                for part in self.cache:
                    part[:, i, :, moved.start:self.next_slot] = \
                        part[:, last, :, moved.start:self.next_slot]
                self.rows[i] = moved
            self.rows.pop()

    def _move_window(self, shift: int) -> None:
        """Move every row's slots by `shift` (right when positive)."""
        count, slot = len(self.rows), self.next_slot
        low = min(r.start for r in self.rows)
        for part in self.cache:
            for layer in part:  # one layer at a time: a small temporary copy
                layer[:count, :, low + shift:slot + shift] = \
                    layer[:count, :, low:slot].clone()
        for row in self.rows:
            row.start += shift
        self.next_slot += shift

    def _token_text(self, token: int) -> str:
        return self.encoder.decode([token])

    def _post(self, job: Job, piece: Piece) -> None:
        self.outbox.setdefault(job, []).append(piece)

    def _fail(self, jobs, error: APIError) -> None:
        for job in jobs:
            self.outbox[job] = error

    def _send(self) -> None:
        for job, items in self.outbox.items():
            if not job.cancelled:
                job.post(items)
        self.outbox = {}


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down: send the request again "
                         "once it is back", kind="server_error")
