"""The `cogagent-nb` command line.

Each subcommand is a thin shell over one package function, so that notebooks, tests and the command
line all exercise the same code. Heavy imports (torch, transformers) happen inside the handlers, which
keeps `cogagent-nb validate` and `--help` free of them (tests/test_startup.py checks it).
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


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (a batch of 0 or -3 tokens is a typo, not a request)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be above 0")
    return value


# --- make-demo-data (synthetic GUI dataset) ---------------------------------------------------------
def _add_make_demo_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-demo-data", help="render the synthetic GUI dataset in the official layout")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--episodes", type=positive_int, default=None, help="number of episodes (default: the small committed set)"
    )
    p.set_defaults(handler=_input_errors_as_messages(_run_make_demo_data))


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
        "--n-ranks",
        type=positive_int,
        default=None,
        help="BPE ranks to learn (256 bytes + merges; default: the course's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT_FILE if it exists")
    p.set_defaults(handler=_input_errors_as_messages(_run_make_tiny_tokenizer))


def _run_make_tiny_tokenizer(args: argparse.Namespace) -> int:
    from cogagent_nb.data.bpe import make_tiny_tokenizer

    if args.out_file.is_dir():
        raise IsADirectoryError(f"{args.out_file}: is a folder; OUT_FILE is the tokenizer.model file to write")
    if args.out_file.exists() and not args.overwrite:
        raise FileExistsError(f"{args.out_file}: exists (a model's tokenizer?); choose a new file or pass --overwrite")
    kwargs = {} if args.n_ranks is None else {"n_ranks": args.n_ranks}
    print(make_tiny_tokenizer(args.data_dir, args.out_file, **kwargs))
    return 0


# --- make-tiny-model ----------------------------------------------------------------------------------
def _add_make_tiny_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-tiny-model", help="write a random-initialised tiny CogAgent in the official format")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it holds files")
    p.set_defaults(handler=_input_errors_as_messages(_run_make_tiny_model))


def _refuse_a_used_folder(out_dir: Path, overwrite: bool) -> None:
    """Random weights written over a trained or merged model would destroy it: a used folder needs --overwrite."""
    from cogagent_nb.train.export import refuse_used_folder

    refuse_used_folder(out_dir, overwrite=overwrite, remedy="choose a new folder, or pass --overwrite to write over it")


def _run_make_tiny_model(args: argparse.Namespace) -> int:
    from cogagent_nb.model.loading import make_tiny_model

    _refuse_a_used_folder(args.out_dir, args.overwrite)
    out_dir = Path(make_tiny_model(args.out_dir, seed=args.seed))
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


def _add_make_random_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-random-model",
        help="write a random-initialised model of any preset (e.g. the 9B) with a stand-in tokenizer",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", default="cogagent-9b-20241220", help="cogagent-9b-20241220, glm-4v-9b or tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument("--device", default=None, help="initialise on this device, e.g. cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="write into OUT_DIR even if it holds files")
    p.set_defaults(handler=_input_errors_as_messages(_run_make_random_model))


def _run_make_random_model(args: argparse.Namespace) -> int:
    from cogagent_nb.model.loading import make_random_model

    _refuse_a_used_folder(args.out_dir, args.overwrite)
    out_dir = Path(make_random_model(args.out_dir, args.preset, seed=args.seed, dtype=args.dtype, device=args.device))
    for path in sorted(out_dir.iterdir()):
        print(f"{path}  {path.stat().st_size:,} bytes")
    return 0


# --- infer and evaluate (infer module) ----------------------------------------------------------------
def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared by `infer` and `evaluate`: which weights, and how to generate."""
    p.add_argument("--adapter", type=Path, default=None, help="LoRA adapter folder to load on top of MODEL_DIR")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the base weights before generating")
    p.add_argument("--dtype", default=None, help="bfloat16, float16 or float32 (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1 or cpu (default: where load() puts it)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="with --sample")
    p.add_argument("--top-p", type=unit_interval, default=1.0, help="with --sample (above 0, at most 1)")
    p.add_argument("--top-k", type=positive_int, default=None, help="with --sample")
    p.add_argument("--seed", type=int, default=None, help="seed for --sample")


def _input_errors_as_messages(handler):
    """Bad input (a missing file, invalid JSONL, a model folder without tokenizer) ends with one line naming
    the file, exit status 2, instead of a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, ValueError) as err:
            print(f"cogagent-nb {args.command}: error: {err}", file=sys.stderr)
            return 2

    return run


def _settings(args: argparse.Namespace) -> dict:
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.sample,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
    }


def _load_model(args: argparse.Namespace):
    from cogagent_nb.infer.generate import load_for_inference

    return load_for_inference(
        args.model_dir, adapter=args.adapter, merge=args.merge, dtype=args.dtype, device=args.device
    )


def check_output_path(path: Path | None, option: str, suffixes: tuple[str, ...]) -> None:
    """Refuse an output path that cannot be written, before the model loads and generation runs (minutes
    on the 9B, lost if the write fails at the end); its folder is made here (`--json runs/eval.json` in a
    fresh clone, where runs/ does not exist yet)."""
    if path is None:
        return
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path}: is a folder; give a file name ending in {' or '.join(suffixes)}")
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"{option} {path}: give a file name ending in {' or '.join(suffixes)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(f"{option} {path}: a file stands where its folder should be") from None


def unit_interval(text: str) -> float:
    """An argparse type: a number in (0, 1], as top-p is."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1")
    return value


def _add_infer(sub: argparse._SubParsersAction) -> None:
    from cogagent_nb.data.actions import ANSWER_FORMATS, PLATFORMS

    p = sub.add_parser("infer", help="one agent step: screenshot + task -> answer, action, box in pixels, PNG")
    p.add_argument("model_dir", type=Path, help="official-format model folder (config.json, weights, tokenizer)")
    p.add_argument("--image", type=Path, required=True, help="the screenshot")
    p.add_argument("--task", required=True, help="what the agent should do")
    p.add_argument("--platform", default="WIN", choices=PLATFORMS, help="the official platforms (default WIN)")
    p.add_argument("--format", default="Action-Operation-Sensitive", choices=ANSWER_FORMATS, dest="answer_format")
    p.add_argument(
        "--history",
        nargs="*",
        default=[],
        metavar="OP<TAB>ACTION",
        help="earlier steps, one argument each: the Grounded Operation, a tab (or ' || '), the Action sentence",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="the screenshot with the box, PNG (default: ./IMAGE_prediction.png)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON")
    _add_model_options(p)
    p.set_defaults(handler=_input_errors_as_messages(_run_infer))


def _history_pairs(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for number, item in enumerate(items):
        separator = "\t" if "\t" in item else " || "
        if separator not in item:
            raise ValueError(f"--history item {number}: {item!r} needs OPERATION<TAB>ACTION or 'OPERATION || ACTION'")
        operation, action = item.split(separator, 1)
        pairs.append((operation.strip(), action.strip()))
    return pairs


def _run_infer(args: argparse.Namespace) -> int:
    import json

    from cogagent_nb.infer.generate import predict
    from cogagent_nb.viz.predictions import prediction_image

    history = _history_pairs(args.history)
    if not args.image.is_file():  # before the model loads, which takes minutes on the 9B
        raise FileNotFoundError(f"{args.image}: no such image")
    out = args.out or Path(args.image.stem + "_prediction.png")  # the working folder, not the dataset's images/
    check_output_path(out, "--out", (".png", ".jpg", ".jpeg"))
    check_output_path(args.json, "--json", (".json",))
    tokenizer, model = _load_model(args)
    prediction = predict(
        model,
        tokenizer,
        args.image,
        args.task,
        platform=args.platform,
        answer_format=args.answer_format,
        history=history,
        **_settings(args),
    )
    print(prediction)
    prediction_image(prediction).save(out)
    print(f"drawn: {out}")
    if args.json:
        args.json.write_text(json.dumps(prediction.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"json: {args.json}")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from cogagent_nb.infer.evaluate import IMAGE_MODES

    p = sub.add_parser("evaluate", help="GUI metrics of a model on a CogAgent JSONL file (click-in-box, ...)")
    p.add_argument("model_dir", type=Path)
    p.add_argument("data", type=Path, help="a JSONL file, e.g. data/CogAgentData/test.jsonl")
    p.add_argument("--json", type=Path, default=None, help="write the full report (every sample) as JSON")
    p.add_argument(
        "--figure", type=Path, default=None, help="PNG of predicted vs target boxes (default: beside --json)"
    )
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N samples only")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--images", choices=IMAGE_MODES, default="screenshots", help="blank/shuffled: the grounding check")
    _add_model_options(p)
    p.set_defaults(handler=_input_errors_as_messages(_run_evaluate))


def _run_evaluate(args: argparse.Namespace) -> int:
    from cogagent_nb.infer.evaluate import check_screenshots, evaluate, read_eval_samples

    check_screenshots(read_eval_samples(args.data, limit=args.limit))  # bad data fails here, before the model loads
    check_output_path(args.json, "--json", (".json",))
    check_output_path(args.figure, "--figure", (".png", ".jpg", ".jpeg", ".pdf", ".svg"))
    tokenizer, model = _load_model(args)
    report = evaluate(
        model, tokenizer, args.data, limit=args.limit, batch_size=args.batch_size, images=args.images, **_settings(args)
    )
    print(report)
    if args.json:
        print(f"json: {report.write_json(args.json)}")
    figure = args.figure or (args.json.with_suffix(".png") if args.json else None)
    if figure:
        import matplotlib

        matplotlib.use("Agg")
        from cogagent_nb.viz.predictions import show_box_predictions

        fig = show_box_predictions(report)
        fig.savefig(figure, dpi=110)
        print(f"figure: {figure}")
    return 0


# --- finetune / merge (train module) ------------------------------------------------------------------
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from cogagent_nb.train.finetune import add_arguments

    p = sub.add_parser("finetune", help="fine-tune CogAgent: DATA_DIR MODEL_DIR CONFIG [RESUME] (official CLI)")
    add_arguments(p)
    p.set_defaults(handler=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    from cogagent_nb.train.finetune import run_from_args

    return run_from_args(args)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model: BASE ADAPTER OUT")
    p.add_argument("base", type=Path, help="the base model folder the adapter was trained on")
    p.add_argument(
        "adapter", type=Path, help="a LoRA checkpoint folder (adapter_config.json + weights), or a finetune output_dir"
    )
    p.add_argument("out", type=Path, help="new folder for the merged official-format model")
    p.set_defaults(handler=_input_errors_as_messages(_run_merge))


def _run_merge(args: argparse.Namespace) -> int:
    from cogagent_nb.infer.generate import find_adapter
    from cogagent_nb.train.export import merge_lora

    adapter = find_adapter(args.adapter) or args.adapter  # a run folder: its newest adapter, as infer takes it
    out = merge_lora(args.base, adapter, args.out)
    print(f"merged {adapter} into {args.base}: {out}")
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
    p.set_defaults(handler=_input_errors_as_messages(_run_course))


def _run_course(args: argparse.Namespace) -> int:
    import time

    from cogagent_nb.course import (
        find_lessons,
        mistyped_parameters,
        read_parameters,
        run_course,
        undeclared_parameters,
        update_table,
    )

    lessons = args.lessons or find_lessons(args.notebooks, args.only)
    parameters = read_parameters(args.parameter, args.parameters_file)
    problems = mistyped_parameters(lessons, parameters)
    if problems:
        raise ValueError("; ".join(problems))
    for name, close in undeclared_parameters(lessons, parameters).items():
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        print(
            f"cogagent-nb course: warning: no lesson run here declares {name!r}; it changes nothing{hint}",
            file=sys.stderr,
        )
    out = args.out or Path("runs") / time.strftime("course-%Y%m%d-%H%M%S")
    runs = run_course(lessons, out, parameters, site=not args.no_site)
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
    for add in (
        _add_validate,
        _add_make_demo_data,
        _add_make_tiny_tokenizer,
        _add_make_tiny_model,
        _add_make_random_model,
        _add_finetune,
        _add_merge,
        _add_infer,
        _add_evaluate,
        _add_course,
    ):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["finetune"]:  # its RESUME may follow --set options, which subparsers cannot parse
        from cogagent_nb.train.finetune import main as finetune_main

        return finetune_main(argv[1:], prog="cogagent-nb finetune")
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
