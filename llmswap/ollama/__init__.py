"""Ollama's HTTP API on llmswap's port, translated to and from the OpenAI-compatible backends.

- :mod:`~llmswap.ollama.translate`: requests and answers, field by field (pure functions).
- :mod:`~llmswap.ollama.stream`: writes a backend's answer to the client as Ollama's NDJSON
  (or one JSON object), chunk by chunk as it arrives.
- :mod:`~llmswap.ollama.routes`: the ``/api/...`` routes; chat, generate and embed go through
  the same request path (keys, limits, queue, scheduler, metrics) as the OpenAI routes.
"""
