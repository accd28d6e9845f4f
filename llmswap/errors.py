"""OpenAI-shaped errors.

Every failure a client can see is an :class:`APIError`; the resource tree renders it as
``{"error": {"message", "type", "code"}}`` with its HTTP status, so the ``openai`` SDK raises the
matching exception class and shows the message instead of a traceback or a hang.
"""

from __future__ import annotations

import json

import attrs


@attrs.define(eq=False)
class APIError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    headers: dict[str, str] = attrs.field(factory=dict)
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def body(self) -> bytes:
        return json.dumps(
            {
                "error": {
                    "message": self.message,
                    "type": self.type,
                    "param": self.param,
                    "code": self.code,
                }
            }
        ).encode()


def bad_request(message: str, code: str = "invalid_request", param: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param=param)


def model_not_found(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist. Available models: {', '.join(sorted(known))}",
        "invalid_request_error",
        "model_not_found",
        param="model",
    )


def queue_full(capacity: int, retry_after: int = 5) -> APIError:
    return APIError(
        503,
        f"Queue full ({capacity} requests). Try again later.",
        "server_error",
        "queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def backend_unavailable(message: str, retry_after: int = 5) -> APIError:
    return APIError(
        503,
        message,
        "server_error",
        "backend_unavailable",
        headers={"Retry-After": str(retry_after)},
    )


def startup_timeout(model: str, timeout: float) -> APIError:
    return APIError(
        504,
        f"Model '{model}' did not become ready within its startup_timeout of {timeout:g} s",
        "server_error",
        "model_startup_timeout",
    )


def backend_error(message: str) -> APIError:
    return APIError(502, message, "server_error", "backend_unreachable")


def gateway_timeout(message: str, code: str = "timeout") -> APIError:
    return APIError(504, message, "server_error", code)


def shutting_down() -> APIError:
    return backend_unavailable("llmswap is shutting down; retry against the restarted daemon")
