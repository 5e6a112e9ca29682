"""The three front-ends (the CLI, the server, the lmms-eval model) agree, because each only translates the core:

- the same loose settings resolve to the same method (label and parameters), and the same bad ones are refused
  with the same message text (`trimllama.build_method`);
- the same model, image and question become the same prompt tokens (`trimllama.loading.prompt_text`);
- the same request reports the same image tokens and cross-attention bytes, before and after (`TrimStats.samples`).
And no module outside `adapters/` (and the model builders) reads a model's modules.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

import trimllama
from trimllama.cli import build_parser, main
from trimllama.cli.options import CommandError, flag_message, method_from_args
from trimllama.methods import method_from_settings
from trimllama.testbed import CHECKPOINT_DIR, make_questions

pytest.importorskip("fastapi")
lmms_eval = pytest.importorskip("lmms_eval")

from fastapi.testclient import TestClient  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from trimllama.integrations import lmms_eval_model  # noqa: E402
from trimllama.serve import ServeConfig, create_app  # noqa: E402
from trimllama.serve.errors import APIError  # noqa: E402
from trimllama.serve.schemas import TrimOptions  # noqa: E402
from trimllama.serve.trimming import TrimSetting, resolve_trim  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason=f"testbed checkpoint missing in {CHECKPOINT_DIR}"
)
SRC = Path(trimllama.__file__).resolve().parent

# loose settings as all three front-ends take them: method, head_k, budget, merge_remainder, like
GOOD = [
    dict(method="headwise_topk", head_k=0.1),
    dict(method="headwise_topk", head_k=0.05, budget=8),
    dict(method="merge_remainder", head_k=0.1),
    dict(method="headwise_topk", head_k=16, merge_remainder=True),
    dict(method="random", head_k=0.2),
    dict(method="random", like="headwise_topk", head_k=0.1, merge_remainder=True),
    dict(method="uniform_stride", budget=None, head_k=0.3),
    dict(method="headwise_topk", head_k=0.1, query_rows="image_turn"),
    dict(method="mean_heads_topk", head_k=0.2, query_rows="image_turn", merge_remainder=True),
    dict(method="none"),
]
BAD = [
    dict(method="nope"),
    dict(method="none", head_k=0.1),
    dict(method="none", merge_remainder=True),
    dict(method="floor", budget=8),
    dict(method="headwise_topk", head_k=1.5),
    dict(method="headwise_topk", budget=0),
    dict(method="random", head_k=0.2, budget=8),
    dict(method="headwise_topk", like="random"),
    dict(method="random", like="none"),
    dict(method="random", like=5),
    dict(method="headwise_topk", name="x"),  # a reserved name: not a setting (image_tokens: in the tests below)
    dict(method="none", name="x"),
    dict(method="headwise_topk", query_rows="first_turn"),
]


def cli_method(settings: dict):
    argv = ["generate", "--image", "x.png", "--prompt", "q", "--method", settings["method"]]
    for key in ("head_k", "budget"):
        if settings.get(key) is not None:
            argv += [f"--{key.replace('_', '-')}", str(settings[key])]
    if settings.get("merge_remainder"):
        argv.append("--merge-remainder")
    for key, value in settings.items():
        if key not in ("method", "head_k", "budget", "merge_remainder"):
            argv += ["--param", f"{key}={json.dumps(value)}"]
    return method_from_args(build_parser().parse_args(argv))


def serve_method(settings: dict):
    return resolve_trim(TrimOptions.model_validate(settings), TrimSetting(None)).method


def lmms_method(settings: dict):
    return lmms_eval_model.build_method(**settings)


def record(method) -> tuple:
    return (None, None) if method is None else (method.label(), method.parameters)


@pytest.mark.parametrize("settings", GOOD, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_same_settings_give_the_same_method(settings):
    expected = trimllama.build_method(settings["method"], **{k: v for k, v in settings.items() if k != "method"})
    for front_end in (cli_method, serve_method, lmms_method):
        method = front_end(settings)
        assert method == expected, front_end.__name__
        assert record(method) == record(expected), front_end.__name__


@pytest.mark.parametrize("settings", BAD, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_the_same_bad_settings_are_refused_with_the_same_message(settings):
    with pytest.raises(trimllama.TrimllamaError) as core:
        trimllama.build_method(settings["method"], **{k: v for k, v in settings.items() if k != "method"})
    message = str(core.value)
    with pytest.raises(CommandError) as cli:
        cli_method(settings)
    assert str(cli.value) == flag_message(core.value)  # the CLI names a setting by its flag, nothing else
    assert message.split(" ", 1)[1] in str(cli.value)
    with pytest.raises(APIError) as serve:
        serve_method(settings)
    assert serve.value.status == 400 and message in serve.value.message
    with pytest.raises(ValueError) as lmms:
        lmms_method(settings)
    assert str(lmms.value) == f"trimllama: {message}"


def test_an_int_count_above_the_image_is_refused_with_the_core_message(plugin, request_parts, capsys):
    from trimllama.cli.answer import build_inputs

    question, path, url = request_parts
    inputs = build_inputs(plugin.processor, [question.image], question.question, "auto")
    tokens = int(inputs["aspect_ratio_mask"].sum()) * plugin.num_patches
    with pytest.raises(trimllama.InvalidSettingError) as core:
        trimllama.build_method("headwise_topk", budget=5000, image_tokens=tokens)
    message = str(core.value)
    assert message == f"budget 5000 is out of range: the image(s) have {tokens} image tokens in real tiles"
    assert main(["generate", "--image", path, "--prompt", question.question, "--budget", "5000"]) == 2
    assert capsys.readouterr().err.strip() == "trimllama generate: error: --budget " + message.removeprefix("budget ")
    app = create_app(plugin.model, plugin.processor, ServeConfig(model_name="testbed"))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question.question}]
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}], "trim": {"budget": 5000}})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


# --------------------------------------------------------------------------- one request through all three


@pytest.fixture(scope="module")
def request_parts(tmp_path_factory):
    question = make_questions(1, seed=31, qtypes=("color",))[0]  # a 1-tile image: padding tiles in the batch axis
    path = tmp_path_factory.mktemp("frontends") / "image.png"
    question.image.save(path)
    buffer = io.BytesIO()
    question.image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return question, str(path), url


@pytest.fixture(scope="module")
def plugin():
    return lmms_eval_model.TrimmedLlamaVision(pretrained="testbed", method="headwise_topk", head_k=0.1)


def cli_generate(capsys, path: str, question: str, *options: str) -> dict:
    assert main(["generate", "--image", path, "--prompt", question, "--json", "--max-new-tokens", "2", *options]) == 0
    return json.loads(capsys.readouterr().out)


def serve_reports(plugin, url: str, question: str, trims: list[dict | None]) -> list[dict]:
    app = create_app(plugin.model, plugin.processor, ServeConfig(model_name="testbed"))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    reports = []
    with TestClient(app) as client:
        for trim_options in trims:
            body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
            if trim_options is not None:
                body["trim"] = trim_options
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            reports.append(response.json()["trim"])
    return reports


def lmms_record(plugin, image, question: str) -> lmms_eval_model.KeptRecord:
    plugin.task_dict = {"toy": {"test": [{"images": [image]}]}}
    request = Instance(
        request_type="generate_until",
        arguments=(question, {"max_new_tokens": 2}, lambda doc: doc["images"], 0, "toy", "test"),
        idx=0,
        metadata={"task": "toy", "doc_id": 0, "repeats": 1},
    )
    plugin.generate_until([request])
    return plugin.kept_records[-1]


def test_the_same_prompt_for_the_same_model_image_and_question(plugin, request_parts):
    from trimllama.cli.answer import build_inputs
    from trimllama.serve.config import ImageLimits
    from trimllama.serve.prompts import encode_messages
    from trimllama.serve.schemas import Message

    question, _, url = request_parts
    processor = plugin.processor
    cli = build_inputs(processor, [question.image], question.question, "auto")["input_ids"]
    message = Message.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question.question}]}
    )
    served = encode_messages(processor, [message], ImageLimits(), check_length=lambda tokens: None).inputs["input_ids"]
    lmms = processor(
        images=[[question.image]], text=[plugin.prompt(question.question, 1)], add_special_tokens=False, return_tensors="pt"
    )["input_ids"]
    assert torch.equal(cli, served) and torch.equal(cli, lmms)


SAMPLE_NAMES = [field.name for field in dataclasses.fields(trimllama.SampleStats)] + ["kept_fraction", "cross_kv_bytes_saved"]


def test_the_same_request_reports_the_same_tokens_and_bytes(plugin, request_parts, capsys):
    """Issue 25 item 2: one name, one meaning. The server reports a request's `SampleStats` by their names (and
    /metrics counts them under the same names); every name the CLI's JSON shares with it holds the same figure;
    lmms-eval's record is the same `SampleStats`."""
    question, path, url = request_parts
    trimmed_cli = cli_generate(capsys, path, question.question, "--head-k", "0.1")
    untrimmed_cli = cli_generate(capsys, path, question.question, "--method", "none")
    trimmed_serve, untrimmed_serve = serve_reports(plugin, url, question.question, [{"head_k": 0.1}, {"method": "none"}])
    trimmed_lmms = lmms_record(plugin, question.image, question.question)
    for cli, served in ((trimmed_cli, trimmed_serve), (untrimmed_cli, untrimmed_serve)):
        assert list(served) == ["method", *SAMPLE_NAMES]
        shared = (set(cli) & set(served)) - {"method"}  # the CLI's `method` is a record, the server's a label
        assert shared == {"extra_tokens", "kept_fraction", "cross_kv_bytes_before", "cross_kv_bytes_after", "cross_kv_bytes_saved"}
        assert {name: cli[name] for name in shared} == {name: served[name] for name in shared}
        assert served["cross_kv_bytes_before"] > 0 and served["image_tokens"] == cli["image_tokens_valid"]
    assert {name: getattr(trimmed_lmms, name) for name in SAMPLE_NAMES} == {name: trimmed_serve[name] for name in SAMPLE_NAMES}
    assert trimmed_serve["kept_tokens"] < trimmed_serve["image_tokens"]
    assert trimmed_cli["cross_kv_bytes_after"] < trimmed_cli["cross_kv_bytes_before"]
    # the untrimmed model keeps every token: a kept fraction of 1, not 4/3 for the padding tile
    assert untrimmed_serve["kept_tokens"] == untrimmed_serve["image_tokens"] and untrimmed_serve["kept_fraction"] == 1.0
    assert untrimmed_cli["kept_fraction"] == 1.0 and untrimmed_cli["cross_kv_bytes_saved"] == 0
    assert untrimmed_cli["image_tokens_before"] > untrimmed_cli["image_tokens_valid"]


def test_metrics_count_the_sample_figures_under_their_names(plugin, request_parts):
    question, _, url = request_parts
    app = create_app(plugin.model, plugin.processor, ServeConfig(model_name="testbed"))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question.question}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "trim": {"head_k": 0.1}}
    with TestClient(app) as client:
        report = client.post("/v1/chat/completions", json=body).json()["trim"]
        metrics = client.get("/metrics").text
    for field in dataclasses.fields(trimllama.SampleStats):
        assert f"trimllama_{field.name}_total {float(report[field.name])}" in metrics.splitlines(), field.name


def test_only_adapters_read_the_model_modules():
    """The grep of issue 16: model internals are read in adapters/, the benchmark's model builder, the testbed,
    testing.py and the SGLang model override (the adapter of SGLang's own Mllama) only."""
    allowed = ("adapters/", "bench/model.py", "testing.py", "testbed/", "integrations/sglang/model.py")
    result = subprocess.run(
        ["grep", "-rn", r"model\.model\.\|language_model\|vision_model", str(SRC), "--include=*.py"],
        capture_output=True,
        text=True,
    )
    hits = [line for line in result.stdout.splitlines() if not line.startswith(tuple(str(SRC / a) for a in allowed))]
    assert hits == [], "\n".join(hits)
    assert re.search(r"adapters/mllama\.py", result.stdout)  # the grep does find what it looks for


def test_any_other_setting_is_checked_against_its_default_in_the_cli_and_the_server():
    with pytest.raises(trimllama.InvalidSettingError) as core:
        trimllama.build_method("random", seed="x")
    assert str(core.value) == "seed expects int, got 'x'"
    argv = ["generate", "--image", "x.png", "--prompt", "q", "--method", "random", "--param", "seed=x"]
    with pytest.raises(CommandError, match=re.escape(str(core.value))):
        method_from_args(build_parser().parse_args(argv))
    with pytest.raises(APIError) as served:
        serve_method(dict(method="random", seed="x"))
    assert served.value.param == "trim.seed" and str(core.value) in served.value.message
    assert trimllama.build_method("random", seed=3) == serve_method(dict(method="random", seed=3)) == trimllama.RandomSelect(seed=3)


@pytest.mark.parametrize("trim_options", [{"name": "x"}, {"image_tokens": 5}, {"method": "none", "name": "x"}])
def test_a_reserved_name_in_the_trim_object_is_a_400_naming_it(plugin, request_parts, trim_options):
    """Not a 500: the server answers the core's message, in the OpenAI error shape, and keeps serving."""
    question, _, url = request_parts
    key = next(key for key in trim_options if key != "method")
    with pytest.raises(trimllama.InvalidSettingError) as core:
        method_from_settings(trim_options.get("method", "headwise_topk"), {key: trim_options[key]})
    app = create_app(plugin.model, plugin.processor, ServeConfig(model_name="testbed"))
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question.question}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    with TestClient(app) as client:
        refused = client.post("/v1/chat/completions", json=dict(body, trim=trim_options))
        image_turn = client.post("/v1/chat/completions", json=dict(body, trim={"head_k": 0.1, "query_rows": "image_turn"}))
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == f"trim.{key}" and str(core.value) in error["message"]
    assert image_turn.status_code == 200, image_turn.text
    assert 0 < image_turn.json()["trim"]["kept_tokens"] < image_turn.json()["trim"]["image_tokens"]


def test_no_front_end_adds_a_second_bos_on_a_tokenizer_that_adds_one(request_parts):
    """A Llama tokenizer adds `<|begin_of_text|>` itself; the prompt rule already writes it. One encode rule
    (`trimllama.loading.encode`): the CLI, the server, the evaluation harness and lmms-eval all use it."""
    from tokenizers.processors import TemplateProcessing

    from trimllama.cli.answer import build_inputs
    from trimllama.cli.eval import question_prompt
    from trimllama.harness.evaluate import encode_questions
    from trimllama.serve.config import ImageLimits
    from trimllama.serve.prompts import encode_messages
    from trimllama.serve.schemas import Message
    from trimllama.testbed.build import make_processor

    question, _, url = request_parts
    processor = make_processor()
    bos = processor.tokenizer.bos_token_id
    processor.tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{processor.tokenizer.bos_token} $A", special_tokens=[(processor.tokenizer.bos_token, bos)]
    )
    assert processor.tokenizer("question")["input_ids"][0] == bos  # this tokenizer adds a BOS
    message = Message.model_validate(
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question.question}]}
    )
    encoded = {
        "cli": build_inputs(processor, [question.image], question.question, "auto")["input_ids"],
        "serve": encode_messages(processor, [message], ImageLimits(), lambda tokens: None).inputs["input_ids"],
        "eval": encode_questions(processor, [question], question_prompt)[0]["input_ids"],
    }
    for front_end, ids in encoded.items():
        assert int((ids == bos).sum()) == 1, (front_end, ids)
    assert torch.equal(encoded["cli"], encoded["serve"]) and torch.equal(encoded["cli"], encoded["eval"])
    calls = [
        str(path.relative_to(SRC))
        for path in SRC.rglob("*.py")
        if re.search(r"processor\(\s*images=", path.read_text()) and "testbed" not in path.parts
    ]
    assert calls == ["loading.py"], calls  # lmms-eval and the conversations harness encode through it too
