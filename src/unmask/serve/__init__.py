"""An OpenAI-compatible HTTP server for masked diffusion LMs, with continuous batching and a live view.

    from unmask.serve import ServeConfig, create_app
    app = create_app(model, tokenizer, ServeConfig(model_name="tiny"))

`unmask serve` runs it with `lifecycle.run`, which drains on SIGTERM (see docs/serve.md).
"""

from .app import APIError, ServeConfig, create_app

__all__ = ["APIError", "ServeConfig", "create_app"]
