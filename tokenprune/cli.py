"""Command line: ``tokenprune bench | eval | sweep | demo``; it parses arguments, ``tokenprune.measure`` runs them."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from tokenprune.registry import methods


def cmd_eval(args: argparse.Namespace) -> None:
    from tokenprune.measure.sweep import run_eval
    from tokenprune.measure.tasks import task_for

    run_eval(task_for(args.model), args)


def cmd_sweep(args: argparse.Namespace) -> None:
    from tokenprune.measure.sweep import run_sweep
    from tokenprune.measure.tasks import task_for

    run_sweep(task_for(args.model), args)


def cmd_bench(args: argparse.Namespace) -> None:
    from tokenprune.measure.bench import bench_command

    bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="zoo name or timm architecture")
        p.add_argument("--method", default="tome", choices=methods())
        p.add_argument("--flops", type=float, help="FLOPs budget, fraction of the unreduced model in (0, 1]")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, repeatable")
        p.add_argument("--img-size", type=int, help="input side (default: the model's)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--out", help="write the JSON result here too")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's)")

    bench = sub.add_parser("bench", help="images/s patched vs unpatched, measured side by side")
    common(bench)
    bench.add_argument("--rounds", type=int, default=5)
    bench.set_defaults(func=cmd_bench)

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data",
            help="dataset root holding <dataset>/val/... (default: $TOKENPRUNE_DATA; "
            "neither: bundled example photos, agreement with the unreduced model)",
        )
        p.add_argument("--limit", type=int, help="deterministic class-balanced subset of N images")
        p.add_argument("--split", help="split to score (default: val for classifiers, test for segmentation)")
        p.add_argument("--bench-rounds", type=int, default=3, help="side-by-side speed rounds (0: skip)")
        p.add_argument("--checkpoint", help="zoo models: score this checkpoint instead of the shipped one")

    evaluate = sub.add_parser("eval", help="accuracy (or agreement), GFLOPs and images/s of one setting")
    common(evaluate)
    data_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    sweep = sub.add_parser("sweep", help="methods x FLOPs budgets: JSON per run, Pareto PNG, markdown table")
    sweep.add_argument("--model", required=True, help="zoo name or timm architecture")
    sweep.add_argument("--methods", help="comma-separated (default: every method for the model's kind, control first)")
    sweep.add_argument("--flops", default="1,0.8,0.65,0.5,0.4,0.35", help="comma-separated budgets")
    sweep.add_argument(
        "--tokens",
        help="instead of --flops (vision-language models): comma-separated visual tokens per image; methods acting "
        "before the LLM keep exactly N, tower ToMe merges down to N, in-LLM methods get the LLM FLOPs of N",
    )
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="option for every method")
    sweep.add_argument("--img-size", type=int)
    sweep.add_argument("--batch-size", type=int, default=32)
    sweep.add_argument("--out", required=True, help="output directory")
    sweep.add_argument("--resume", action="store_true", help="keep settings whose JSON is already in --out")
    data_args(sweep)
    sweep.set_defaults(func=cmd_sweep)

    demo = sub.add_parser("demo", help="Gradio app: original vs reduced model side by side (needs the [demo] extra)")
    demo.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--model", default="auto", help="'auto' (zoo model, else its backbone), zoo name or timm arch")
    demo.set_defaults(func=cmd_demo)
    return parser


def cmd_demo(args: argparse.Namespace) -> None:
    try:
        from tokenprune.demo import launch
    except ImportError as error:
        raise SystemExit(f"tokenprune demo needs gradio: pip install 'tokenprune[demo]' ({error})") from error
    launch(host=args.host, port=args.port, model_name=args.model)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        args.func(args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"tokenprune {args.command}: {error}") from error


if __name__ == "__main__":
    main()
