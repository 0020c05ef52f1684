"""``python -m csp_utils.pretrain``: trains the embedded default VLM (``csp_utils.embedded``).

    python -m csp_utils.pretrain --out DIR [--steps N] [--vision-steps N] [--seed S] [--tiny]

The shipped models record this command in their ``csp_meta.json``; the code lives in
``csp_utils.embedded`` (``cli`` parses the command, ``train`` runs it).
"""

from csp_utils.embedded.cli import main, parse_command
from csp_utils.embedded.config import PretrainConfig
from csp_utils.embedded.train import build_default_model, pretrain

__all__ = ["PretrainConfig", "build_default_model", "main", "parse_command", "pretrain"]

if __name__ == "__main__":
    raise SystemExit(main())
