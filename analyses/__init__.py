"""Analyses: scripts that measure something once and write it to ``results/*.json``, each
run as ``python -m analyses NAME [ARGS]``. They use the library's public hooks (e.g.
``train(..., on_probe=...)``), never patch its internals."""
