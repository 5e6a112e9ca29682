"""`trimllama serve`: the real server in a subprocess, driven with the official `openai` client.

Two servers start once for the module, side by side, on free ports of 127.0.0.1 with the shipped
testbed checkpoint: `main` (API key, batches of up to 8, small image limits) and `slow_queue`
(no key, a 3 s batch window and a queue of 2, to fill the queue and to cancel waiting requests
deterministically). Answers are compared with `model.generate()` run in this process on the
same inputs, and the 32 concurrent answers with the same server's one-at-a-time answers. Every client call has a timeout; the module takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from trimllama import HeadwiseTopK, MergeRemainder, trim  # noqa: E402
from trimllama.serve.batcher import Batcher  # noqa: E402
from trimllama.serve.batcher import Request as Job  # noqa: E402
from trimllama.serve.config import ImageLimits, ServeConfig  # noqa: E402
from trimllama.serve.errors import APIError  # noqa: E402
from trimllama.serve.generation import Engine, SamplingParams, TextStream  # noqa: E402
from trimllama.serve.images import decode_image_url  # noqa: E402
from trimllama.serve.metrics import ServeMetrics  # noqa: E402
from trimllama.serve.prompts import Conversation, collate, encode_conversation  # noqa: E402
from trimllama.serve.trimming import TrimSetting  # noqa: E402
from trimllama.testbed import CHECKPOINT_DIR, answer_matches, load_testbed, make_questions  # noqa: E402

from serving import TIMEOUT, Server, bomb_png, data_url, metric, png_bytes, wait_for_metric  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason=f"testbed checkpoint missing in {CHECKPOINT_DIR}"
)

API_KEY = "test-key-123"
MODEL_NAME = "trimllama-testbed"
TRIMMED = {"method": "headwise_topk", "head_k": 0.25}
MAX_IMAGE_BYTES = 256 * 1024
MAX_IMAGE_PIXELS = 1_000_000


# --------------------------------------------------------------------------- helpers


def user_message(question, images: int = 1) -> list[dict]:
    url = data_url(png_bytes(question.image))
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": question.question}]}]


def ask(client, question, trim_options: dict | None = None, **kwargs):
    extra = {"trim": trim_options} if trim_options is not None else None
    return client.chat.completions.create(
        model=MODEL_NAME, messages=user_message(question), max_tokens=4, temperature=0, extra_body=extra, **kwargs
    )



# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def servers():
    main = Server(
        "--max-batch-size", "8", "--batch-window-ms", "50", "--max-queue", "64", "--max-images", "2",
        "--max-image-bytes", str(MAX_IMAGE_BYTES), "--max-image-pixels", str(MAX_IMAGE_PIXELS),
        api_key=API_KEY,
    )  # fmt: skip
    slow_queue = Server("--method", "none", "--batch-window-ms", "3000", "--max-batch-size", "8", "--max-queue", "2")
    try:
        main.wait_ready()
        slow_queue.wait_ready()
        yield {"main": main, "slow_queue": slow_queue}
    finally:
        main.stop()
        slow_queue.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def testbed():
    model, processor = load_testbed()
    return model, processor


@pytest.fixture(scope="module")
def questions():
    return make_questions(32, seed=2024)


def encode(processor, question, images: int = 1):
    parts = [{"type": "image"}] * images + [{"type": "text", "text": question.question}]
    return encode_conversation(processor, Conversation([{"role": "user", "content": parts}], [question.image] * images))


def generate_alone(testbed, question, method=None) -> str:
    """The greedy answer of `model.generate()` for this question alone (the reference)."""
    model, processor = testbed
    inputs = encode(processor, question).inputs
    with torch.no_grad():
        if method is None:
            output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        else:
            with trim(model, method):
                output = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


# --------------------------------------------------------------------------- the API


def test_models_health_and_metrics(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL_NAME]
    assert "Loading weights" not in server.output(), "a progress bar in a redirected log"
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_NAME
    metrics = server.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("trimllama_queue_depth", "trimllama_batch_size_count", "trimllama_image_tokens_total",
                 "trimllama_kept_tokens_total", "trimllama_cross_kv_bytes_after_total"):  # fmt: skip
        metric(metrics.text, name)


def test_correct_answer_untrimmed_and_trimmed(client, testbed, questions):
    method = HeadwiseTopK(**{k: v for k, v in TRIMMED.items() if k != "method"})
    answered = (
        q for q in questions[:16]
        if answer_matches(generate_alone(testbed, q), q.answer) and answer_matches(generate_alone(testbed, q, method), q.answer)
    )  # fmt: skip
    question = next(answered, None)
    assert question is not None, "the testbed answers none of 16 questions correctly, trimmed and untrimmed"
    untrimmed = ask(client, question, {"method": "none"})
    trimmed = ask(client, question, TRIMMED)
    for response in (untrimmed, trimmed):
        assert answer_matches(response.choices[0].message.content, question.answer)
        assert response.choices[0].finish_reason == "stop"
        assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    untrimmed_report, trimmed_report = untrimmed.model_extra["trim"], trimmed.model_extra["trim"]
    assert untrimmed_report["kept_tokens"] == untrimmed_report["image_tokens"] > 0
    assert untrimmed_report["cross_kv_bytes_saved"] == 0
    assert 0 < trimmed_report["kept_tokens"] < trimmed_report["image_tokens"]
    assert trimmed_report["cross_kv_bytes_saved"] > 0
    assert trimmed_report["method"].startswith("headwise_topk(head_k=0.25")


def test_server_default_trims_and_merge_remainder_per_request(client, testbed, questions):
    question = questions[0]
    default = ask(client, question)
    assert default.model_extra["trim"]["method"].startswith("headwise_topk(head_k=0.25")
    merged = ask(client, question, {"method": "headwise_topk", "head_k": 0.1, "merge_remainder": True})
    report = merged.model_extra["trim"]
    assert report["method"].startswith("merge_remainder(headwise_topk(head_k=0.1")
    assert report["extra_tokens"] >= 1
    expected = generate_alone(testbed, question, MergeRemainder(method=HeadwiseTopK(head_k=0.1)))
    assert merged.choices[0].message.content == expected


def test_streaming_gives_the_same_text(client, questions):
    for question, options in ((questions[1], TRIMMED), (questions[2], {"method": "none"})):
        plain = ask(client, question, options)
        stream = ask(client, question, options, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == plain.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
        assert len({c.id for c in chunks}) == 1


def test_stop_sequences_and_max_tokens(client, questions):
    question = questions[3]
    full = ask(client, question, {"method": "none"}).choices[0].message.content
    assert full, "the testbed gave an empty answer"
    stop = full[len(full) // 2 :]
    stopped = ask(client, question, {"method": "none"}, stop=[stop])
    assert stopped.choices[0].message.content == full[: full.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(
        model=MODEL_NAME, messages=user_message(question), max_tokens=1, temperature=0, extra_body={"trim": {"method": "none"}}
    )
    assert short.usage.completion_tokens == 1
    assert short.choices[0].finish_reason in ("length", "stop")


def test_seeded_sampling_is_reproducible(client, questions):
    kwargs = dict(model=MODEL_NAME, messages=user_message(questions[4]), max_tokens=4, temperature=1.5, top_p=0.9, seed=7)
    first = client.chat.completions.create(**kwargs).choices[0].message.content
    second = client.chat.completions.create(**kwargs).choices[0].message.content
    assert first == second


def test_32_concurrent_requests_batch_and_match_lone_answers(server, client, questions):
    distinct = [(q, TRIMMED if index % 2 else {"method": "none"}) for index, q in enumerate(questions[:16])]
    references = [ask(client, *request).choices[0].message.content for request in distinct]  # one at a time
    order = list(range(16)) + list(reversed(range(16)))  # 32 requests, each question and setting twice
    expected = [references[index] for index in order]
    before = server.get("/metrics").text
    with ThreadPoolExecutor(max_workers=32) as pool:
        futures = [pool.submit(ask, client, *distinct[index]) for index in order]
        answers = [future.result(timeout=TIMEOUT).choices[0].message.content for future in futures]
    after = server.get("/metrics").text
    differing = [(index, answers[index], expected[index]) for index in range(32) if answers[index] != expected[index]]
    assert not differing, f"(request, batched answer, lone answer): {differing}"
    batches = metric(after, "trimllama_batch_size_count") - metric(before, "trimllama_batch_size_count")
    singles = metric(after, 'trimllama_batch_size_bucket{le="1.0"}') - metric(before, 'trimllama_batch_size_bucket{le="1.0"}')
    served = metric(after, "trimllama_batch_size_sum") - metric(before, "trimllama_batch_size_sum")
    assert served == 32, f"{served:.0f} requests went through the batcher"
    assert batches - singles >= 2, f"{batches:.0f} batches, {singles:.0f} of one request: too little batching"
    assert batches < 32


# --------------------------------------------------------------------------- bad input


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def bad_requests(question) -> list[tuple[str, dict, int, str]]:
    good_url = data_url(png_bytes(question.image))
    text = {"type": "text", "text": question.question}
    noise = torch.randint(0, 256, (512, 512, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()
    from PIL import Image

    big_file = png_bytes(Image.fromarray(noise))
    assert len(big_file) > MAX_IMAGE_BYTES

    def body(content=None, **fields) -> dict:
        return {"model": MODEL_NAME, "messages": [{"role": "user", "content": content or [image_part(good_url), text]}], **fields}

    return [
        ("missing messages", {"model": MODEL_NAME}, 400, "'messages' is required"),
        ("empty messages", {"model": MODEL_NAME, "messages": []}, 400, "messages"),
        ("not an image", body([image_part(data_url(b"this is text")), text]), 400, "not an image"),
        ("not an image type", body([image_part("data:text/plain;base64,aGVsbG8="), text]), 400, "is not an image"),
        ("bad base64", body([image_part("data:image/png;base64,@@@@"), text]), 400, "not valid base64"),
        ("too many images", body([image_part(good_url)] * 3 + [text]), 400, "limit of 2 images per request"),
        ("remote url", body([image_part("https://example.com/cat.png"), text]), 400, "remote image URLs are not fetched"),
        ("local path", body([image_part("/etc/passwd"), text]), 400, "local file paths"),
        ("file url", body([image_part("file:///etc/passwd"), text]), 400, "local file paths"),
        ("too many bytes", body([image_part(data_url(big_file)), text]), 413, f"limit of {MAX_IMAGE_BYTES} bytes"),
        ("body too large", body([{"type": "text", "text": "x" * 6_000_000}]), 413, "exceeds the limit of 4893362 bytes"),
        ("too many pixels", body([image_part(data_url(bomb_png(2000, 2000))), text]), 413, f"limit of {MAX_IMAGE_PIXELS} pixels"),
        ("decompression bomb", body([image_part(data_url(bomb_png(60000, 60000))), text]), 413, "decompression bomb"),
        ("prompt too long", body([image_part(good_url), {"type": "text", "text": "what " * 400}]), 400, "more than the model allows"),
        ("max_tokens past context", body(max_tokens=10_000), 400, "max_tokens=10000"),
        ("unknown method", body(trim={"method": "no_such_method"}), 400, "unknown method 'no_such_method'"),
        ("head_k out of range", body(trim={"head_k": 2.5}), 400, "head_k=2.5 is out of range"),
        ("budget out of range", body(trim={"budget": 0}), 400, "budget=0 is out of range"),
        ("unknown setting", body(trim={"method": "floor", "head_k": 0.1}), 400, "method floor has no setting 'head_k'"),
        ("setting with none", body(trim={"method": "none", "head_k": 0.1}), 400, "no effect with method none"),
        ("scoring layer with none", body(trim={"method": "none", "trim_scoring_layer": True}), 400,
         "'trim.trim_scoring_layer': it has no effect with method none"),  # fmt: skip
        ("temperature out of range", body(temperature=5), 400, "'temperature'"),
        ("top_p out of range", body(top_p=0), 400, "'top_p'"),
        ("n > 1", body(n=2), 400, "one choice per request"),
        ("unknown role", {"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ("wrong model", {**body(), "model": "gpt-4o"}, 404, "'gpt-4o' is not served here"),
    ]


def test_bad_inputs_get_their_status_and_message(server, client, questions):
    for name, payload, status, message in bad_requests(questions[0]):
        response = server.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        error = response.json()["error"]
        assert message in error["message"], f"{name}: {error['message']!r} does not name {message!r}"
        assert set(error) == {"message", "type", "param", "code"}
    malformed = server.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"})
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    assert ask(client, questions[0]).choices[0].message.content  # still serving
    metrics = server.get("/metrics").text
    assert metric(metrics, 'trimllama_requests_total{outcome="invalid"}') >= len(bad_requests(questions[0]))


def test_openai_client_raises_named_errors(client, questions):
    with pytest.raises(openai.BadRequestError, match="unknown method 'nope'"):
        ask(client, questions[0], {"method": "nope"})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=user_message(questions[0]), max_tokens=2)


def test_api_key_is_required(server, questions):
    for key in ("wrong-key", ""):
        bad_client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "x", timeout=TIMEOUT, max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            ask(bad_client, questions[0])
    for path in ("/v1/models", "/metrics", "/health"):
        response = httpx.get(server.url + path, timeout=TIMEOUT)
        assert response.status_code == 401 and "missing API key" in response.json()["error"]["message"], path
        assert response.headers["www-authenticate"] == "Bearer"


# --------------------------------------------------------------------------- backpressure and cancellation


def test_full_queue_answers_503_with_retry_after(servers, questions):
    slow = servers["slow_queue"]
    payload = {"model": MODEL_NAME, "messages": user_message(questions[5]), "max_tokens": 2}

    def post():
        return httpx.post(f"{slow.url}/v1/chat/completions", json=payload, timeout=TIMEOUT)

    with ThreadPoolExecutor(max_workers=3) as pool:
        first = [pool.submit(post) for _ in range(2)]
        wait_for_metric(slow, "trimllama_queue_depth", lambda depth: depth == 2)  # both wait out the 3 s window
        rejected = post()
        accepted = [future.result(timeout=TIMEOUT) for future in first]
    assert rejected.status_code == 503, rejected.text
    assert rejected.headers["retry-after"] == "1"
    assert "--max-queue 2" in rejected.json()["error"]["message"]
    assert [response.status_code for response in accepted] == [200, 200]


def test_disconnected_client_cancels_its_request(servers, questions):
    slow = servers["slow_queue"]
    payload = {"model": MODEL_NAME, "messages": user_message(questions[6]), "max_tokens": 2}
    cancelled_before = metric(slow.get("/metrics").text, 'trimllama_requests_total{outcome="cancelled"}')
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):  # the request waits for the 3 s window; the client gives up first
            httpx.post(f"{slow.url}/v1/chat/completions", json={**payload, "stream": stream}, timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        metrics = slow.get("/metrics").text
        if metric(metrics, 'trimllama_requests_total{outcome="cancelled"}') - cancelled_before == 2:
            break
        time.sleep(0.2)
    assert metric(metrics, 'trimllama_requests_total{outcome="cancelled"}') - cancelled_before == 2
    assert metric(metrics, "trimllama_queue_depth") == 0
    after = httpx.post(f"{slow.url}/v1/chat/completions", json=payload, timeout=TIMEOUT)
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"]


# --------------------------------------------------------------------------- in process: engine, batcher, parts


def test_engine_matches_generate_alone_and_batched(testbed, questions):
    model, processor = testbed
    engine = Engine(model, processor)
    prompts = [encode(processor, q) for q in questions[:3]]
    prompts.append(encode(processor, questions[3], images=2))
    for method in (None, HeadwiseTopK(head_k=0.1)):
        expected = []
        for question, prompt in zip(questions, prompts):
            with torch.no_grad(), trim(model, method) if method else contextlib.nullcontext():
                output = model.generate(**prompt.inputs, max_new_tokens=4, do_sample=False)
            expected.append(processor.tokenizer.decode(output[0, prompt.prompt_tokens :], skip_special_tokens=True))
        batch = [RecordingJob(prompt) for prompt in prompts]
        engine.generate(batch, TrimSetting(method))
        alone = [RecordingJob(prompt) for prompt in prompts]
        for job in alone:
            engine.generate([job], TrimSetting(method))
        assert [job.result.text for job in batch] == expected
        assert [job.result.text for job in alone] == expected
        assert all("".join(job.deltas) == job.result.text for job in batch)


class RecordingJob:
    """A `Job` that records what the engine sends it."""

    def __init__(self, prompt, sampling: SamplingParams | None = None) -> None:
        self.prompt = prompt
        self.sampling = sampling or SamplingParams(max_tokens=4)
        self.deltas: list[str] = []
        self.result = None

    def cancelled(self) -> bool:
        return False

    def delta(self, text: str) -> None:
        self.deltas.append(text)

    def finish(self, result) -> None:
        self.result = result


class FaultyEngine(Engine):
    """Raises whenever a batch holds the poisoned prompt; records the batch sizes it was given."""

    def __init__(self, model, processor, poisoned) -> None:
        super().__init__(model, processor)
        self.poisoned = poisoned
        self.batch_sizes: list[int] = []

    def generate(self, jobs, setting) -> None:
        self.batch_sizes.append(len(jobs))
        if any(job.prompt is self.poisoned for job in jobs):
            raise RuntimeError("injected fault")
        super().generate(jobs, setting)


def test_a_failing_request_fails_alone(testbed, questions):
    model, processor = testbed
    prompts = [encode(processor, q) for q in questions[:3]]
    engine = FaultyEngine(model, processor, poisoned=prompts[1])
    batcher = Batcher(engine, ServeConfig(MODEL_NAME, batch_window_ms=200, max_batch_size=8), ServeMetrics())

    async def serve(prompt_list) -> list[tuple[str, object]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(f"job{i}", p, SamplingParams(max_tokens=4), TrimSetting(None), loop) for i, p in enumerate(prompt_list)]
        for job in jobs:
            batcher.submit(job)
        return [await asyncio.wait_for(_last_event(job), TIMEOUT) for job in jobs]

    batcher.start()
    try:
        outcomes = asyncio.run(serve(prompts))
        later = asyncio.run(serve([prompts[0]]))
    finally:
        batcher.stop()
    assert engine.batch_sizes[:4] == [3, 1, 1, 1]
    (kind0, good0), (kind1, error), (kind2, good2) = outcomes
    assert (kind0, kind1, kind2) == ("done", "error", "done")
    assert isinstance(error, APIError) and error.status == 500 and "injected fault" in error.message
    assert good0.text == generate_alone(testbed, questions[0]) and good2.text == generate_alone(testbed, questions[2])
    assert later[0][0] == "done" and later[0][1].text == good0.text


async def _last_event(job):
    while True:
        kind, payload = await job.events.get()
        if kind != "delta":
            return kind, payload


def test_collate_equals_the_processor_batch(testbed, questions):
    _, processor = testbed
    prompts = [encode(processor, q) for q in questions[:3]] + [encode(processor, questions[3], images=2)]
    texts = [processor.tokenizer.decode(p.inputs["input_ids"][0]) for p in prompts]
    images = [[q.image] for q in questions[:3]] + [[questions[3].image] * 2]
    expected = processor(images=images, text=texts, add_special_tokens=False, padding=True, return_tensors="pt")
    batch = collate(prompts, processor.tokenizer.pad_token_id)
    assert set(batch) == set(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


def test_text_stream_holds_back_and_cuts_at_stop_sequences(testbed):
    tokenizer = testbed[1].tokenizer
    red, green, blue = (tokenizer.convert_tokens_to_ids(word) for word in ("red", "green", "blue"))
    plain = TextStream(tokenizer)
    assert [plain.push(t) for t in (red, green, blue)] == [("red", False), (" green", False), (" blue", False)]
    assert plain.text == tokenizer.decode([red, green, blue])
    cut = TextStream(tokenizer, stop=["green"])
    assert [cut.push(t) for t in (red, green)] == [("red", False), (" ", True)]
    held = TextStream(tokenizer, stop=["red green blue"])
    assert [held.push(t) for t in (red, green)] == [("", False), ("", False)]
    assert held.flush() == "red green"


def test_image_limits_refuse_bombs_before_decoding():
    limits = ImageLimits(max_bytes=1 << 20, max_pixels=4096 * 4096, max_images=1)
    for side in (5000, 60000):  # PIL itself refuses the second when opening it
        with pytest.raises(APIError, match=f"limit of {4096 * 4096} pixels per image") as refused:
            decode_image_url(data_url(bomb_png(side, side)), limits, "image")
        assert refused.value.status == 413
    with pytest.raises(APIError, match="truncated or corrupt"):
        decode_image_url(data_url(bomb_png(64, 64)), limits, "image")
