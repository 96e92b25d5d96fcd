"""``tokenprune eval`` on the user's own models and data: ``timm:<arch> --checkpoint``, local Hugging Face
classifier and VLM directories, ImageFolder / images+labels / VQA JSONL layouts, and the documented errors.

Every model is tiny, random and built into a temporary folder (a word-level tokenizer and LLaVA processor built
offline as for llava-easyvqa); nothing downloads (HF_HUB_OFFLINE is set for hub ids).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenprune
from tokenprune.cli import main

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("cat", "dog", "fox")
QUESTIONS = [("what color is the shape?", "red"), ("is there a circle?", ["yes", "yes", "no"]),
             ("what shape is this?", "circle"), ("what color is the circle?", "blue")]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} answer :"
)


def picture(seed: int, size: int = 40) -> Image.Image:
    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def image_folder(root: Path, per_class: int = 2) -> Path:
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            picture(10 * c + i).save(root / name / f"{i}.png")
    return root


def tiny_llava_dir(directory: Path, chat_template: bool = True) -> Path:
    """A random 2-layer LLaVA (1-layer DINOv2 tower at 168 px: 144 visual tokens) with its processor, saved."""
    sys.path.insert(0, str(REPO / "models"))
    from llava_builders import build_processor, build_tokenizer, vocabulary
    from transformers import Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    answers = ["red", "blue", "yes", "no", "circle", "describe", "image"]
    tokenizer = build_tokenizer(vocabulary([q for q, _ in QUESTIONS], answers))
    processor = build_processor(tokenizer)
    if chat_template:
        processor.chat_template = CHAT_TEMPLATE
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (("pad", "<pad>"), ("bos", "<s>"), ("eos", "</s>"))
    }
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), max_position_embeddings=256,
                       pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"])  # fmt: skip
    vision = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2, patch_size=14,
                          image_size=168)  # fmt: skip
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_id, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", pad_token_id=ids["pad"])  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids["pad"], ids["eos"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def vqa_jsonl(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (question, answer) in enumerate(QUESTIONS):
        picture(100 + i).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "question": question, "answer": answer}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "questions.jsonl"


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    import timm
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, img_size=64, num_classes=len(CLASSES)).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(root / "vit.safetensors"))
    torch.save({"state_dict": model.state_dict()}, root / "vit.pt")
    return model, root / "vit.safetensors", root / "vit.pt"


def run(argv: list[str], capsys) -> tuple[dict, str]:
    out = Path(argv[argv.index("--out") + 1])
    main(argv)
    return json.loads(out.read_text()), capsys.readouterr().out


def test_timm_checkpoint_on_an_image_folder_maps_labels_and_scores(vit_checkpoint, tmp_path, capsys):
    from timm.data import create_transform, resolve_data_config

    model, safetensors, torch_file = vit_checkpoint
    data = image_folder(tmp_path / "data")
    (tmp_path / "labels.txt").write_text("fox\ncat\ndog\n")  # logit order differs from the sorted folders
    argv = ["eval", "--model", "timm:test_vit", "--checkpoint", str(safetensors), "--img-size", "64", "--data",
            str(data), "--labels", str(tmp_path / "labels.txt"), "--method", "tome", "--flops", "0.7",
            "--bench-rounds", "0", "--batch-size", "4", "--out", str(tmp_path / "r.json")]  # fmt: skip
    result, stdout = run(argv, capsys)
    # The reference: the same reduction applied by hand, labels by the file's order.
    config = resolve_data_config(model=model)
    transform = create_transform(**{**config, "input_size": (3, 64, 64)})
    logit = {"fox": 0, "cat": 1, "dog": 2}
    patch = tokenprune.apply(model, "tome", flops=0.7, input_size=[64, 64])  # the harness passes its input size
    schedule = patch.schedule
    with torch.no_grad():
        hits = [int(model(transform(Image.open(p).convert("RGB"))[None]).argmax()) == logit[p.parent.name]
                for p in sorted(data.glob("*/*.png"))]  # fmt: skip
    patch.remove()
    assert result["n"] == 6 and result["correct"] == sum(hits)
    assert result["schedule"] == schedule and result["model"].startswith("timm:test_vit @ ")
    lines = stdout.splitlines()
    assert lines[0].startswith("| setting | accuracy |") and "| tome flops=0.7 | top1 " in lines[2]
    assert f"merged per layer: {schedule[0]}" in lines[2]
    # A torch file (nested under "state_dict", read with weights_only=True) gives the same model.
    again, _ = run([*argv[:4], str(torch_file), *argv[5:]], capsys)
    assert again["correct"] == result["correct"]
    # --labels folders: the sorted folder names are the logit order; --json prints the full JSON.
    main([*argv[:9], "--labels", "folders", *argv[11:-2], "--json"])
    assert json.loads(capsys.readouterr().out)["n"] == 6


def test_hf_classifier_directory_matches_folders_by_id2label(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8, id2label=dict(enumerate(["Dog", "Fox", "Cat"])),
                       label2id={"Dog": 0, "Fox": 1, "Cat": 2})  # fmt: skip
    torch.manual_seed(0)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "hf")
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "hf")
    data = image_folder(tmp_path / "data")
    result, stdout = run(["eval", "--model", str(tmp_path / "hf"), "--data", str(data), "--method", "none",
                          "--bench-rounds", "0", "--out", str(tmp_path / "r.json")], capsys)  # fmt: skip
    logit = {"dog": 0, "fox": 1, "cat": 2}  # by id2label, case-insensitive
    with torch.no_grad():
        hits = [int(model(**processor(Image.open(p).convert("RGB"), return_tensors="pt")).logits.argmax())
                == logit[p.parent.name] for p in sorted(data.glob("*/*.png"))]  # fmt: skip
    assert result["n"] == 6 and result["correct"] == sum(hits) and "top1" in stdout


def test_vlm_directory_answers_jsonl_questions_with_its_chat_template(tmp_path, capsys):
    directory = tiny_llava_dir(tmp_path / "llava")
    data = vqa_jsonl(tmp_path / "vqa")
    result, stdout = run(["eval", "--model", str(directory), "--data", str(data), "--method", "fastv", "--set",
                          "k=1", "--set", "keep=0.5", "--bench-rounds", "0", "--max-new-tokens", "3",
                          "--out", str(tmp_path / "r.json")], capsys)  # fmt: skip
    # The reference: the processor's own chat format written out by hand, generate() on the patched model.
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    patch = tokenprune.apply(model, "fastv", k=1, keep=0.5)
    exact, soft = 0.0, 0.0
    for i, (question, answer) in enumerate(QUESTIONS):
        inputs = processor(images=picture(100 + i), text=f"<image> {question} answer :", return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        new = out[0, inputs["input_ids"].shape[1] :]
        said = " ".join(processor.tokenizer.decode(new, skip_special_tokens=True).split())
        refs = [answer] if isinstance(answer, str) else answer
        exact += said in refs
        if len(refs) == 1:
            soft += said == refs[0]
        else:  # the VQA formula: leave each reference out in turn, min(1, matches among the others / 3)
            others = [sum(o == said for j, o in enumerate(refs) if j != i) for i in range(len(refs))]
            soft += sum(min(1.0, m / 3) for m in others) / len(refs)
    patch.remove()
    assert result["questions"] == 4 and result["accuracy"] == exact / 4
    assert result["vqa_accuracy"] == pytest.approx(soft / 4)
    assert result["tokens_per_layer_first_prompt"][1][0] < result["tokens_per_layer_first_prompt"][0][0]
    assert "| fastv k=1 keep=0.5 | accuracy" in stdout and "tokens per layer:" in stdout


def test_segmentation_folder_layout_is_checked(tmp_path):
    from tokenprune.data import DatasetLayoutError, ImageReadError
    from tokenprune.measure.layouts import SegmentationFolder

    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"needs images/ and labels/.*\nExpected layout:\n(.|\n)*labels/"):
        SegmentationFolder(tmp_path, transform=None)
    (tmp_path / "labels").mkdir()
    picture(0).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(DatasetLayoutError, match=r"no labels/<name>.png: \['a.jpg'\]"):
        SegmentationFolder(tmp_path, transform=None)
    picture(1).save(tmp_path / "labels" / "a.png")  # RGB: not class indices
    with pytest.raises(ImageReadError, match="labels must be PNG class indices"):
        SegmentationFolder(tmp_path, transform=None)
    Image.fromarray(torch.tensor([[0, 1], [255, 2]], dtype=torch.uint8).numpy()).save(tmp_path / "labels" / "a.png")
    dataset = SegmentationFolder(tmp_path, transform=lambda im: torch.zeros(3))
    assert dataset[0][1].tolist() == [[0, 1], [255, 2]] and len(dataset) == 1


def test_wrong_layouts_missing_files_and_unreadable_images_are_clear_errors(vit_checkpoint, tmp_path):
    _, safetensors, _ = vit_checkpoint
    base = ["eval", "--model", "timm:test_vit", "--checkpoint", str(safetensors), "--img-size", "64",
            "--bench-rounds", "0", "--labels", "folders", "--data"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"does not exist.*\nExpected layout:\n  <root>/ .*\n    <class_a>/"):
        main([*base, str(tmp_path / "nowhere")])
    (tmp_path / "flat").mkdir()
    picture(0).save(tmp_path / "flat" / "x.png")
    with pytest.raises(SystemExit, match="holds images .* but no class folders"):
        main([*base, str(tmp_path / "flat")])
    data = image_folder(tmp_path / "data")
    (tmp_path / "animals.txt").write_text("cat\ndog\n")
    with pytest.raises(SystemExit, match=r"class folders \['fox'\] .* match none of the model's 2 labels"):
        main([*base[:-3], "--labels", str(tmp_path / "animals.txt"), "--data", str(data)])
    with pytest.raises(SystemExit, match="model names no labels.*--labels FILE or --labels folders"):
        main([*base[:-3], "--data", str(data)])
    (data / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"cannot read image .*broken.png"):
        main([*base, str(data)])
    with pytest.raises(SystemExit, match="random weights: accuracy on a dataset needs trained weights"):
        main(["eval", "--model", "timm:test_vit", "--img-size", "64", "--data", str(data), "--bench-rounds", "0"])


def test_bad_checkpoints_are_refused_by_name(tmp_path):
    import argparse

    torch.save({"weights": argparse.Namespace(code="any pickled object")}, tmp_path / "pickled.pt")
    with pytest.raises(SystemExit, match="weights_only=True"):
        main(["eval", "--model", "timm:test_vit", "--checkpoint", str(tmp_path / "pickled.pt"), "--bench-rounds", "0"])
    with pytest.raises(SystemExit, match="checkpoint .*missing.pt not found"):
        main(["eval", "--model", "timm:test_vit", "--checkpoint", str(tmp_path / "missing.pt"), "--bench-rounds", "0"])
    torch.save({"head.weight": torch.zeros(3, 8)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match=r"does not fit timm 'test_vit': missing \["):
        main(["eval", "--model", "timm:test_vit", "--checkpoint", str(tmp_path / "other.pt"), "--bench-rounds", "0"])


def test_vqa_jsonl_format_is_checked_line_by_line(tmp_path):
    from tokenprune.data import DatasetLayoutError
    from tokenprune.measure.layouts import load_vqa_jsonl

    good = vqa_jsonl(tmp_path)
    rows = load_vqa_jsonl(good)
    assert [r["answer"] for r in rows] == [a for _, a in QUESTIONS] and Path(rows[0]["image"]).is_absolute()
    cases = {
        '{"image": "images/0.png", "question": "q"}': r"line 1 needs keys image, question, answer",
        "not json": r"line 1 is not JSON",
        '{"image": "images/none.png", "question": "q", "answer": "a"}': r"line 1: image .*none.png not found",
        '{"image": "images/0.png", "question": "q", "answer": []}': r"answer must be a string or a non-empty list",
    }
    for line, message in cases.items():
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(DatasetLayoutError, match=message + r"(.|\n)*Expected layout:(.|\n)*questions.jsonl"):
            load_vqa_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        load_vqa_jsonl(tmp_path / "missing.jsonl")


def test_unknown_model_values_say_what_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    accepted = "--model takes a zoo name .* timm:<architecture>"
    cases = [("no_such_model", "nor a timm architecture"), ("timm:", "no architecture after 'timm:'"),
             (str(tmp_path / "missing"), "no such directory"), (str(tmp_path), "has no config.json")]  # fmt: skip
    for value, why in cases:
        with pytest.raises(SystemExit, match=f"unknown model .*{why}.*{accepted}"):
            main(["eval", "--model", value, "--bench-rounds", "0"])
    with pytest.raises(SystemExit, match="not in the local Hugging Face cache .*--allow-download"):
        main(["eval", "--model", "nobody-tokenprune/not-a-model", "--bench-rounds", "0"])
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(SystemExit, match=r"\['BertModel'\] is neither an image classifier"):
        main(["eval", "--model", str(tmp_path), "--bench-rounds", "0"])


def test_method_accepts_variants_and_names_the_valid_ones(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKENPRUNE_DATA", raising=False)  # a dataset would stop a random-weight model first
    with pytest.raises(SystemExit, match=r"unknown method 'nope' for a vit model; valid: \["):
        main(["eval", "--model", "timm:test_vit", "--img-size", "64", "--method", "nope", "--bench-rounds", "0"])


def test_zoo_segmenter_scores_an_images_and_labels_folder(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    picture(0, size=48).save(tmp_path / "images" / "street.png")
    label = torch.randint(0, 11, (24, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    label[0] = 255  # ignored
    Image.fromarray(label.numpy()).save(tmp_path / "labels" / "street.png")
    result, stdout = run(["eval", "--model", "vit-s14-camvid", "--data", str(tmp_path), "--method", "none",
                          "--batch-size", "1", "--out", str(tmp_path / "r.json")], capsys)  # fmt: skip
    assert result["images"] == 1 and 0 <= result["miou"] <= 1 and str(tmp_path) in result["data"]
    assert "| none | miou " in stdout


def test_timm_imagenet_checkpoints_match_wnid_or_name_folders(tmp_path):
    import timm
    from safetensors.torch import save_file

    from tokenprune.measure.layouts import map_classes
    from tokenprune.measure.models import load_classifier, parse_model

    model = timm.create_model("test_vit", pretrained=False, img_size=64)  # 1000 ImageNet classes
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "in1k.safetensors"))
    loaded = load_classifier(parse_model("timm:test_vit"), 64, str(tmp_path / "in1k.safetensors"))
    assert loaded.labels[0][:1] == ["n01440764"] and "tench" in loaded.labels[0]
    assert map_classes(["n01443537", "tench"], loaded.labels, 1000, tmp_path) == {"n01443537": 1, "tench": 0}
