"""A model's request filters: ``use_model_name``, ``strip_params``, ``set_params``.

Bodies reach the backend as the bytes the client sent unless one of these applies to the model;
then only the JSON object is rewritten: its keys keep their order, a forced field not present is
added at the end, and nothing else changes.
"""

from __future__ import annotations

import json
from typing import Any

from llmswap.config.model import ModelConfig


def apply(data: dict[str, Any], model: ModelConfig) -> dict[str, Any]:
    """``data`` (a request's JSON object) filtered for ``model``'s backend, in place."""
    for key in model.strip_params:
        data.pop(key, None)
    data.update(model.set_params)
    if model.use_model_name:
        data["model"] = model.use_model_name
    return data


def body_for(body: bytes, model: ModelConfig) -> bytes:
    """The request body as ``model``'s backend gets it (the same bytes when nothing applies)."""
    if not model.rewrites:
        return body
    data = json.loads(body)  # parsed and checked once already: a JSON object
    return json.dumps(apply(data, model), ensure_ascii=False).encode()
