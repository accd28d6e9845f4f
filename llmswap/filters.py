"""A model's request filters: ``use_model_name``, ``strip_params``, ``set_params``, and an alias's
own preset of the last two (a variant: ``qwen-think`` and ``qwen-fast``, one backend).

Bodies reach the backend as the bytes the client sent unless one of these applies to the model;
then only the JSON object is rewritten: its keys keep their order, a forced field not present is
added at the end, and nothing else changes.  The model's filters run first, then the preset's,
so a variant overrides its model's defaults.
"""

from __future__ import annotations

import json
from typing import Any

from llmswap.config.model import ModelConfig, Preset


def apply(data: dict[str, Any], model: ModelConfig, preset: Preset | None = None) -> dict[str, Any]:
    """``data`` (a request's JSON object) filtered for ``model``'s backend, in place."""
    for params in (model, preset) if preset is not None else (model,):
        for key in params.strip_params:
            data.pop(key, None)
        data.update(params.set_params)
    if model.use_model_name:
        data["model"] = model.use_model_name
    return data


def body_for(body: bytes, model: ModelConfig, preset: Preset | None = None) -> bytes:
    """The request body as ``model``'s backend gets it (the same bytes when nothing applies)."""
    if preset is None and not model.rewrites:
        return body
    data = json.loads(body)  # parsed and checked once already: a JSON object
    return json.dumps(apply(data, model, preset), ensure_ascii=False).encode()
