"""llmswap: an OpenAI-compatible proxy that swaps local LLM backends on one GPU."""

__version__ = "0.1.0"
