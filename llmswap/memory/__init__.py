"""Memory truth: what a device really has free, and what each model really takes.

Declared figures (``memory:`` per model, ``devices:`` budgets) are what users guess; a device with
a ``probe`` is measured instead.

- :mod:`~llmswap.memory.probe`: :class:`IDeviceProbe`, one device's total, used and free bytes,
  and what a process tree holds on it.
- :mod:`~llmswap.memory.procs`: this machine's process trees, names and PSS, from ``/proc``.
- :mod:`~llmswap.memory.ram`: host memory (``/proc/meminfo``, a process tree's PSS).
- :mod:`~llmswap.memory.nvml`: an NVIDIA GPU through NVML (memory, processes, utilisation).
- :mod:`~llmswap.memory.oom`: out-of-memory wording of every backend, in one place.
- :mod:`~llmswap.memory.footprints`: each model's measured peak, kept across restarts.
- :mod:`~llmswap.memory.witness`: the service that measures loaded models, and the wait before a
  start until the device really has room.
"""
