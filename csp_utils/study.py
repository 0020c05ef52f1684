"""The study driver: run the ordered notebooks with papermill into one run folder.

    python -m csp_utils.study params/default.yaml            # the main study
    python -m csp_utils.study params/smoke.yaml --name smoke  # minutes
    python -m csp_utils.study params/default.yaml --only 07_figures

A params YAML holds global parameters (``base_model``, data folders, ...) and a ``stages``
mapping of per-notebook parameters. A stage key ``NAME@TAG`` runs notebook ``NAME`` again with other
parameters (e.g. ``03_train_sft@s1`` for a second seed). Each notebook gets only the global
parameters its parameters cell declares; every name and type is checked against that cell
before anything runs. The reserved stage key ``cell_timeout`` (seconds) overrides the stage's
default limit per cell (:data:`STAGES`); a cell that runs longer fails the stage.

What each notebook writes and reads inside the run folder is declared in :data:`STAGES`. A
stage's key hashes its parameters (not the run folder's location), its notebook's code cells,
the package source, the base model's fingerprint where the stage loads the model, and the
keys and output digests of the stages whose outputs it reads. A finished stage leaves
``markers/<stage>.json`` with its key and the digest of every output; a rerun skips it while
both still match. Otherwise its outputs are removed and it runs from scratch, except that a
stage interrupted with the same key (``markers/<stage>.running.json``) resumes from its partial
outputs. One driver at a time holds ``<run>/.lock``. With ``jobs: N`` (or ``--jobs N``) up to N
stages run at once, each in its own process with cores / N threads, a stage starting as soon as
the stages it reads have finished. A failing notebook stops the chain (stages already running
finish); its executed copy is kept and the error shown.
"""

from csp_utils.pipeline.cli import main

if __name__ == "__main__":
    main()
