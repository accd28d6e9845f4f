"""The web console at ``/ui/``: models, queue, activity, swaps and logs, live in a browser.

- :mod:`~llmswap.console.activity`: the last finished requests, and their SQLite history.
- :mod:`~llmswap.console.timeline`: loads, unloads and queue depth over the last hours.
- :mod:`~llmswap.console.logs`: llmswap's own log lines, and each backend's output.
- :mod:`~llmswap.console.live`: one server-sent event stream per open console.
- :mod:`~llmswap.console.routes`: the routes (console, ``/admin/events``, ``/admin/activity``,
  ``/admin/timeline``, ``/admin/logs``) and the static files (no build step, no CDN).
"""
