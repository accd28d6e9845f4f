"""Makes ``twistd llmswap`` available; the work lives in :mod:`llmswap.tap`."""

from twisted.application.service import ServiceMaker

llmswap = ServiceMaker(
    "llmswap",
    "llmswap.tap",
    "OpenAI-compatible proxy that swaps local LLM backends on one GPU",
    "llmswap",
)
