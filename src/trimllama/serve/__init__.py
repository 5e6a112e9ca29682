"""`trimllama serve`: an OpenAI-style HTTP server for (trimmed) Llama-3.2-Vision with dynamic batching.

    from trimllama.serve import ServeConfig, create_app
    app = create_app(model, processor, ServeConfig(model_name="llama-vision", method=HeadwiseTopK(0.25)))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Needs the `serve` extra (fastapi, uvicorn, prometheus-client).
"""

from .app import create_app
from .config import ImageLimits, ServeConfig

__all__ = ["ImageLimits", "ServeConfig", "create_app"]
