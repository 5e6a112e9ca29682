"""The `trimllama generate` / `show` console script, run as a subprocess on the shipped testbed checkpoint."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trimllama.cli import build_parser
from trimllama.loading import prompt_text
from trimllama.testbed import CHECKPOINT_DIR, answer_matches, make_questions
from trimllama.harness.visualize import kept_patch_grid, tile_grids

SCRIPT = Path(sys.executable).parent / "trimllama"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=300)


def run_scripts(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run several console-script calls, two at a time (import and model load dominate each)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def save_image(question, path: Path) -> str:
    question.image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def colour_questions():
    # The shipped testbed is weak (colour 0.58 held-out, see README): seed 31 gives three colour questions it
    # answers right, untrimmed and trimmed, the third on a 2-tile image.
    return make_questions(3, seed=31, qtypes=("color",))


@pytest.fixture(scope="module")
def generated(colour_questions, tmp_path_factory):
    """Three colour questions (the testbed answers those best, trimmed or not), in the output modes."""
    folder = tmp_path_factory.mktemp("generate")
    images = [save_image(q, folder / f"q{i}.png") for i, q in enumerate(colour_questions)]
    prompts = [q.question for q in colour_questions]
    return run_scripts(
        {
            "text": ["generate", "--image", images[0], "--prompt", prompts[0]],
            "json": ["generate", "--image", images[1], "--prompt", prompts[1], "--json"],
            "merge": ["generate", "--image", images[2], "--prompt", prompts[2], "--json", "--merge-remainder"],
            "untrimmed": ["generate", "--image", images[0], "--prompt", prompts[0], "--json", "--method", "none"],
        }
    )


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr
    return result


def test_generate_text_output_is_the_answer_then_one_stats_line(generated):
    lines = _ok(generated["text"]).stdout.strip().splitlines()
    assert len(lines) == 2
    assert re.search(r"[a-z]", lines[0])
    pattern = (
        r"image tokens (\d+) \((\d+) in real tiles\) -> (\d+) \((\d+\.\d)% of \2\), "
        r"cross-attention KV (\d+\.\d\d) MiB -> (\d+\.\d\d) MiB \(saved (\d+\.\d\d) MiB\), \d+\.\d\d s"
    )
    match = re.fullmatch(pattern, lines[1])
    assert match, lines[1]
    before, valid, after = (int(match[i]) for i in (1, 2, 3))
    assert 0 < after < valid < before  # a 1x3-tile image: one padding tile out of 4
    assert float(match[4]) == pytest.approx(100 * after / valid, abs=0.06)
    assert float(match[6]) < float(match[5])


def test_generate_json_record(generated):
    record = json.loads(_ok(generated["json"]).stdout)
    assert record["model"] == "testbed"
    assert record["method"]["name"] == "headwise_topk" and record["method"]["parameters"]["head_k"] == 0.25
    assert 0 < record["image_tokens_after"] <= record["image_tokens_valid"] <= record["image_tokens_before"]
    assert record["kept_fraction"] == pytest.approx(record["image_tokens_after"] / record["image_tokens_valid"])
    assert record["cross_kv_bytes_saved"] == record["cross_kv_bytes_before"] - record["cross_kv_bytes_after"] > 0
    assert record["new_tokens"] >= 1 and record["seconds"] > 0 and record["extra_tokens"] == 0
    assert generated["json"].stderr == ""  # no progress bars or warnings under --json


def test_generate_merge_remainder_adds_one_token_per_tile_with_drops(generated, colour_questions):
    record = json.loads(_ok(generated["merge"]).stdout)
    assert record["method"]["name"] == "merge_remainder"
    assert record["method"]["parameters"]["method"]["name"] == "headwise_topk"
    rows, cols = colour_questions[2].tiles
    assert 1 <= record["extra_tokens"] <= rows * cols
    assert record["image_tokens_after"] < record["image_tokens_valid"]


def test_generate_method_none_is_untrimmed(generated):
    record = json.loads(_ok(generated["untrimmed"]).stdout)
    assert record["method"]["name"] == "none"
    assert record["image_tokens_after"] == record["image_tokens_before"]
    assert record["cross_kv_bytes_after"] == record["cross_kv_bytes_before"] > 0
    assert record["cross_kv_bytes_saved"] == 0 and record["kept_fraction"] == 1.0


def test_generate_answers_correctly(generated, colour_questions):
    answers = [
        _ok(generated["text"]).stdout.splitlines()[0],
        json.loads(_ok(generated["json"]).stdout)["answer"],
        json.loads(_ok(generated["merge"]).stdout)["answer"],
    ]
    correct = [answer_matches(answer, q.answer) for answer, q in zip(answers, colour_questions)]
    assert sum(correct) >= 2, list(zip(answers, [q.answer for q in colour_questions]))


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """`show` on two images (a 2x2-tile and a 1x3-tile one) with MergeRemainder, as JSON."""
    folder = tmp_path_factory.mktemp("show")
    questions = [q for q in make_questions(12, seed=0, qtypes=("shape",)) if q.tiles in ((2, 2), (1, 3))]
    questions = [next(q for q in questions if q.tiles == (2, 2)), next(q for q in questions if q.tiles == (1, 3))]
    images = [save_image(q, folder / f"s{i}.png") for i, q in enumerate(questions)]
    out = folder / "kept.png"
    args = ["show", "--image", images[0], "--image", images[1], "--prompt", questions[0].question]
    result = _ok(run_script([*args, "--merge-remainder", "--out", str(out), "--json"]))
    return json.loads(result.stdout), np.asarray(Image.open(out).convert("RGB")), questions


def test_show_png_has_the_tile_grid_of_each_image(shown):
    record, png, questions = shown
    layout = record["figure"]
    assert png.shape == (layout["height"], layout["width"], 3)
    tile_px = layout["tile_px"]
    assert tile_px >= 320 and tile_px % 112 == 0
    for index, question in enumerate(questions):
        rows, cols = question.tiles
        tiles = [t for t in layout["tiles"] if t["image"] == index]
        assert sorted((t["row"], t["col"]) for t in tiles) == [(r, c) for r in range(rows) for c in range(cols)]
        for tile in tiles:
            x0, y0, x1, y1 = tile["box"]
            assert (x1 - x0, y1 - y0) == (tile_px, tile_px)
            assert 0 <= x0 and x1 <= png.shape[1] and 0 <= y0 and y1 <= png.shape[0]
    assert png.shape[1] >= sum(q.tiles[1] for q in questions) * tile_px


def test_show_dims_dropped_patches_and_keeps_kept_ones_in_colour(shown):
    record, png, _ = shown
    layout = record["figure"]
    side, tile_px = layout["patches_per_side"], layout["tile_px"]
    num_patches = side * side + 1
    keep, _ = kept_patch_grid(torch.tensor(record["kept"]), 2, 4, num_patches)
    step = tile_px // side
    kept_grey, dropped_grey, kept_light, dropped_light = [], [], [], []
    for tile in layout["tiles"]:
        x0, y0 = tile["box"][:2]
        for row in range(side):
            for col in range(side):
                inner = png[y0 + row * step + 4 : y0 + (row + 1) * step - 4, x0 + col * step + 4 : x0 + (col + 1) * step - 4]
                grey = float(((inner[..., 0] == inner[..., 1]) & (inner[..., 1] == inner[..., 2])).mean())
                kept = keep[tile["image"], tile["tile"], row, col]
                (kept_grey if kept else dropped_grey).append(grey)
                (kept_light if kept else dropped_light).append(float(inner.mean()))
    assert kept_grey and dropped_grey
    assert min(dropped_grey) == 1.0  # every dropped patch is drawn in grey
    assert np.mean(kept_grey) < 0.5  # kept patches keep their colours
    assert np.mean(dropped_light) < 0.6 * np.mean(kept_light)
    kept_class_tokens = sum(1 for index in record["kept"] if index % num_patches == 0)
    assert len(record["kept"]) == record["image_tokens_after"]
    assert len(kept_grey) == record["image_tokens_after"] - kept_class_tokens  # every kept patch is in a drawn tile


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(CHECKPOINT_DIR)


def test_tile_grids_follow_the_processor(processor):
    for question in make_questions(6, seed=3):
        inputs = processor.image_processor(images=[[question.image]], return_tensors="pt")
        assert tile_grids(inputs["aspect_ratio_ids"][0], processor.image_processor) == [question.tiles]


@pytest.mark.parametrize(
    "chat_template, expected",
    [
        ("auto", "<|image|><|image|><|begin_of_text|>question : what is red ? answer :"),
        ("on", "<|image|><|image|><|begin_of_text|>question : what is red ? answer :"),
        ("off", "<|image|><|image|><|begin_of_text|>What is red ?"),
    ],
)
def test_prompt_format_follows_the_model(processor, chat_template, expected):
    """One prompt rule for every front-end: the processor's chat template when it has one (the testbed's renders
    its training format), else the raw prompt after the image tokens."""
    assert prompt_text(processor, "What is red ?", 2, chat_template) == expected


def test_kept_patch_grid_maps_indices_to_tiles_and_row_major_patches():
    side, num_patches = 3, 10  # class token + 3x3 patches
    # image 1, tile 2: class token, and patch (row 1, col 2) = token 1 + 1 * 3 + 2
    kept = torch.tensor([(1 * 4 + 2) * num_patches, (1 * 4 + 2) * num_patches + 1 + 1 * side + 2])
    patches, classes = kept_patch_grid(kept, images=2, tiles=4, num_patches=num_patches)
    assert patches.shape == (2, 4, 3, 3) and classes.shape == (2, 4)
    assert np.argwhere(patches).tolist() == [[1, 2, 1, 2]] and np.argwhere(classes).tolist() == [[1, 2]]


def test_every_option_has_help():
    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.dest == "command")
    for command in ("generate", "show"):
        for action in subparsers.choices[command]._actions:
            assert action.help, f"{command} {action.option_strings} has no help"


BAD_INPUTS = {
    "missing image": (["--image", "{folder}/absent.png"], r"image file not found: .*absent\.png"),
    "unreadable image": (["--image", "{folder}/truncated.png"], r"cannot read image .*truncated\.png"),
    "not an image": (["--image", "{folder}/notes.png"], r"not an image: .*notes\.png \(unrecognised image format\)"),
    "unsupported model": (
        ["--image", "{image}", "--model", "{folder}/llama"],
        r"model_type 'llama' is not a supported cross-attention model",
    ),
    "head-k out of range": (["--image", "{image}", "--head-k", "1.5"], r"head_k=1\.5 is out of range"),
    "budget out of range": (["--image", "{image}", "--budget", "0"], r"budget=0 is out of range"),
    "budget above the image tokens": (
        ["--image", "{image}", "--budget", "5000"],
        r"--budget 5000 is out of range: the image\(s\) have \d+ image tokens in real tiles",
    ),
    "unknown method": (["--image", "{image}", "--method", "fastest"], r"unknown method 'fastest'; registered methods: headwise_topk"),
    "prompt too long": (
        ["--image", "{image}", "--prompt", "square " * 300],
        r"prompt too long: \d+ tokens, the model takes at most 256",
    ),
    "no gpu": (["--image", "{image}", "--device", "cuda"], r"--device cuda was asked for, but no CUDA GPU is available"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    image = save_image(make_questions(1, seed=5, qtypes=("color",))[0], folder / "image.png")
    (folder / "truncated.png").write_bytes(Path(image).read_bytes()[:200])
    (folder / "notes.png").write_text("not an image\n")
    (folder / "llama").mkdir()
    (folder / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    commands = {}
    for name, (args, _) in BAD_INPUTS.items():
        args = [arg.format(folder=folder, image=image) for arg in args]
        prompt = [] if "--prompt" in args else ["--prompt", "what color is the circle ?"]
        commands[name] = ["generate", *args, *prompt]
    commands["show output not a png"] = ["show", "--image", image, "--prompt", "what ?", "--out", str(folder / "x.jpg")]
    return run_scripts(commands)


@pytest.mark.parametrize("name", [*BAD_INPUTS, "show output not a png"])
def test_bad_input_is_one_line_and_a_nonzero_exit(bad_runs, name):
    if name == "no gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available here")
    message = BAD_INPUTS[name][1] if name in BAD_INPUTS else r"--out .*x\.jpg: the figure is a PNG"
    result = bad_runs[name]
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"trimllama (generate|show): error: .*", lines[0])
    assert re.search(message, lines[0]), lines[0]
    assert result.stdout == ""


def test_demo_runs_the_three_arms_on_the_testbed():
    result = run_script(["demo", "--questions", "4"])
    assert result.returncode == 0, result.stderr
    for arm in ("untrimmed:", "trimmed:", "+remainder:"):
        assert arm in result.stdout
    assert "image tokens kept:" in result.stdout


def test_eval_gives_every_arm_its_params_and_sweeps_the_named_setting(tmp_path, capsys):
    from trimllama.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--questions", "4", "--methods", "headwise_topk,attention_mass:mass", "--settings", "0.5",
            "--param", "query_rows=image_turn", "--no-matched-random", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    methods = [run["method"] for run in json.loads(out.with_suffix(".json").read_text())["results"]]
    assert methods[2:] == [
        "headwise_topk(head_k=0.5, reduce=sum, order=most, query_rows=image_turn)",
        "attention_mass(mass=0.5, query_rows=image_turn)",
    ]
