"""Swapping: which model backends run, one model's life, and the queue of waiting requests.

- :mod:`~llmswap.swap.state`: the legal transitions between a model's states.
- :mod:`~llmswap.swap.queue`: tickets, the waiting room, leases and the one expiry timer.
- :mod:`~llmswap.swap.slot`: one model's backend life (start, healthy, drain, stop, crash).
- :mod:`~llmswap.swap.readiness`: health polling.
- :mod:`~llmswap.swap.reconcile`: adopting or stopping what an earlier daemon left running.
- :mod:`~llmswap.swap.manager`: intake, the policy's decisions, the swap lock, reload.
- :mod:`~llmswap.swap.snapshot`: the typed picture of it all that /health and metrics read.
"""
