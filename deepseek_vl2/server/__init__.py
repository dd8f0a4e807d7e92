"""An OpenAI-compatible server (``/v1/chat/completions``, ``/v1/models``) and a batch runner for the
OpenAI batch file format, so that clients and request files move unchanged to vLLM when one machine
is not enough. ``deepseek-vl2 serve`` and ``deepseek-vl2 batch`` run them.

FastAPI, uvicorn and pydantic come with the ``serve`` extra; importing this package imports none of them.
"""
