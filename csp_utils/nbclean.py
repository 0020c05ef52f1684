"""``python -m csp_utils.nbclean``: git's clean filter for the repository's notebooks.

``.gitattributes`` routes every notebook git stages or compares through this filter, so that
running and saving a notebook in JupyterLab leaves no diff: the source notebooks
(``notebooks/``) lose outputs, execution counts and cell metadata other than tags; the
published ones (``docs/notebooks/``, ``--keep-outputs``) keep their outputs. Both get the
kernelspec and language_info that papermill needs in one fixed form (an editor rewrites them on
opening), and one JSON layout (nbformat's: sorted keys, indent 1).

``python -m csp_utils.nbclean --install`` registers the filters in this clone's git config
(the README's setup command runs it). It runs as a plain script too: it imports only the
standard library, so git can call it without the package on the path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
LANGUAGE_INFO = {"codemirror_mode": {"name": "ipython", "version": 3}, "file_extension": ".py",
                 "mimetype": "text/x-python", "name": "python", "pygments_lexer": "ipython3"}
FILTERS = {"nbclean": "", "nbclean-published": " --keep-outputs"}  # filter name -> arguments


def clean(text: str, keep_outputs: bool = False) -> str:
    """A notebook's JSON in its committed form; text that is not a notebook comes back as it is."""
    try:
        nb = json.loads(text)
    except ValueError:
        return text
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        return text
    meta = nb.setdefault("metadata", {})
    meta["kernelspec"], meta["language_info"] = dict(KERNELSPEC), dict(LANGUAGE_INFO)
    if not keep_outputs:
        nb["metadata"] = {k: meta[k] for k in ("kernelspec", "language_info")}
    for cell in nb["cells"]:
        if keep_outputs:
            continue
        tags = (cell.get("metadata") or {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def install(repo: Path | None = None) -> None:
    """The filters ``.gitattributes`` names, in the git config of the clone holding ``repo``."""
    repo = Path(repo or Path(__file__).resolve().parents[1])
    script = Path(__file__).resolve()
    for name, args in FILTERS.items():
        command = f'"{sys.executable}" "{script}"{args}'
        subprocess.run(["git", "-C", str(repo), "config", f"filter.{name}.clean", command], check=True)
        subprocess.run(["git", "-C", str(repo), "config", f"filter.{name}.required", "false"], check=True)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--install" in argv:
        try:
            install()
        except (OSError, subprocess.CalledProcessError) as err:
            raise SystemExit(f"[nbclean] could not register the notebook filter with git: {err}") from None
        print("[nbclean] notebook filters registered in this clone's git config")
        return
    sys.stdout.write(clean(sys.stdin.read(), keep_outputs="--keep-outputs" in argv))


if __name__ == "__main__":
    main()
