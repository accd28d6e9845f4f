"""Swapping: which model instances run on each host, and the requests waiting for them.

- :mod:`~llmswap.swap.policy`: the pure decision (admit, load, unload) from a snapshot.
- :mod:`~llmswap.swap.state`: the legal transitions between an instance's states.
- :mod:`~llmswap.swap.queue`: tickets, the waiting room, leases and the one expiry timer.
- :mod:`~llmswap.swap.lane`: one host's changes, one at a time (its swap lock).
- :mod:`~llmswap.swap.slot`: one instance's backend life (start, healthy, drain, stop, crash).
- :mod:`~llmswap.swap.readiness`: health polling.
- :mod:`~llmswap.swap.eviction`: putting away what a load evicts (stop, or sleep), confirmed.
- :mod:`~llmswap.swap.sleep`: a backend's sleep mode (vLLM's, SGLang's): release and wake.
- :mod:`~llmswap.swap.prefetch`: reading the next model's weights ahead into the page cache.
- :mod:`~llmswap.swap.reconcile`: adopting or stopping what an earlier daemon left running.
- :mod:`~llmswap.swap.manager`: intake, the policy's decisions carried out in each host's lane,
  reload.
- :mod:`~llmswap.swap.snapshot`: the typed picture of it all that /health and metrics read.
"""
