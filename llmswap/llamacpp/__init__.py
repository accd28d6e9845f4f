"""llama.cpp's router API on llmswap's port: the management calls of ``llama-server
--models-dir`` (``GET /models``, ``POST /models/load``/``unload``, ``GET /models/sse``,
``GET /props?model=``), so the clients written for llama.cpp's router (pi, LlamaBarn, Open
WebUI's llama.cpp connection, "unload all" scripts) can point at llmswap and get its queue,
budget and scheduling."""
