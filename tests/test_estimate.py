"""``memory: auto``: a llama-server model's footprint from its GGUF header and its command.

The GGUFs here are written by llama.cpp's own ``gguf`` writer, so the header reader is checked
against the format's reference implementation; the real model's figures are compared with what
llama-server reports in tests/test_llama.py.
"""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import numpy as np
import pytest
from twisted.internet.task import Clock

from llmswap.__main__ import main
from llmswap.config.config import parse
from llmswap.config.estimate import MARGIN, estimate
from llmswap.config.values import ConfigError
from llmswap.health import document
from llmswap.swap.manager import SwapManager
from llmswap.testing import MemoryBackend, MemoryHTTP

MiB = 2**20
LAYERS, EMBD, HEADS, HEADS_KV, HEAD, FF, VOCAB = 4, 256, 4, 2, 64, 512, 1000


def write_gguf(path: Path, arch: str = "llama", window: int = 0) -> int:
    """A small model: ``LAYERS`` blocks of f16 and q8_0 tensors; returns its tensors' bytes."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(8192)
    writer.add_embedding_length(EMBD)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS_KV)
    writer.add_key_length(HEAD)
    writer.add_value_length(HEAD)
    if window:
        writer.add_sliding_window(window)
    writer.add_token_list([f"t{i}".encode() for i in range(VOCAB)])
    writer.add_token_scores([0.0] * VOCAB)
    total = 0
    for layer in range(LAYERS):
        weights = np.zeros((FF, EMBD), dtype=np.float16)
        writer.add_tensor(f"blk.{layer}.ffn_up.weight", weights)
        total += weights.nbytes
        quantized = gguf.quantize(np.zeros((EMBD, EMBD), dtype=np.float32),
                                  gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        writer.add_tensor(f"blk.{layer}.attn_q.weight", quantized,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        total += EMBD * EMBD // 32 * 34
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return total


def test_weights_are_every_tensors_bytes_by_type_and_the_kv_cache_follows_the_command(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.gguf"
    weights = write_gguf(model)
    e = estimate(["llama-server", "-m", str(model), "-c", "4096"])
    assert e.weights == weights
    # 4096 cells x 4 layers x 2 KV heads x (64 + 64) x 2 bytes (f16)
    assert e.kv == 4096 * LAYERS * HEADS_KV * (HEAD + HEAD) * 2
    assert e.margin == MARGIN
    assert e.total == e.weights + e.kv + e.buffers + e.margin
    # q8_0 keys and values: 34 bytes per 32 values; no -c: the trained context (8192).
    q8 = estimate(["llama-server", "--model", str(model), "-ctk", "q8_0", "--cache-type-v=q8_0"])
    assert q8.kv == 8192 * LAYERS * HEADS_KV * (HEAD + HEAD) * 34 // 32
    # Embeddings keep an output per token of a micro-batch: larger buffers.
    embed = estimate(["llama-server", "-m", str(model), "-c", "4096", "--embeddings"])
    assert embed.buffers > e.buffers


def test_sliding_window_layers_hold_the_window_per_sequence_unless_swa_full(tmp_path: Path) -> None:
    model = tmp_path / "g.gguf"
    write_gguf(model, arch="gemma3", window=512)
    cmd = ["llama-server", "-m", str(model), "-c", "8192"]
    per_cell = HEADS_KV * (HEAD + HEAD) * 2
    # gemma3: every sixth layer is full; of 4 layers none is, so all hold 512 x 4 seqs + 512.
    assert estimate(cmd).kv == LAYERS * (512 * 4 + 512) * per_cell
    assert estimate([*cmd, "-np", "1"]).kv == LAYERS * (512 + 512) * per_cell
    assert estimate([*cmd, "--swa-full"]).kv == LAYERS * 8192 * per_cell


def test_memory_auto_is_the_estimate_and_health_shows_it_apart_from_declared(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.gguf"
    write_gguf(model)
    config = parse({
        "devices": {"gpu": {"memory": "1GiB"}},
        "models": {
            "auto": {"cmd": f"llama-server -m {model} -c 2048 --port ${{PORT}}", "memory": "auto"},
            "said": {"cmd": f"llama-server -m {model} --port ${{PORT}}", "memory": "512MiB"},
            "other": {"cmd": "vllm serve x --port ${PORT}", "memory": "512MiB"},
        },
    })  # fmt: skip
    auto, said, other = (config.models[n] for n in ("auto", "said", "other"))
    expected = estimate(["llama-server", "-m", str(model), "-c", "2048"]).total
    assert (auto.memory, auto.estimated, auto.memory_auto) == (expected, expected, True)
    assert (said.memory, said.memory_auto) == (512 * MiB, False)
    assert said.estimated is not None and said.estimated > expected  # its context is 8192
    assert other.estimated is None
    backends = {n: MemoryBackend(n, []) for n in config.models}
    manager = SwapManager(config, backends, MemoryHTTP(backends), Clock())
    shown = document(manager.snapshot())["models"]
    assert shown["auto"]["memory"] == {"declared": None, "measured": None, "estimated": expected}
    assert shown["said"]["memory"]["declared"] == 512 * MiB
    assert shown["other"]["memory"]["estimated"] is None


@pytest.mark.parametrize(
    ("model", "said"),
    [
        ({"container_name": "c", "backend_url": "http://127.0.0.1:1/v1"},
         "'models.m.memory: auto' estimates a llama-server 'cmd' from its GGUF"),
        ({"cmd": "llama-server --port ${PORT}"},
         "'models.m': 'memory: auto' needs a llama-server 'cmd' naming its GGUF with -m"),
        ({"cmd": "llama-server -m /nowhere/m.gguf --port ${PORT}"},
         "'models.m': 'memory: auto': the model file '/nowhere/m.gguf' does not exist"),
        ({"cmd": "llama-server -m {bad} --port ${PORT}"},
         "'models.m': 'memory: auto': cannot read '{bad}' as a GGUF: not a GGUF file"),
        ({"cmd": "llama-server -m {good} -ctk q3 --port ${PORT}"},
         "'models.m': 'memory: auto': unknown KV cache type 'q3'"),
    ],
)  # fmt: skip
def test_memory_auto_says_why_it_cannot_estimate(
    tmp_path: Path, model: dict[str, str], said: str
) -> None:
    bad, good = tmp_path / "bad.gguf", tmp_path / "good.gguf"
    bad.write_bytes(b"not a model" * 10)
    write_gguf(good)
    fill = {k: v.replace("{bad}", str(bad)).replace("{good}", str(good)) for k, v in model.items()}
    with pytest.raises(ConfigError) as raised:
        parse({"devices": {"gpu": {"memory": "1GiB"}}, "models": {"m": {**fill, "memory": "auto"}}})
    assert said.replace("{bad}", str(bad)) in str(raised.value)


def test_check_config_shows_the_estimate_beside_the_declared_figure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "m.gguf"
    write_gguf(model)
    path = tmp_path / "llmswap.yaml"
    path.write_text(
        "devices: {gpu: {memory: 1GiB}}\n"
        "models:\n"
        f"  auto: {{cmd: 'llama-server -m {model} -c 2048 --port ${{PORT}}', memory: auto}}\n"
        f"  said: {{cmd: 'llama-server -m {model} -c 2048 --port ${{PORT}}', memory: 512MiB}}\n"
    )
    expected = estimate(["llama-server", "-m", str(model), "-c", "2048"]).total // MiB
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"    memory on gpu (memory: auto): estimated from its GGUF {expected} MiB\n" in out
    assert f"    memory on gpu: declared 512 MiB, estimated from its GGUF {expected} MiB\n" in out


def _le(n: int) -> bytes:
    return n.to_bytes(8, "little")


@pytest.mark.parametrize(
    ("at", "data", "said"),
    [
        (40, b"", "runs past the end of the file"),  # cut short there
        (8, _le(2**40), "a count of 1099511627776"),  # tensors
        (16, _le(2**63), "a count of 9223372036854775808"),  # metadata
        (24, _le(2**62), "a string of 4611686018427387904 bytes"),  # the first key's
        (4, (3).to_bytes(4, "big"), "a big-endian GGUF"),
        (4, (1).to_bytes(4, "little"), "a GGUF of version 1"),
    ],
)
def test_a_damaged_header_is_a_configuration_error_never_a_crash(
    tmp_path: Path, at: int, data: bytes, said: str
) -> None:
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    write_gguf(good)
    raw = good.read_bytes()
    bad.write_bytes(raw[:at] + data + raw[at + len(data) :] if data else raw[:at])
    with pytest.raises(ConfigError, match=f"cannot read '{bad}' as a GGUF: .*{said}"):
        estimate(["llama-server", "-m", str(bad)])


def test_figures_of_the_wrong_kind_or_size_are_a_configuration_error(tmp_path: Path) -> None:
    for key, add in [
        ("llama.block_count", lambda w: w.add_uint64("llama.block_count", 2**40)),
        ("llama.context_length", lambda w: w.add_string("llama.context_length", "long")),
        ("negative", lambda w: w.add_int32("llama.context_length", -4096)),
    ]:
        path = tmp_path / f"{key}.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        add(writer)
        writer.add_embedding_length(EMBD)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.close()
        with pytest.raises(ConfigError, match=r"cannot read .* as a GGUF"):
            estimate(["llama-server", "-m", str(path)])


def test_no_flipped_byte_in_a_header_escapes_as_anything_but_a_configuration_error(
    tmp_path: Path,
) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(good)
    raw, header = good.read_bytes(), 8 * 1024  # the metadata and tensor infos
    rng = random.Random(27)
    refused = 0
    for i in range(300):
        damaged = bytearray(raw)
        for _ in range(3):
            damaged[rng.randrange(min(header, len(raw)))] = rng.randrange(256)
        path = tmp_path / f"{i}.gguf"
        path.write_bytes(bytes(damaged))
        try:
            estimate(["llama-server", "-m", str(path)])
        except ConfigError:
            refused += 1
        path.unlink()
    assert refused > 0  # the damage was seen at all


def test_llama_servers_settings_from_its_environment_count_and_its_flags_win(
    tmp_path: Path,
) -> None:
    model = tmp_path / "m.gguf"
    write_gguf(model)
    flags = estimate(["llama-server", "-m", str(model), "-c", "2048", "-ctk", "q8_0"])
    env = {"LLAMA_ARG_MODEL": str(model), "LLAMA_ARG_CTX_SIZE": "2048",
           "LLAMA_ARG_CACHE_TYPE_K": "q8_0"}  # fmt: skip
    assert estimate(["llama-server"], env) == flags
    assert estimate(["llama-server", "-c", "2048"], {**env, "LLAMA_ARG_CTX_SIZE": "8192"}) == flags
    model_config = {"cmd": "llama-server --port ${PORT}", "env": env, "memory": "auto"}
    config = parse({"devices": {"gpu": {"memory": "1GiB"}}, "models": {"m": model_config}})
    assert config.instances["m"].memory == flags.total
