"""Batched serving equals lone serving and `model.generate`, on a model whose answers run many tokens.

In process (the engine and the batcher, no HTTP): the shipped testbed answers in one token, which
hides every decode-step bug, so these tests use `tests/multitoken.py`'s copy with a random output
layer. Prompts differ in length (one or two images, questions of different lengths), so every
batch is left-padded, and requests ask for different `max_tokens`, so rows finish at different steps.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch
from multitoken import multitoken_testbed

from trimllama import HeadwiseTopK, trim
from trimllama.serve.batcher import Batcher
from trimllama.serve.batcher import Request as Job
from trimllama.serve.config import ServeConfig
from trimllama.serve.errors import APIError
from trimllama.serve.generation import Engine, SamplingParams
from trimllama.serve.metrics import ServeMetrics
from trimllama.serve.prompts import Conversation, collate, encode_conversation
from trimllama.serve.trimming import TrimSetting
from trimllama.testbed import CHECKPOINT_DIR, make_questions

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason=f"testbed checkpoint missing in {CHECKPOINT_DIR}"
)

REQUESTS = 16
TIMEOUT = 120.0


@pytest.fixture(scope="module")
def testbed():
    return multitoken_testbed(seed=0)


@pytest.fixture(scope="module")
def prompts(testbed):
    _, processor = testbed
    questions = make_questions(REQUESTS, seed=11)
    return [encode(processor, question, images=1 + index % 3 // 2) for index, question in enumerate(questions)]


def encode(processor, question, images: int = 1):
    parts = [{"type": "image"}] * images + [{"type": "text", "text": question.question}]
    return encode_conversation(processor, Conversation([{"role": "user", "content": parts}], [question.image] * images))


def max_tokens(index: int) -> int:
    return 10 + 3 * (index % 5)


class RecordingJob:
    """A `Job` that records what the engine sends it."""

    def __init__(self, prompt, sampling: SamplingParams) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.deltas: list[str] = []
        self.result = None

    def cancelled(self) -> bool:
        return False

    def delta(self, text: str) -> None:
        self.deltas.append(text)

    def finish(self, result) -> None:
        self.result = result


def generate_texts(model, processor, prompts, method, lengths) -> list[str]:
    """`model.generate` on the collated batch (greedy), row i cut to its first lengths[i] tokens."""
    batch = collate(prompts, processor.tokenizer.pad_token_id)
    with torch.no_grad(), trim(model, method) if method is not None else contextlib.nullcontext():
        output = model.generate(**batch, max_new_tokens=max(lengths), do_sample=False)
    new = output[:, batch["input_ids"].shape[1] :]
    return [processor.tokenizer.decode(row[:length], skip_special_tokens=True) for row, length in zip(new, lengths)]


@pytest.mark.parametrize("method", [None, HeadwiseTopK(head_k=0.25)], ids=["untrimmed", "trimmed"])
def test_batched_answers_equal_lone_answers_and_generate(testbed, prompts, method):
    model, processor = testbed
    engine = Engine(model, processor)
    lengths = [max_tokens(index) for index in range(REQUESTS)]
    assert len({prompt.prompt_tokens for prompt in prompts}) >= 4, "prompts of one length: no left padding to test"

    batch = [RecordingJob(prompt, SamplingParams(max_tokens=n)) for prompt, n in zip(prompts, lengths)]
    engine.generate(batch, TrimSetting(method))
    alone = []
    for prompt, n in zip(prompts, lengths):
        job = RecordingJob(prompt, SamplingParams(max_tokens=n))
        engine.generate([job], TrimSetting(method))
        alone.append(job.result.text)
    batched = [job.result.text for job in batch]

    # not vacuous: every answer runs its full length and the answers differ between prompts
    assert [job.result.completion_tokens for job in batch] == lengths
    assert len(set(alone)) >= REQUESTS - 2, alone

    differing = [index for index in range(REQUESTS) if batched[index] != alone[index]]
    assert not differing, f"batched != lone for requests {differing}"
    assert batched == generate_texts(model, processor, prompts, method, lengths)
    lone_generate = [generate_texts(model, processor, [p], method, [n])[0] for p, n in zip(prompts, lengths)]
    assert alone == lone_generate
    assert all("".join(job.deltas) == job.result.text for job in batch)


class FailingMidBatch(Engine):
    """Raises at the third decode step of any batch that holds the poisoned prompt (after tokens went out)."""

    def __init__(self, model, processor, poisoned) -> None:
        super().__init__(model, processor)
        self.poisoned = poisoned
        self.batch_sizes: list[int] = []
        self._steps = 0

    def generate(self, jobs, setting) -> None:
        self.batch_sizes.append(len(jobs))
        self._poisoned_batch = any(job.prompt is self.poisoned for job in jobs)
        self._steps = 0
        super().generate(jobs, setting)

    def _next_tokens(self, logits, rows):
        self._steps += 1
        if self._poisoned_batch and self._steps == 3:
            raise RuntimeError("injected fault after two tokens")
        return super()._next_tokens(logits, rows)


def test_a_request_failing_mid_batch_leaves_its_neighbours_intact(testbed, prompts):
    """Non-streaming neighbours are run again alone and answer correctly; a streaming one that already
    received text cannot be retracted and gets the error; the faulty request gets its error."""
    model, processor = testbed
    chosen = prompts[:4]
    engine = FailingMidBatch(model, processor, poisoned=chosen[1])
    batcher = Batcher(engine, ServeConfig("multitoken", batch_window_ms=300, max_batch_size=8), ServeMetrics())
    streams = [False, False, False, True]

    async def serve() -> list[tuple[str, object]]:
        loop = asyncio.get_running_loop()
        jobs = [
            Job(f"job{i}", p, SamplingParams(max_tokens=8), TrimSetting(None), loop, stream=s)
            for i, (p, s) in enumerate(zip(chosen, streams))
        ]
        for job in jobs:
            batcher.submit(job)
        return [await asyncio.wait_for(_last_event(job), TIMEOUT) for job in jobs]

    batcher.start()
    try:
        outcomes = asyncio.run(serve())
    finally:
        batcher.stop()
    assert engine.batch_sizes == [4, 1, 1, 1], "the three non-streaming requests are each run again alone"
    kinds = [kind for kind, _ in outcomes]
    assert kinds == ["done", "error", "done", "error"]
    assert isinstance(outcomes[1][1], APIError) and "injected fault" in outcomes[1][1].message
    assert outcomes[3][1].status == 500 and "mid-stream" in outcomes[3][1].message
    reference = Engine(model, processor)
    for index in (0, 2):
        lone = RecordingJob(chosen[index], SamplingParams(max_tokens=8))
        reference.generate([lone], TrimSetting(None))
        assert outcomes[index][1].text == lone.result.text and outcomes[index][1].completion_tokens == 8


async def _last_event(job):
    while True:
        kind, payload = await job.events.get()
        if kind != "delta":
            return kind, payload


def run_engine(engine, prompts, sampling: SamplingParams, together: bool = True) -> list[str]:
    jobs = [RecordingJob(prompt, sampling) for prompt in prompts]
    if together:
        engine.generate(jobs, TrimSetting(None))
    else:
        for job in jobs:
            engine.generate([job], TrimSetting(None))
    return [job.result.text for job in jobs]


@pytest.mark.parametrize("temperature", [1e-30, 1e-38, 5e-324])
def test_a_tiny_temperature_samples_the_greedy_answer(testbed, prompts, temperature):
    """Temperatures in (0, ~1e-37] used to overflow softmax(logits / T) into NaN; the limit is greedy."""
    engine = Engine(*testbed)
    greedy = run_engine(engine, prompts[:4], SamplingParams(max_tokens=12))
    assert run_engine(engine, prompts[:4], SamplingParams(max_tokens=12, temperature=temperature, seed=3)) == greedy


def test_seeded_sampling_is_the_same_batched_and_alone(testbed, prompts):
    engine = Engine(*testbed)
    sampling = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5)
    batched = run_engine(engine, prompts[:4], sampling)
    assert batched == run_engine(engine, prompts[:4], sampling, together=False)
    assert batched != run_engine(engine, prompts[:4], SamplingParams(max_tokens=12)), "sampling gave the greedy answers"
