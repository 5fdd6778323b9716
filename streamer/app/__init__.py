"""The application: the ``streamer`` command (``cli``), the demo, the replay commands.

The top layer: it may import everything below it (``producers``, ``consumers``, the ``streamer`` core,
``schemas``), and nothing imports it (checked by import-linter, see ``[tool.importlinter]`` in
pyproject.toml).
"""
