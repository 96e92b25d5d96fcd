"""Pieces the partial fine-tuning scripts share (``train_imagenette.py``, ``train_camvid.py``).

Atomic file writes, the float16 token cache of a frozen front (resumable chunk by chunk), the
AdamW parameter groups with layer-wise lr decay, and the warmup + cosine schedule.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp_path)`` for a temp file next to ``path``, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the main process' threads


class TokenCache:
    """float16 tokens of a frozen front for every image of a dataset, one or two views.

    ``dataset[i]`` must be ``(image, anything)``; ``manifest`` says what was cached and how (a rerun with
    another manifest refuses to mix caches). ``build(forward, ...)`` stores ``forward(images)``, a float
    ``(n, T, C)`` tensor per batch.

    Layout: ``<dir>/manifest.json`` (what was cached, and how), ``<dir>/view{v}/chunk_{i:05d}.npy``
    (``(n, T, C)`` float16 for images ``i*chunk .. i*chunk+n-1``; view 0 = as is,
    view 1 = mirrored left-right), ``<dir>/chunk_seconds.jsonl`` (timing).
    """

    def __init__(self, directory: Path, dataset: Any, views: int, chunk: int, manifest: dict[str, Any]):
        self.dir = directory
        self.dataset = dataset
        self.views = views
        self.chunk = chunk
        self.manifest = manifest
        self.n_chunks = math.ceil(len(dataset) / chunk)

    def chunk_path(self, view: int, i: int) -> Path:
        return self.dir / f"view{view}" / f"chunk_{i:05d}.npy"

    def check_manifest(self) -> None:
        path = self.dir / "manifest.json"
        if path.is_file():
            old = json.loads(path.read_text())
            if old != self.manifest:
                diff = sorted(k for k in set(old) | set(self.manifest) if old.get(k) != self.manifest.get(k))
                raise SystemExit(
                    f"token cache {self.dir} was made with different settings (differs in {diff}); "
                    "delete that folder or pass another --cache-dir"
                )
        else:
            write_json(path, self.manifest)

    def missing(self) -> list[tuple[int, list[int]]]:
        """(chunk index, views still missing) for every incomplete chunk."""
        out = []
        for i in range(self.n_chunks):
            views = [v for v in range(self.views) if not self.chunk_path(v, i).is_file()]
            if views:
                out.append((i, views))
        return out

    def build(
        self, forward: Callable[[torch.Tensor], torch.Tensor], batch_size: int, workers: int
    ) -> tuple[float, int]:
        """Computes every missing chunk; returns (seconds, image-views forwarded) of this call."""
        self.check_manifest()
        todo = self.missing()
        n = len(self.dataset)
        done_images = n - sum(min(self.chunk, n - i * self.chunk) for i, _ in todo)
        if not todo:
            print(f"token cache complete: {self.dir}")
            return 0.0, 0
        views_of = dict(todo)
        batches, owner = [], []
        for i, _ in todo:
            lo, hi = i * self.chunk, min(n, (i + 1) * self.chunk)
            for s in range(lo, hi, batch_size):
                batches.append(list(range(s, min(hi, s + batch_size))))
                owner.append(i)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=batches, num_workers=workers, worker_init_fn=worker_init
        )
        start = t_last = time.perf_counter()
        parts: dict[int, list[list[torch.Tensor]]] = {}
        bar = tqdm(total=n, initial=done_images, desc=f"caching {self.dataset.split} tokens", unit="img")
        with torch.inference_mode():
            for (images, _), i in zip(loader, owner, strict=True):
                outs = parts.setdefault(i, [[] for _ in range(self.views)])
                for v in views_of[i]:
                    x = images if v == 0 else torch.flip(images, dims=[-1])
                    outs[v].append(forward(x).float())
                bar.update(len(images))
                got = sum(t.shape[0] for t in outs[views_of[i][0]])
                if got == min(self.chunk, n - i * self.chunk):
                    for v in views_of[i]:
                        tok = torch.cat(outs[v])
                        peak = tok.abs().max().item()
                        if not math.isfinite(peak) or peak > 6e4:
                            raise RuntimeError(f"tokens of chunk {i} do not fit float16 (max abs {peak})")
                        arr = tok.half().numpy()

                        def write(tmp: str, arr: np.ndarray = arr) -> None:
                            with open(tmp, "wb") as f:
                                np.save(f, arr)

                        atomic_write(self.chunk_path(v, i), write)
                    del parts[i]
                    now = time.perf_counter()
                    with open(self.dir / "chunk_seconds.jsonl", "a") as f:
                        rec = {"chunk": i, "views": views_of[i], "images": got, "seconds": now - t_last}
                        f.write(json.dumps(rec) + "\n")
                    t_last = now
        bar.close()
        forwarded = sum(min(self.chunk, n - i * self.chunk) * len(v) for i, v in todo)
        return time.perf_counter() - start, forwarded

    def seconds(self) -> float:
        """Seconds spent computing the chunks, summed over all runs that built this cache."""
        path = self.dir / "chunk_seconds.jsonl"
        if not path.is_file():
            return 0.0
        return sum(json.loads(line).get("seconds", 0.0) for line in path.read_text().splitlines() if line.strip())

    def load(self) -> list[torch.Tensor]:
        """All views as in-RAM float16 tensors ``(N, T, C)``."""
        if self.missing():
            raise RuntimeError(f"token cache {self.dir} is incomplete")
        n = len(self.dataset)
        first = np.load(self.chunk_path(0, 0), mmap_mode="r")
        shape = (n,) + tuple(first.shape[1:])
        out = []
        for v in range(self.views):
            buf = torch.empty(shape, dtype=torch.float16)
            for i in tqdm(range(self.n_chunks), desc=f"loading cached view {v}", unit="chunk"):
                arr = np.load(self.chunk_path(v, i))
                lo = i * self.chunk
                want = (min(self.chunk, n - lo),) + shape[1:]
                if arr.shape != want or arr.dtype != np.float16:
                    raise RuntimeError(f"{self.chunk_path(v, i)}: {arr.dtype}{arr.shape}, expected float16{want}")
                buf[lo : lo + arr.shape[0]] = torch.from_numpy(arr)
            out.append(buf)
        return out


def param_groups(
    model: torch.nn.Module, lr_of: Callable[[str], tuple[str, float]], weight_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: ``lr_of(name) -> (group tag, peak lr)``; weight decay on
    matrices only. Each group keeps its peak lr as ``base_lr`` (the schedule multiplies it)."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tag, lr = lr_of(name)
        decay = p.ndim >= 2
        g = groups.setdefault(
            (tag, decay),
            {
                "name": f"{tag}{'' if decay else '.no_decay'}",
                "params": [],
                "base_lr": lr,
                "weight_decay": weight_decay if decay else 0.0,
            },
        )
        g["params"].append(p)
    out = list(groups.values())
    for g in out:
        g["lr"] = g["base_lr"]
    return out


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def gather(tokens: list[torch.Tensor], idx: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` as float32, row ``j`` taken from view ``views[j]``."""
    out = torch.empty((len(idx),) + tuple(tokens[0].shape[1:]), dtype=torch.float32)
    for v, t in enumerate(tokens):
        sel = (views == v).nonzero().flatten()
        if len(sel):
            out[sel] = t[idx[sel]].float()
    return out


def trainable_state(model: torch.nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    return {k: sd[k].detach().clone() for k in keys}


class EpochCheckpoints:
    """Resumable training state (``state.pt``: after the last finished epoch) and the best epoch (``best.pt``).

    Args:
        run_dir: Where both files live.
        config: The training settings; a saved state made with other settings is refused (``--fresh`` restarts).
        fresh: Discard saved state first.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], fresh: bool = False) -> None:
        self.state_path, self.best_path = run_dir / "state.pt", run_dir / "best.pt"
        self.config = config
        if fresh:
            self.state_path.unlink(missing_ok=True)
            self.best_path.unlink(missing_ok=True)

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, epochs: int) -> tuple[list[dict], int]:
        """Loads the saved state into ``model``/``optimizer`` (and the RNG): ``(history, first epoch to run)``."""
        if not self.state_path.is_file():
            return [], 0
        state = torch.load(self.state_path, weights_only=True)
        if state["config"] != self.config:
            raise SystemExit(
                f"{self.state_path} was trained with {state['config']}, now {self.config}; pass --fresh to restart"
            )
        model.load_state_dict(state["params"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        print(f"resuming after epoch {state['epoch'] + 1}/{epochs} from {self.state_path}")
        return state["history"], state["epoch"] + 1

    def save(
        self, epoch: int, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, history: list[dict],
        is_best: bool,
    ) -> None:  # fmt: skip
        """After ``epoch`` (0-based): the best weights so far when ``is_best``, and the state to resume from."""
        if is_best:
            atomic_write(self.best_path, lambda tmp: torch.save({"epoch": epoch + 1, "params": params}, tmp))
        state = {
            "epoch": epoch,
            "params": params,
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),
            "history": history,
            "config": self.config,
        }
        atomic_write(self.state_path, lambda tmp: torch.save(state, tmp))

    def best(self) -> dict[str, Any]:
        """``{"epoch": 1-based epoch, "params": trained tensors}`` of the best epoch."""
        return torch.load(self.best_path, weights_only=True)
