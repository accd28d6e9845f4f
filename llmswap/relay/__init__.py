"""Relaying: one request to a ready backend, its answer streamed back as it arrives.

- :mod:`~llmswap.relay.forward`: :class:`Relay` (send, copy back, end), :class:`Relayed`,
  :class:`BackendGone`, and what a failure before or after the headers becomes.
- :mod:`~llmswap.relay.pipe`: the protocol that copies a backend's body to the client and
  measures its silence.
- :mod:`~llmswap.relay.body`: the request body producer (bytes in memory, written at once).
- :mod:`~llmswap.relay.agent`: the Agent for backends, with each origin's endpoint built once.
- :mod:`~llmswap.relay.usage`: token counts and speed read from the last bytes of an answer.
"""
