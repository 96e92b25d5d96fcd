"""Command line: ``tokenprune bench | eval | sweep | calibrate | demo``; argument parsing only (``tokenprune.measure``
and ``tokenprune.calibrate`` run them)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

MODEL_HELP = (
    "zoo name (tokenprune.available_models()), timm:<architecture> [--checkpoint FILE], a timm architecture "
    "(random weights), a local Hugging Face directory (image classifier or vision-language model), or a hub id "
    "already in the local Hugging Face cache (--allow-download to fetch it)"
)
METHOD_HELP = "a registered method (tokenprune.methods()) or a named variant (tokenprune.methods.variants)"


def model_args(p: argparse.ArgumentParser) -> None:
    """``--model`` and how it loads."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument(
        "--checkpoint",
        help="zoo models: score this checkpoint instead of the shipped one; timm:<arch>: its state dict "
        "(.safetensors, or a torch file read with weights_only=True)",
    )
    p.add_argument("--allow-download", action="store_true", help="a hub id may be downloaded (default: cache only)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="Hugging Face VLMs: load in this dtype")


def cmd_eval(args: argparse.Namespace) -> None:
    from tokenprune.measure.sweep import run_eval
    from tokenprune.measure.tasks import task_for

    run_eval(task_for(args.model, args.allow_download), args)


def cmd_sweep(args: argparse.Namespace) -> None:
    from tokenprune.measure.sweep import run_sweep
    from tokenprune.measure.tasks import task_for

    run_sweep(task_for(args.model, args.allow_download), args)


def cmd_bench(args: argparse.Namespace) -> None:
    from tokenprune.measure.bench import bench_command

    bench_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        model_args(p)
        p.add_argument("--method", default="tome", help=METHOD_HELP)
        p.add_argument("--flops", type=float, help="FLOPs budget, fraction of the unreduced model in (0, 1]")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="method option, repeatable")
        p.add_argument(
            "--set-file", help="JSON of method options (e.g. a `tokenprune calibrate --out` schedule); --set on top"
        )
        p.add_argument("--img-size", type=int, help="input side (default: the model's)")
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--out", help="write the full JSON result here")
        p.add_argument("--json", action="store_true", help="print the full JSON on stdout instead of the table")
        p.add_argument("--threads", type=int, help="torch threads (default: torch's)")

    bench = sub.add_parser(
        "bench",
        help="patched vs unpatched side by side: images/s (ViTs); vision-language models: time to first token, "
        "decode tokens/s, KV-cache bytes, peak memory",
    )
    common(bench)
    bench.set_defaults(batch_size=None)  # 32 images for image models, 1 prompt for vision-language models
    bench.add_argument("--rounds", type=int, default=5)
    bench.add_argument("--new-tokens", type=int, default=32, help="VLMs: tokens generated per timed run")
    bench.add_argument("--data", help="VLMs: a VQA JSONL file whose first question is the prompt (default: synthetic)")
    bench.set_defaults(func=cmd_bench)

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--data",
            help="classifiers: an ImageFolder root/<class>/<image> (or the zoo's <root>/<dataset>/val); "
            "segmenters: root/images + root/labels (PNG class indices) or the zoo's camvid root; VLMs: a JSONL "
            "of {image, question, answer}. Default $TOKENPRUNE_DATA; neither: bundled example photos "
            "(agreement with the unreduced model)",
        )
        p.add_argument(
            "--labels",
            help="classifiers on an ImageFolder: a file with one label per line (line i = logit i), or 'folders' "
            "(sorted folder names are the logits' order); default: the model's own labels",
        )
        p.add_argument("--max-new-tokens", type=int, help="VLMs: answer length limit (default: the model's)")
        p.add_argument(
            "--limit",
            type=int,
            help="N images (ImageFolder: a deterministic class-balanced subset) or questions (easy-VQA: a seeded "
            "subset; a JSONL: its first N)",
        )
        p.add_argument("--split", help="split to score (default: val for classifiers, test for segmentation)")
        p.add_argument("--bench-rounds", type=int, default=3, help="side-by-side speed rounds (0: skip)")

    evaluate = sub.add_parser("eval", help="accuracy (or agreement), GFLOPs and images/s of one setting")
    common(evaluate)
    data_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    sweep = sub.add_parser("sweep", help="methods x FLOPs budgets: JSON per run, Pareto PNG, markdown table")
    model_args(sweep)
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

    from tokenprune.calibrate import add_calibrate_command

    add_calibrate_command(sub)

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
