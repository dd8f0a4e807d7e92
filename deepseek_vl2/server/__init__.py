"""An OpenAI-compatible server (``/v1/chat/completions``, ``/v1/models``) and a batch runner for the
OpenAI batch file format, so that clients and request files move unchanged to vLLM when one machine
is not enough.

FastAPI and uvicorn come with the ``serve`` extra; importing this package does not import them.
"""

from .batch import add_batch_arguments, batch_main, run_batch
from .serve import add_serve_arguments, serve_main

__all__ = ["add_batch_arguments", "add_serve_arguments", "batch_main", "run_batch", "serve_main"]
