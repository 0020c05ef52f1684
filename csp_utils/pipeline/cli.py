"""The driver's command line: ``python -m csp_utils.study PARAMS [--name] [--only] [--set] ...``.

A run writes only its run folder. Writing its results into the repository is a step of its own:

    python -m csp_utils.study params/default.yaml --publish     # after the run: figures, results, README, notebooks
    python -m csp_utils.study params/default.yaml --compare     # its numbers against the published ones
    python -m csp_utils.study --figures-only figures/results    # redraw figures/ from the compact results
"""

from __future__ import annotations

import argparse
import signal


from csp_utils.core.paths import REPO
from csp_utils.pipeline.driver import RunFolderError, run_study, show_plan
from csp_utils.pipeline.planning import parse_set
from csp_utils.pipeline.publish import figures_only, publish_study


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("params", nargs="?", default=str(REPO / "params" / "default.yaml"))
    ap.add_argument("--name", help="run folder name under --runs-root (default: the params' name)")
    ap.add_argument("--runs-root", default="runs", help="relative paths are under the repository")
    ap.add_argument("--only", nargs="*", help="run only these stages (others keep their markers)")
    ap.add_argument("--force", action="store_true", help="rerun stages from scratch even when up to date")
    ap.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")
    ap.add_argument("--jobs", type=int, help="stages run at once (default: the params' jobs, else 1); "
                    "each gets cores / jobs threads")
    ap.add_argument("--plan", action="store_true", help="check everything, print each stage with its resolved "
                    "parameters and whether it would run, skip or rebuild; run nothing, write nothing")
    ap.add_argument("--publish", action="store_true", help="write the finished run into the repository places the "
                    "params' publish mapping names; prints what changed and how the numbers moved")
    ap.add_argument("--compare", action="store_true", help="print how the finished run's numbers differ from the "
                    "published ones; write nothing")
    ap.add_argument("--figures-only", metavar="RESULTS", help="redraw every figure from compact results "
                    "(e.g. figures/results) into --figures-dir after checking each input file; runs nothing")
    ap.add_argument("--figures-dir", help="with --figures-only: where the figures go (default: the folder above RESULTS)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a global parameter (--set base_model=/path/to/model) or one stage's own "
                    "(--set 03_train_sft.sft.max_steps=4); values are YAML")
    args = ap.parse_args(argv)
    # SIGTERM (kill, a job scheduler) unwinds like Ctrl-C: kernels are shut down, the lock released.
    # SIGINT goes through the same handler: a process started in the background by a
    # non-interactive shell inherits SIGINT ignored (Python then installs no handler of its own),
    # and the interrupt names its signal
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    overrides = {}
    for item in args.set:
        try:
            key, value = parse_set(item)
        except ValueError as err:
            ap.error(str(err))
        overrides[key] = value
    try:
        if args.figures_only:
            written = figures_only(args.figures_only, args.figures_dir)
            print(f"[figures] {len(written)} figures drawn from {args.figures_only}")
            return
        if args.publish or args.compare:
            publish_study(args.params, args.name, args.runs_root, overrides, compare_only=args.compare)
            return
        if args.plan:
            show_plan(args.params, args.name, args.runs_root, args.only, args.force, overrides, args.jobs)
            return
        run_dir = run_study(args.params, args.name, args.runs_root, args.only, args.force, args.log_output, overrides,
                            args.jobs)
    except (ValueError, FileNotFoundError, RunFolderError) as err:
        raise SystemExit(f"[study] {err}") from None
    except KeyboardInterrupt as err:
        cause = str(err) if str(err) not in ("", "()") else "signal SIGINT"
        raise SystemExit(f"[study] interrupted ({cause}); the same command resumes the run") from None
    print(f"[study] run folder: {run_dir}")
