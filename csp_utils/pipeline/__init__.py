"""The study driver: a params YAML -> one run folder, each notebook run by papermill as a
stage. Reads ``params/*.yaml`` and ``notebooks/``; writes ``<runs-root>/<name>/``
(``params.yaml``, ``manifest.json``, ``.lock``, ``markers/``, ``notebooks/`` and every stage's
outputs). ``python -m csp_utils.study`` is its command (``cli``)."""
