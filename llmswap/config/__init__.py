"""Configuration: ``llmswap.yaml`` in, immutable attrs classes out; nothing here runs anything.

- :mod:`~llmswap.config.schema`: how a setting is declared and read (typos named).
- :mod:`~llmswap.config.settings`: every setting, declared once (type, default, unit, help).
- :mod:`~llmswap.config.values`: how each kind of value is checked and converted.
- :mod:`~llmswap.config.macros`: llama-swap's ``macros`` and ``${PORT}`` expansion.
- :mod:`~llmswap.config.model`: one model's settings (:class:`ModelConfig`).
- :mod:`~llmswap.config.host`: Docker hosts and the devices a model may land on.
- :mod:`~llmswap.config.devices`: memory budgets per device and what fits them.
- :mod:`~llmswap.config.keys`: API keys, their model scopes and limits.
- :mod:`~llmswap.config.convert`: ``python -m llmswap convert`` from llama-swap's config.
- :mod:`~llmswap.config.defaults`: the built-in models ``make run`` serves with no file.
- :mod:`~llmswap.config.weights`: where a model's weight files are.
- :mod:`~llmswap.config.estimate`: ``memory: auto``, from a GGUF's header and the command.
- :mod:`~llmswap.config.config`: how the parts fit together (:func:`parse`, :func:`load`).
"""
