"""`trimllama serve`: an OpenAI-style HTTP server for (trimmed) Llama-3.2-Vision with dynamic batching.

    from trimllama.serve import ServeConfig, create_app
    app = create_app(model, processor, ServeConfig(model_name="llama-vision", method=HeadwiseTopK(0.25)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the `serve` extra (fastapi, uvicorn, prometheus-client) for `create_app`; the settings (`ServeConfig`)
import without it, so the command line can show their defaults.
"""

from .config import ImageLimits, ServeConfig

__all__ = ["ImageLimits", "ServeConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
