"""The console script on careless and hostile input (issue 15): text-only prompts, and one line + exit 2
for every bad input the probe found. Runs `trimllama` as a subprocess on the shipped testbed."""

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trimllama.testbed import CHECKPOINT_DIR, make_questions

SCRIPT = Path(sys.executable).parent / "trimllama"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
PROMPT = "what color is the circle ?"

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT_DIR / "model.safetensors").exists(), reason=f"testbed checkpoint missing in {CHECKPOINT_DIR}"
)


def run_scripts(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    def run(args):
        return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, env=ENV, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, args) for name, args in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_generate_without_an_image_runs_text_only_as_untrimmed():
    runs = run_scripts(
        {
            "trimmed": ["generate", "--prompt", PROMPT, "--json", "--head-k", "0.1", "--max-new-tokens", "6"],
            "untrimmed": ["generate", "--prompt", PROMPT, "--json", "--method", "none", "--max-new-tokens", "6"],
        }
    )
    records = {}
    for name, result in runs.items():
        assert result.returncode == 0, result.stderr
        records[name] = json.loads(result.stdout)
    trimmed, untrimmed = records["trimmed"], records["untrimmed"]
    assert trimmed["answer"] == untrimmed["answer"] and trimmed["new_tokens"] == untrimmed["new_tokens"] >= 1
    for record in (trimmed, untrimmed):
        assert record["image_tokens_before"] == record["image_tokens_after"] == record["extra_tokens"] == 0
        assert record["cross_kv_bytes_before"] == record["cross_kv_bytes_after"] == 0
    assert trimmed["method"]["name"] == "headwise_topk"


BAD_INPUTS = {
    "decompression bomb": (["generate", "--image", "{folder}/bomb.png"], r"refused image .*bomb\.png: .*decompression bomb"),
    "device file": (["generate", "--image", "/dev/zero"], r"not an image file: /dev/zero is not a regular file"),
    "directory": (["generate", "--image", "{folder}"], r"not an image file: .* is a directory"),
    "past PIL's bomb warning": (["generate", "--image", "{folder}/large.png"], r"cannot read image .*large\.png"),
    "seed out of int64": (
        ["generate", "--image", "{image}", "--method", "random", "--param", "seed=99999999999999999999999"],
        r"seed=99999999999999999999999 is out of range",
    ),
    "show without an image": (["show", "--out", "{folder}/x.png"], r"give at least one --image"),
    "show tile-px too large": (
        ["show", "--image", "{image}", "--out", "{folder}/x.png", "--tile-px", "100000"],
        r"--tile-px must be between 16 and 1024, got 100000",
    ),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    image = folder / "image.png"
    make_questions(1, seed=5, qtypes=("color",))[0].image.save(image)
    (folder / "bomb.png").write_bytes(bomb_png(60000, 60000))
    (folder / "large.png").write_bytes(bomb_png(10000, 10000))  # over PIL's warning, under its error
    commands = {
        name: [arg.format(folder=folder, image=image) for arg in args] + ["--prompt", PROMPT]
        for name, (args, _) in BAD_INPUTS.items()
    }
    return run_scripts(commands)


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(bad_runs, name):
    result = bad_runs[name]
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(r"trimllama (generate|show): error: .*", lines[0])
    assert re.search(BAD_INPUTS[name][1], lines[0]), lines[0]
    assert result.stdout == ""


# a setting given twice (by its option and by --param) or a name that is no setting: one line, exit 2, in every
# command that takes the selection options, before any model is loaded
SETTING_CLASHES = {
    "reserved name": (["--param", "name=x"], "name is not a method setting: the method is named apart from its settings"),
    "reserved image_tokens": (["--param", "image_tokens=5"], "image_tokens is not a method setting"),
    "head_k twice": (["--head-k", "0.1", "--param", "head_k=0.2"], "--param head_k and --head-k set the same setting"),
    "budget twice": (["--budget", "8", "--param", "budget=8"], "--param budget and --budget set the same setting"),
    "merge_remainder twice": (
        ["--merge-remainder", "--param", "merge_remainder=true"],
        "--param merge_remainder and --merge-remainder set the same setting",
    ),
    "method twice": (["--param", "method=random"], "--param method and --method set the same setting"),
}
COMMANDS = {
    "generate": ["generate", "--image", "{image}", "--prompt", PROMPT],
    "show": ["show", "--image", "{image}", "--prompt", PROMPT, "--out", "{folder}/x.png"],
    "serve": ["serve", "--port", "0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("clash", list(SETTING_CLASHES))
def test_a_reserved_name_or_a_setting_given_twice_is_one_line_and_exit_2(tmp_path, capsys, command, clash):
    from trimllama.cli import main

    image = tmp_path / "image.png"
    make_questions(1, seed=5, qtypes=("color",))[0].image.save(image)
    options, message = SETTING_CLASHES[clash]
    argv = [arg.format(image=image, folder=tmp_path) for arg in COMMANDS[command]] + options
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trimllama {command}: error: "), lines
    assert message in lines[0], lines[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--param", "name=x"], "name is not a method setting"),
        (["--param", "head_k=0.1"], "head_k is set by the sweep; it is not also a --param"),
        (["--methods", "attention_mass:mass", "--param", "mass=0.5"], "mass is set by the sweep"),
        (["--methods", "attention_mass"], "method attention_mass takes no head_k"),
        (["--methods", "floor"], "method floor takes no head_k"),
        (["--conversations", "--param", "query_rows=all"], "query_rows is set by the conversation arms"),
        (["--conversations", "--param", "image_tokens=3"], "image_tokens is not a method setting"),
    ],
)
def test_eval_refuses_bad_settings_before_loading(capsys, options, message):
    from trimllama.cli import main

    assert main(["eval", *options]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trimllama eval: error: ") and message in lines[0], lines


NON_FINITE = {
    "serve window nan": ["serve", "--batch-window-ms", "nan"],
    "serve window inf": ["serve", "--batch-window-ms", "inf"],
    "generate head-k overflow": ["generate", "--prompt", PROMPT, "--head-k", "1e999"],
    "show head-k overflow": ["show", "--prompt", PROMPT, "--out", "x.png", "--head-k=-1e999"],
    "demo head-k nan": ["demo", "--head-k", "nan"],
    "bench fractions nan": ["bench", "--fractions", "1,nan"],
    "sglang head-k overflow": ["sglang", "--budget", "8", "--head-k", "1e999"],
}


@pytest.fixture(scope="module")
def non_finite_runs():
    return run_scripts(NON_FINITE)


@pytest.mark.parametrize("name", list(NON_FINITE))
def test_non_finite_numbers_are_refused_in_one_line(non_finite_runs, name):
    """Issue 24 item 3: every float option refuses nan, inf and values that overflow to inf (serve took
    --batch-window-ms nan and never answered), with one line and exit 2, before any work."""
    result = non_finite_runs[name]
    command = NON_FINITE[name][0]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert re.fullmatch(rf"trimllama {command}: error: argument --[a-z-]+: expected .*finite.*", lines[0]), lines[0]
