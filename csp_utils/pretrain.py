"""``python -m csp_utils.pretrain``: trains the embedded default VLM (``csp_utils.vlm.embedded``).

    python -m csp_utils.pretrain --out DIR [--steps N] [--vision-steps N] [--seed S] [--tiny]

The shipped models record this command in their ``csp_meta.json``; the code lives in
``csp_utils.vlm.embedded`` (``cli`` parses the command, ``train`` runs it).
"""

from csp_utils.vlm.embedded.pretrain_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
