"""`python -m trimllama.integrations.sglang.launch <sglang.launch_server args>`: SGLang's launcher, whose
`/server_info` also says that trimllama's Mllama is serving and with which settings (key `trimllama`).

`trimllama sglang` runs this module after checking the options and importing the override; the settings and the
external model and processor packages reach SGLang's processes through the environment it sets.
"""

from __future__ import annotations

import json
import runpy
import sys

SERVER_INFO_PATHS = ("/server_info", "/get_server_info")


def server_info(settings, model_path: str | None) -> dict:
    """What `/server_info` reports under `trimllama`: the override, its settings, and the pool layout's figures for
    the checkpoint at `model_path` (its decoder and cross-attention layers, the share of a slot an image token takes)."""
    from ... import __version__
    from .settings import EXTERNAL_PACKAGE, scored_rows

    method = settings.build()
    info = {
        "model": f"{EXTERNAL_PACKAGE}.model.MllamaForConditionalGeneration",
        "version": __version__,
        "method": method.label() if method is not None else "none",
        "settings": json.loads(settings.to_json()),
        "layout": settings.layout,
        "scoring_rows": scored_rows(method),
    }
    if model_path is not None:
        layout = pool_layout(model_path, packed=settings.layout == "image_pool")
        info["pool"] = {
            "decoder_layers": layout.layers,
            "cross_attention_layers": list(layout.cross_layers),
            "slots_per_image_token": layout.slots_per_image_token,
            "slots_per_text_token": 1,
        }
    return info


def pool_layout(model_path: str, packed: bool):
    """The `layout.PoolLayout` of the Mllama checkpoint at `model_path` (its config only)."""
    from transformers import AutoConfig

    from ...adapters import mllama_facts
    from .layout import PoolLayout

    text = AutoConfig.from_pretrained(model_path).text_config
    return PoolLayout(int(text.num_hidden_layers), tuple(mllama_facts.cross_attention_layers(text)), packed)


def model_path_of(argv: list[str]) -> str | None:
    """SGLang's `--model-path` (or `--model`) among its arguments."""
    import argparse

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model-path", "--model", dest="model_path")
    return parser.parse_known_args(argv)[0].model_path


class ServerInfo:
    """ASGI middleware: adds `info` under `trimllama` to the JSON that `/server_info` answers."""

    def __init__(self, app, info: dict) -> None:
        self.app = app
        self.info = info

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] not in SERVER_INFO_PATHS:
            await self.app(scope, receive, send)
            return
        messages = []

        async def hold(message) -> None:
            messages.append(message)

        await self.app(scope, receive, hold)
        start, body = messages[0], b"".join(message.get("body", b"") for message in messages[1:])
        if start["status"] == 200:
            body = json.dumps({**json.loads(body), "trimllama": self.info}).encode()
            headers = [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"]
            start = {**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        await send(start)
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> None:
    from sglang.srt.entrypoints.http_server import app

    from .settings import EngineSettings

    app.add_middleware(ServerInfo, info=server_info(EngineSettings.from_environment(), model_path_of(argv)))
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
