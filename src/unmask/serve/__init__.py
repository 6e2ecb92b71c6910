"""An OpenAI-compatible HTTP server for masked diffusion LMs, with continuous batching and a live view.

    from unmask.serve import ServeConfig, create_app
    app = create_app(model, tokenizer, ServeConfig(model_name="tiny"))

`unmask serve` runs it with `lifecycle.run`, which drains on SIGTERM (see docs/serve.md).
"""

__all__ = ["APIError", "ServeConfig", "create_app"]


def __getattr__(name: str):
    """The app (and with it FastAPI) is imported on first use, so the batching layer
    (`unmask.serve.batching`: rows, fixed CUDA-graph shapes) loads where no web stack is installed,
    e.g. on a GPU machine that only runs the graph checks."""
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
