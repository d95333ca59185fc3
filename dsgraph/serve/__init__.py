"""Serving: the continuous-batching engine over a paged KV cache (engine.py, paged.py), its lockstep form for a
model sharded over torchrun's ranks (lockstep.py) and the OpenAI-compatible HTTP server on it (http.py, needs the
`serve` extra: fastapi, uvicorn, prometheus-client)."""
