"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) on the same path.

llama-server answers it natively, so the body is relayed as received and the answer (its SSE
events are named, unlike OpenAI's) streamed back byte for byte; only llmswap's own errors are
written in Anthropic's shape, which its clients raise.  Anthropic clients send their key as
``x-api-key``, which the gate accepts as it accepts a bearer token.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest

from llmswap import errors
from llmswap.proxy import Proxy
from llmswap.relay.ending import ANTHROPIC


class AnthropicProxy(Proxy[None]):
    ending = ANTHROPIC

    def render_error(self, request: IRequest, err: errors.APIError) -> bytes:
        return errors.render_anthropic(request, err)
