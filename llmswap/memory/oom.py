"""Out of memory, as backends say it: the wording of CUDA, ROCm/HIP, Metal, Vulkan and host
allocation failures, in one place.

Read in the last lines a backend printed before it died while loading; a match means the load
might succeed once the other models on its device are gone.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_SAID = re.compile(
    "|".join(
        (
            r"CUDA error: out of memory",  # llama.cpp's ggml-cuda
            r"cudaMalloc failed: out of memory",
            r"CUDA out of memory",  # PyTorch (vLLM, SGLang)
            r"hipErrorOutOfMemory|HIP error: out of memory",  # ROCm
            r"kIOGPUCommandBufferCallbackErrorOutOfMemory",  # Metal
            r"ErrorOutOfDeviceMemory",  # Vulkan
            r"failed to allocate \S+ buffer of size",  # ggml's backends
            r"std::bad_alloc|Cannot allocate memory|MemoryError",  # host allocation
        )
    ),
    re.IGNORECASE,
)


def ran_out(output: Iterable[str]) -> bool:
    """Whether a backend's last output lines say it ran out of memory."""
    return any(_SAID.search(line) for line in output)
