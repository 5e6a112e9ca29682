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


def server_info(settings) -> dict:
    """What `/server_info` reports under `trimllama`."""
    from ... import __version__
    from .settings import EXTERNAL_PACKAGE, scored_rows

    method = settings.build()
    return {
        "model": f"{EXTERNAL_PACKAGE}.model.MllamaForConditionalGeneration",
        "version": __version__,
        "method": method.label() if method is not None else "none",
        "settings": json.loads(settings.to_json()),
        "layout": settings.layout,
        "scoring_rows": scored_rows(method),
    }


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

    app.add_middleware(ServerInfo, info=server_info(EngineSettings.from_environment()))
    sys.argv = ["sglang.launch_server", *argv]
    runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
