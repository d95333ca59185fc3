"""Serving: the continuous-batching engine over a paged KV cache (engine.py, paged.py) and the OpenAI-compatible
HTTP server on it (http.py, needs the `serve` extra: fastapi, uvicorn, prometheus-client)."""
