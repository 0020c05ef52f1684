"""Write the paper rehearsal kit (toy models, photographs, official-format files) into a folder
and print the study command that runs params/paper_smoke.yaml on it.

    python scripts/make_paper_rehearsal.py runs/rehearsal_kit
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from csp_utils.pipeline import rehearsal


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", nargs="?", default="runs/rehearsal_kit")
    args = ap.parse_args(argv)
    kit = rehearsal.make_rehearsal_kit(args.folder)
    print(f"rehearsal kit in {kit}")
    print(f"python -m csp_utils.study params/paper_smoke.yaml --set {rehearsal.set_arguments(kit)}")


if __name__ == "__main__":
    main()
