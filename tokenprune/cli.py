"""Command line: ``tokenprune bench | eval | sweep | demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenprune import zoo
from tokenprune.registry import methods


def parse_set(pairs: Sequence[str]) -> dict[str, Any]:
    """``["r=8", "prop_attn=false", "r=[1,2]"]`` -> options; values are JSON where they parse, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(raw.lower() if raw.lower() in ("true", "false", "null") else raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from ``--set`` plus ``--flops``/``--input-size`` shortcuts."""
    options = parse_set(args.set or [])
    if getattr(args, "flops", None) is not None:
        options["flops"] = args.flops
    return options


def build_model(name: str, img_size: int | None, checkpoint: str | None = None) -> tuple[torch.nn.Module, int]:
    """A model by zoo name, else a timm architecture with random weights (enough for speed and FLOPs).

    ``checkpoint`` replaces a zoo model's shipped weights (e.g. a file just written by its training script).
    """
    if name in zoo.classifiers():
        model, _ = zoo.load_model(name, checkpoint=checkpoint)
        return model.eval(), img_size or 224
    if checkpoint is not None:
        raise SystemExit(f"--checkpoint applies to zoo models ({zoo.available_models()}), not to {name!r}")
    import timm

    kwargs = {"img_size": img_size} if img_size else {}
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as error:  # timm: "Unknown model (...)"
        raise SystemExit(
            f"unknown model {name!r}: not a tokenprune zoo name nor a timm architecture ({error})"
        ) from error
    size = img_size or model.patch_embed.img_size[0]
    return model.eval(), size


def model_label(args: argparse.Namespace) -> str:
    """The model name results are filed under; names the checkpoint when it is not the shipped one."""
    checkpoint = getattr(args, "checkpoint", None)
    return args.model if checkpoint is None else f"{args.model} @ {checkpoint}"


def _write_json(data: Any, out: str | None) -> None:
    text = json.dumps(data, indent=2)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
    sys.stdout.write(text + "\n")


def _load_for_eval(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, Any, str]:
    """Model, its transform, the dataset (None: bundled examples) and a description of the data."""
    from tokenprune.data import load_dataset
    from tokenprune.measure.sweep import resolve_data_root

    if getattr(args, "split", None) not in (None, "val"):
        raise SystemExit(f"classifiers are scored on their val split; --split {args.split!r} is not supported")
    model, size = build_model(args.model, args.img_size, args.checkpoint)
    transform = zoo.build_transform(size)
    root = resolve_data_root(args.data)
    if root is None:
        return model, transform, None, "bundled example photos (agreement with the unreduced model)"
    if args.model not in zoo.classifiers():
        raise SystemExit(f"accuracy on a dataset needs a trained zoo model ({zoo.classifiers()}), got {args.model!r}")
    entry = zoo.get_entry(args.model)
    dataset = load_dataset(entry.dataset, "val", root=root, transform=transform, limit=args.limit)
    return model, transform, dataset, f"{entry.dataset} val at {root}" + (f", limit {args.limit}" if args.limit else "")


def cmd_eval(args: argparse.Namespace) -> None:
    from tokenprune.measure.accuracy import distributed_context

    if (task_cli := zoo.task_cli(args.model)) is not None:
        return task_cli.cli_eval(args)
    from tokenprune.measure.sweep import evaluate_setting

    rank, _ = distributed_context()
    model, transform, dataset, data = _load_for_eval(args)
    result = evaluate_setting(
        model, transform, args.method, method_options(args), dataset, args.batch_size, args.bench_rounds
    )
    result.update({"model": model_label(args), "data": data, "limit": args.limit})
    if rank == 0:
        _write_json(result, args.out)


def cmd_sweep(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from tokenprune.measure.accuracy import distributed_context
    from tokenprune.measure.sweep import evaluate_setting, sweep_settings, write_sweep_outputs

    if (task_cli := zoo.task_cli(args.model)) is not None:
        return task_cli.cli_sweep(args)
    rank, _ = distributed_context()
    model, transform, dataset, data = _load_for_eval(args)
    out_dir = Path(args.out)
    methods_order = args.methods.split(",")
    settings = sweep_settings(methods_order, [float(b) for b in args.flops.split(",")])
    metric = "top1" if dataset is not None else "top1_agreement"
    done: dict[tuple[str, float], dict] = {}
    for method, budget in tqdm(settings, desc="sweep", disable=rank != 0):
        path = out_dir / f"{method}_{budget}.json"
        if args.resume and path.exists():
            done[method, budget] = json.loads(path.read_text())
            continue
        options = {**parse_set(args.set or []), "flops": budget}
        try:
            row = evaluate_setting(model, transform, method, options, dataset, args.batch_size, args.bench_rounds)
        except ValueError as error:  # e.g. a budget this method cannot reach: recorded, not fatal
            row = {"method": method, "error": str(error)}
        row.update({"budget": budget, "model": model_label(args), "data": data, "limit": args.limit})
        done[method, budget] = row
        if rank == 0:
            out_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2) + "\n")
            # Tables and plot after every setting: an interrupted sweep still leaves readable results.
            rows = [done[key] for key in sorted(done, key=lambda k: (methods_order.index(k[0]), -k[1]))]
            write_sweep_outputs(rows, out_dir, metric, f"{args.model}: {metric} vs FLOPs ({data})")
    if rank == 0:
        rows = [done[key] for key in sorted(done, key=lambda k: (methods_order.index(k[0]), -k[1]))]
        write_sweep_outputs(rows, out_dir, metric, f"{args.model}: {metric} vs FLOPs ({data})")
        sys.stdout.write((out_dir / "table.md").read_text())


def cmd_bench(args: argparse.Namespace) -> None:
    from tokenprune.measure.bench import compare_throughput

    model, size = build_model(args.model, args.img_size)
    images = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    result = compare_throughput(model, args.method, images, rounds=args.rounds, **method_options(args))
    result["model"] = args.model
    _write_json(result, args.out)


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
        p.add_argument("--data", help="dataset root holding <dataset>/val/... (default: $TOKENPRUNE_DATA; "
                       "neither: bundled example photos, agreement with the unreduced model)")
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
    sweep.add_argument("--methods", default="none,tome,evit,random")
    sweep.add_argument("--flops", default="1,0.8,0.65,0.5,0.4,0.35", help="comma-separated budgets")
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
