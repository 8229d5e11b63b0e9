"""The `cogagent-nb` command line.

Each subcommand is a thin shell over one package function, so that notebooks, tests and the command
line all exercise the same code. Heavy imports (torch, transformers) happen inside the handlers, which
keeps `cogagent-nb validate` fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


# --- validate (data module) -------------------------------------------------------------------------
def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check CogAgent JSONL files; prints FILE:LINE: field: message")
    p.add_argument("paths", nargs="+", type=Path, help="JSONL files (images resolve relative to each file's folder)")
    p.add_argument("--quiet-warnings", action="store_true", help="print errors only")
    p.set_defaults(handler=_run_validate)


def _run_validate(args: argparse.Namespace) -> int:
    from cogagent_nb.data.validation import validate_paths

    problems = validate_paths(args.paths)
    errors = [p for p in problems if p.severity == "error"]
    for problem in problems:
        if problem.severity == "error" or not args.quiet_warnings:
            print(problem)
    n_files = len(args.paths)
    print(
        f"{n_files} file(s) checked: {len(errors)} error(s), {len(problems) - len(errors)} warning(s)", file=sys.stderr
    )
    return 1 if errors else 0


# --- make-demo-data (synthetic GUI dataset) ---------------------------------------------------------
def _add_make_demo_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-demo-data", help="render the synthetic GUI dataset in the official layout")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=None, help="number of episodes (default: the small committed set)")
    p.set_defaults(handler=_run_make_demo_data)


def _run_make_demo_data(args: argparse.Namespace) -> int:
    from cogagent_nb.data.synthetic import make_demo_data

    kwargs = {"seed": args.seed}
    if args.episodes is not None:
        kwargs["episodes"] = args.episodes
    summary = make_demo_data(args.out_dir, **kwargs)
    print(summary)
    return 0


# --- make-tiny-tokenizer ------------------------------------------------------------------------------
def _add_make_tiny_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-tokenizer", help="learn the tiny BPE tokenizer from a CogAgent dataset")
    p.add_argument("data_dir", type=Path, help="dataset folder holding train.jsonl")
    p.add_argument("out_file", type=Path, help="where to write tokenizer.model")
    p.add_argument(
        "--n-ranks", type=int, default=None, help="BPE ranks to learn (256 bytes + merges; default: the course's)"
    )
    p.set_defaults(handler=_run_make_tiny_tokenizer)


def _run_make_tiny_tokenizer(args: argparse.Namespace) -> int:
    from cogagent_nb.data.bpe import make_tiny_tokenizer

    kwargs = {} if args.n_ranks is None else {"n_ranks": args.n_ranks}
    print(make_tiny_tokenizer(args.data_dir, args.out_file, **kwargs))
    return 0


# --- make-tiny-model ----------------------------------------------------------------------------------
def _add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a random-initialised tiny CogAgent in the official format")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_make_tiny_model)


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from cogagent_nb.model.loading import make_tiny_model

    out_dir = Path(make_tiny_model(args.out_dir, seed=args.seed))
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


# --- course (runs the notebooks) ---------------------------------------------------------------------
def _add_course(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "course",
        help="run the lesson notebooks in order (papermill), write the executed copies, a summary and a site",
    )
    p.add_argument(
        "lessons", nargs="*", type=Path, help="notebook files to run (default: every NN_*.ipynb in --notebooks)"
    )
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/course-<time>)")
    p.add_argument("--notebooks", type=Path, default=Path("notebooks"), help="folder of NN_*.ipynb lessons")
    p.add_argument("--only", nargs="+", default=[], metavar="NN", help="run only these lesson numbers")
    p.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a parameter for every lesson that declares it (value read as YAML)",
    )
    p.add_argument("-f", "--parameters-file", action="append", default=[], type=Path, help="a YAML file of parameters")
    p.add_argument("--no-site", action="store_true", help="skip the HTML rendering")
    p.add_argument(
        "--table",
        type=Path,
        default=None,
        help="also write the lesson table between the course-table markers of this file",
    )
    p.set_defaults(handler=_run_course)


def _run_course(args: argparse.Namespace) -> int:
    import time

    from cogagent_nb.course import find_lessons, read_parameters, run_course, update_table

    lessons = args.lessons or find_lessons(args.notebooks, args.only)
    out = args.out or Path("runs") / time.strftime("course-%Y%m%d-%H%M%S")
    runs = run_course(lessons, out, read_parameters(args.parameter, args.parameters_file), site=not args.no_site)
    failed = [r for r in runs if not r.ok]
    print(f"{len(runs) - len(failed)} of {len(lessons)} lessons ran; executed notebooks and summary in {out}")
    if not args.no_site:
        print(f"site: {out / 'site' / 'index.html'}")
    if args.table and not failed:
        update_table(args.table, (out / "summary.md").read_text())
        print(f"lesson table updated in {args.table}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogagent-nb", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_validate, _add_make_demo_data, _add_make_tiny_tokenizer, _add_make_tiny_model, _add_course):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
