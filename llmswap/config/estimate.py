"""What a llama-server model will hold on its device, estimated from its GGUF: ``memory: auto``.

The sum of what llama-server itself allocates (its ``buffer size`` log lines), each part from the
GGUF's header and the command's flags:

- **weights**: every tensor's bytes by its type (``-m``'s file, all parts of a split one);
- **KV cache**: per layer, cells x KV heads x (key + value head size) x the cache type's bytes
  (``-ctk``/``-ctv``, f16 by default).  A full-attention layer has ``-c`` cells (the model's
  trained context when ``-c`` is 0 or absent); a sliding-window layer only the window for each of
  ``-np`` sequences plus one micro-batch (``--swa-full`` gives it ``-c``);
- **output and compute buffers**: the logits of the outputs a batch reserves (one per sequence;
  every token of a micro-batch with ``--embeddings``/``--rerank``), the attention mask, and a
  micro-batch's activations;
- a stated **margin** (:data:`MARGIN`): the server's own code and heap.

For a transformer model fully on its device.  A partial offload (``-ngl``), a recurrent model's
state or a multimodal projector are not counted: the measured figure corrects them after the
first load (the budget counts the larger).

The header is read here rather than with ``gguf.GGUFReader``, which turns every vocabulary
string into an array (13 s for a 262,144-token vocabulary); llama.cpp's own ``gguf`` package
still gives the format's types, keys and each tensor type's block size.  Blocking: a reload
reads the configuration in a thread.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import IO, Any

import attrs

from llmswap.config.values import ConfigError
from llmswap.config.weights import expand, from_cmd

MiB = 2**20
MARGIN = 32 * MiB
UBATCH = 512  # llama-server's default -ub
PARALLEL = 4  # its default -np (auto): four slots
MAX_LAYERS = 4096  # the largest models have a few hundred: more is a damaged header
# Which layers use a sliding window, for architectures whose GGUF does not say
# (``attention.sliding_window_pattern``): every n-th layer is a full-attention one.
FULL_EVERY = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}
_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@attrs.frozen
class Estimate:
    """A model's parts, in bytes."""

    weights: int
    kv: int
    buffers: int  # output and compute
    margin: int = MARGIN

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.buffers + self.margin


def estimate(cmd: Sequence[str], env: Mapping[str, str] | None = None) -> Estimate:
    """The estimate for a llama-server ``cmd`` run with ``env`` (its ``LLAMA_ARG_*``
    settings); a ConfigError says why there is none."""
    cmd = _with_env(cmd, env or {})
    try:
        import gguf
    except ImportError:
        raise ConfigError(
            "'memory: auto' reads the model's GGUF with llama.cpp's gguf package: "
            "pip install 'llmswap[gguf]'"
        ) from None
    paths = from_cmd(cmd)
    if not paths:
        raise ConfigError("'memory: auto' needs a llama-server 'cmd' naming its GGUF with -m")
    files = expand(paths[-1])  # the last one given wins, as in llama-server
    if not files:
        raise ConfigError(f"'memory: auto': the model file {paths[-1]!r} does not exist")
    flags = _Flags.of(cmd)
    try:
        meta, weights = _read(gguf, files[0])
        for part in files[1:]:
            weights += _read(gguf, part)[1]
        return _sized(meta, weights, flags)
    except (OSError, ValueError, TypeError, KeyError, OverflowError, struct.error) as e:
        # ValueError and TypeError too from figures of the wrong kind (a string for a count)
        raise ConfigError(f"'memory: auto': cannot read {files[0]!r} as a GGUF: {e}") from None


def try_estimate(
    model_cmd: Sequence[str] | None, env: Mapping[str, str] | None = None
) -> int | None:
    """The estimate of a llama-server command, or None (not one, or its GGUF is unreadable):
    shown beside a declared figure, never in the way."""
    if not model_cmd or "llama-server" not in os.path.basename(model_cmd[0]):
        return None
    try:
        return estimate(model_cmd, env).total
    except ConfigError:
        return None


# -- the command ---------------------------------------------------------------------------

# llama-server's settings from its environment (common/arg.cpp's set_env), as the flags they
# stand for; a flag on the command line wins, as it does there.
_ENV = {"LLAMA_ARG_MODEL": "-m", "LLAMA_ARG_CTX_SIZE": "-c", "LLAMA_ARG_CACHE_TYPE_K": "-ctk",
        "LLAMA_ARG_CACHE_TYPE_V": "-ctv", "LLAMA_ARG_N_PARALLEL": "-np",
        "LLAMA_ARG_UBATCH": "-ub"}  # fmt: skip
_ENV_SWITCHES = {"LLAMA_ARG_EMBEDDINGS": "--embeddings", "LLAMA_ARG_RERANKING": "--rerank",
                 "LLAMA_ARG_SWA_FULL": "--swa-full"}  # fmt: skip
_TRUE = ("1", "true", "on", "enabled")


def _with_env(cmd: Sequence[str], env: Mapping[str, str]) -> list[str]:
    given = [a for k, flag in _ENV.items() if k in env for a in (flag, env[k])]
    given += [flag for k, flag in _ENV_SWITCHES.items() if env.get(k, "").lower() in _TRUE]
    return [*cmd[:1], *given, *cmd[1:]]


@attrs.frozen
class _Flags:
    ctx: int  # 0: the model's trained context
    cache_k: str
    cache_v: str
    parallel: int
    ubatch: int
    all_outputs: bool  # embeddings or reranking: every token of a batch is an output
    swa_full: bool

    @classmethod
    def of(cls, cmd: Sequence[str]) -> _Flags:
        value: dict[str, str] = {}
        aliases = {"-c": "--ctx-size", "-ctk": "--cache-type-k", "-ctv": "--cache-type-v",
                   "-np": "--parallel", "-ub": "--ubatch-size"}  # fmt: skip
        for i, arg in enumerate(cmd):
            flag, eq, inline = arg.partition("=")
            flag = aliases.get(flag, flag)
            if flag in aliases.values():
                given = inline if eq else (cmd[i + 1] if i + 1 < len(cmd) else "")
                value[flag] = given
        flags = set(cmd)
        parallel = _int(value.get("--parallel"), PARALLEL)
        return cls(
            ctx=_int(value.get("--ctx-size"), 0),
            cache_k=_cache(value.get("--cache-type-k", "f16")),
            cache_v=_cache(value.get("--cache-type-v", "f16")),
            parallel=parallel if parallel > 0 else PARALLEL,
            ubatch=_int(value.get("--ubatch-size"), UBATCH),
            all_outputs=bool(flags & {"--embedding", "--embeddings", "--rerank", "--reranking"}),
            swa_full="--swa-full" in flags,
        )


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        raise ConfigError(f"'memory: auto': {text!r} is not a number in the command") from None


def _cache(kind: str) -> str:
    if kind.lower() not in _CACHE_TYPES:
        raise ConfigError(
            f"'memory: auto': unknown KV cache type {kind!r} (known: {', '.join(_CACHE_TYPES)})"
        )
    return kind.lower()


# -- the sizes -----------------------------------------------------------------------------


def _sized(meta: dict[str, Any], weights: int, flags: _Flags) -> Estimate:
    import gguf

    arch = str(meta.get("general.architecture", ""))

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    layers = int(key("block_count", 0))
    if not 0 <= layers <= MAX_LAYERS:
        raise ValueError(f"{layers} layers")
    embd = int(key("embedding_length", 0))
    heads = _per_layer(key("attention.head_count", 0), layers)
    heads_kv = _per_layer(key("attention.head_count_kv", heads), layers)
    head = embd // max(1, max(heads, default=1))
    head_k, head_v = (
        int(key("attention.key_length", head)),
        int(key("attention.value_length", head)),
    )
    ctx = flags.ctx or int(key("context_length", 4096))
    window = int(key("attention.sliding_window", 0))
    sliding = _sliding_layers(meta, arch, layers, window)
    window_cells = min(ctx, window * flags.parallel + flags.ubatch)

    def per_value(kind: str) -> float:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind.upper()]]
        return size / block

    kv = 0.0
    for layer in range(layers):
        cells = window_cells if layer in sliding and not flags.swa_full else ctx
        kv += cells * heads_kv[layer] * (head_k * per_value(flags.cache_k)
                                         + head_v * per_value(flags.cache_v))  # fmt: skip
    tokens = meta.get("tokenizer.ggml.tokens", key("vocab_size", 0))
    vocab = len(tokens) if isinstance(tokens, list) else int(tokens)  # short ones are read
    outputs = flags.ubatch if flags.all_outputs else flags.parallel
    ff = max(_per_layer(key("feed_forward_length", 0), max(layers, 1)), default=0)
    logits = 4 * vocab * (outputs + flags.parallel)  # the compute graph's and the output buffer's
    mask = 2 * flags.ubatch * (ctx + (window_cells if sliding else 0))
    activations = 4 * flags.ubatch * (2 * ff + 4 * embd)
    parts = Estimate(weights, math.ceil(kv), logits + mask + activations)
    if ctx <= 0 or min(parts.weights, parts.kv, parts.buffers) < 0:
        raise ValueError("negative figures in its header")
    return parts


def _per_layer(value: Any, layers: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value] + [0] * (layers - len(value))
    return [int(value)] * layers


def _sliding_layers(meta: dict[str, Any], arch: str, layers: int, window: int) -> set[int]:
    if not window:
        return set()
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, list):
        return {i for i, swa in enumerate(pattern) if swa}
    every = FULL_EVERY.get(arch)
    if every is None:
        return set()  # not known: every layer counted whole (more, never less)
    return {i for i in range(layers) if (i + 1) % every}


# -- the header ------------------------------------------------------------------------------


def _read(gguf: Any, path: str) -> tuple[dict[str, Any], int]:
    """A GGUF file's metadata (arrays of strings as their length) and its tensors' bytes.

    Every length is checked against what is left of the file before it is believed: a damaged
    or hostile header is a ValueError, never a huge allocation or a loop without end."""
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Header(f, os.fstat(f.fileno()).st_size)
        magic, version = r.unpack("<II")
        if magic != gguf.GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        if version & 0xFFFF == 0:
            raise ValueError("a big-endian GGUF: llama-server on this machine cannot load it")
        if version < 2:
            raise ValueError("a GGUF of version 1: convert it again with llama.cpp")
        tensors, count = r.unpack("<QQ")
        meta = {}
        for _ in range(r.at_most(count, 13)):  # a key's length, a byte of it, a type
            name = r.string()
            meta[name] = r.value(r.unpack("<I")[0])
        weights = 0
        for _ in range(r.at_most(tensors, 24)):  # a name's length, dims, a type, an offset
            r.string()
            (dims,) = r.unpack("<I")
            if dims > MAX_DIMS:
                raise ValueError(f"a tensor of {dims} dimensions")
            shape = r.unpack(f"<{dims}Q")
            kind, _offset = r.unpack("<IQ")
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            weights += math.prod(shape) // block * size
    return meta, weights


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
LONG = 4096  # arrays longer than this are per token, not per layer: only their length is kept
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_STRING = 16 * MiB  # a chat template is some KiB; more is damage
MAX_NESTING = 2  # arrays of arrays: none in llama.cpp's models; deeper is damage


class _Header:
    """Reads a GGUF header, refusing any length that runs past the end of the file."""

    def __init__(self, f: IO[bytes], size: int) -> None:
        self._f = f
        self._size = size

    def _left(self) -> int:
        return self._size - self._f.tell()

    def at_most(self, n: int, each: int) -> int:
        """``n`` items of at least ``each`` bytes, if the file holds that many."""
        if n * each > self._left():
            raise ValueError(f"a count of {n} runs past the end of the file")
        return n

    def _within(self, n: int) -> int:
        if n > self._left():
            raise ValueError(f"a length of {n} runs past the end of the file")
        return n

    def take(self, n: int) -> bytes:
        return self._f.read(self._within(n))

    def skip(self, n: int) -> None:
        self._f.seek(self._within(n), os.SEEK_CUR)

    def unpack(self, form: str) -> tuple[Any, ...]:
        return struct.unpack(form, self.take(struct.calcsize(form)))

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        if n > MAX_STRING:
            raise ValueError(f"a string of {n} bytes")
        return self.take(n).decode("utf-8", "replace")

    def value(self, kind: int, depth: int = 0) -> Any:
        """A metadata value; a long array (a vocabulary's strings, scores or types) as its
        length."""
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_NESTING:
                raise ValueError("arrays nested too deep")
            item, n = self.unpack("<IQ")
            if item == _STRING and n > LONG:
                for _ in range(self.at_most(n, 8)):
                    self.skip(self.unpack("<Q")[0])
                return n
            if item in _SCALAR:
                width = struct.calcsize(_SCALAR[item])
                self.at_most(n, width)
                if n > LONG:
                    self.skip(n * width)
                    return n
                return list(self.unpack(f"<{n}{_SCALAR[item][1]}"))
            return [self.value(item, depth + 1) for _ in range(self.at_most(n, 1))]
        if kind not in _SCALAR:
            raise ValueError(f"unknown metadata type {kind}")
        return self.unpack(_SCALAR[kind])[0]
