"""``models/train_llava_scenes.py``: the tokenizer spells every answer exactly, and a packed row (all questions of a
scene after one image prefix) computes what each question's own unpacked sequence computes."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))

import train_llava_scenes as T  # noqa: E402

from tokenprune.zoo import scenes as S  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    from llava_builders import build_processor, build_tokenizer

    return build_processor(build_tokenizer(T.vocabulary(), spell_numbers=True), T.L.IMAGE_SIZE)


def test_every_answer_and_test_question_fits_the_vocabulary(processor):
    tokenizer = processor.tokenizer
    for answer in S.answer_vocabulary():
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == answer
        assert len(ids) == (len(answer) if answer.isdigit() else 1)  # numbers digit by digit, words whole
    for seed in S.split_scenes("test", 100):
        for q in S.questions_for(S.make_scene(seed)):
            question, answer = T.encode(tokenizer, q)  # raises on an unknown word
            assert answer[-1] == tokenizer.eos_token_id and question[-2:] == tokenizer("answer :")["input_ids"][1:]
    with pytest.raises(ValueError, match="does not fit"):
        T.encode(tokenizer, S.Question("count", "how many zebras are there?", "2"))


def test_the_processor_gives_576_placeholders(processor):
    from PIL import Image

    inputs = processor(
        images=Image.new("RGB", (336, 336)), text=T.L.prompt("is there a red star?"), return_tensors="pt"
    )
    image_id = processor.tokenizer.convert_tokens_to_ids(T.L.IMAGE)
    assert (inputs["input_ids"] == image_id).sum() == T.L.VISUAL_TOKENS == 576
    assert inputs["pixel_values"].shape == (1, 3, 336, 336)


def test_packed_rows_equal_each_question_alone(processor):
    from llava_builders import build_config
    from transformers import LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    tiny = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    config = build_config(tokenizer, tiny, spec=T.L)
    config.vision_config.num_hidden_layers = 1  # the tower is not run: features come as input
    model = LlavaForConditionalGeneration(config).eval()
    seeds = S.split_scenes("val", 2)
    rows = [[T.encode(tokenizer, q) for q in S.questions_for(S.make_scene(s))] for s in seeds]
    ids_of = (config.image_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id)
    features = torch.randn(2, T.L.VISUAL_TOKENS, 768)
    with torch.no_grad():
        ids, positions, mask, where, targets, question = T.pack(rows, *ids_of)
        packed = T.llava_logits(model, ids, positions, mask, features, where)  # (2, K, V)
        for r, row in enumerate(rows):
            for k, (q, a) in enumerate(row):
                alone = torch.tensor([[tokenizer.bos_token_id] + [config.image_token_id] * 576 + q + a])
                n = alone.shape[1]
                at = torch.arange(n - len(a) - 1, n - 1)[None]  # rows predicting the answer tokens and </s>
                expected = T.llava_logits(model, alone, torch.arange(n)[None], None, features[r : r + 1], at)[0]
                torch.testing.assert_close(packed[r][question[r] == k], expected, atol=1e-5, rtol=1e-5)
                assert torch.equal(targets[r][question[r] == k], torch.tensor(a))
    assert (question >= 0).sum() == sum(len(a) for row in rows for _, a in row)


def test_a_new_round_starts_from_the_exported_model(processor, tmp_path):
    """``--init``: an exported round (standardization folded, float16) loads back with the standardization
    undone for the next round's statistics, so the projector computes the same map on standardized input."""
    from llava_builders import build_config, save_pretrained
    from transformers import LlavaForConditionalGeneration

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = build_config(processor.tokenizer, {**tiny, "num_key_value_heads": 1}, spec=T.L)
    config.vision_config.num_hidden_layers = 1
    torch.manual_seed(0)
    trained, fresh = LlavaForConditionalGeneration(config).eval(), LlavaForConditionalGeneration(config).eval()
    x = torch.randn(4, 768) * torch.linspace(0.01, 10, 768) + 3  # raw tower channels of very different scales
    mean, std = x.mean(0), x.std(0)
    before = trained.model.multi_modal_projector(((x - mean) / std)[None])
    with torch.no_grad():
        T.fold_standardization_(trained, mean, std)
    save_pretrained(trained, processor, tmp_path, {"train_command": "round 0"}, spec=T.L)
    other_mean, other_std = mean + 1, std * 2  # the next round's train scenes have their own statistics
    assert T.init_from_(fresh, tmp_path, other_mean, other_std) == ["round 0"]
    after = fresh.model.multi_modal_projector(((x - other_mean) / other_std)[None])
    torch.testing.assert_close(after, before, atol=2e-2, rtol=2e-3)  # float16 weights
    for name, value in T.llava_common.trained_state_dict(trained, T.L).items():
        if "multi_modal_projector.linear_1" not in name:
            torch.testing.assert_close(fresh.state_dict()[name], value.half().float())
    with pytest.raises(FileNotFoundError, match="llava-scenes.safetensors"):
        T.init_from_(fresh, REPO / "tokenprune" / "checkpoints" / "llava-easyvqa", mean, std)


def test_the_whole_recipe_runs_on_a_few_scenes(tmp_path):
    """Both stages end to end on 8 train and 4 val scenes (``--device cpu``, as a GPU run takes ``cuda``): feature
    shards on disk, two steps, the export with the command that reproduces it (a smaller decoder by
    ``--text-config``, kept in its config.json), and a rerun resumes from disk."""
    from safetensors import safe_open

    out = tmp_path / "out"
    argv = [
        *("--work-dir", str(tmp_path / "work"), "--out", str(out), "--device", "cpu", "--threads", "1"),
        *("--train-images", "8", "--val-images", "4", "--shard", "4", "--tower-batch", "4"),
        *("--epochs", "1", "--batch-size", "4", "--evals-per-epoch", "1", "--warmup-steps", "1"),
        *("--text-config", '{"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 8}'),
        *("--grounding-weight", "0.5"),  # the word-region loss runs inside the train step
    ]
    T.main(argv)
    assert sorted(p.name for p in (tmp_path / "work" / "features" / "train").iterdir()) == [
        "000000.safetensors",
        "000004.safetensors",
    ]
    meta = safe_open(str(out / T.L.WEIGHTS_NAME), "pt").metadata()
    assert meta["total_steps"] == "2" and meta["train_command"].endswith(shlex.join(argv))
    assert 0.0 <= json.loads(meta["val_exact_match"])["overall"] <= 1.0
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["num_hidden_layers"], text["num_key_value_heads"], text["hidden_size"]) == (2, 8, 256)
    model, _ = T.L.load_llava_scenes(out)  # the zoo loader builds the exported architecture
    assert len(model.model.language_model.layers) == 2
    T.main([*argv, "--stage", "train"])  # resumes at the last step: nothing to train, the same export
    assert safe_open(str(out / T.L.WEIGHTS_NAME), "pt").metadata()["total_steps"] == "2"

    import probe_llava_scenes  # the features diagnostic, on the same cached features

    probe = ["--work-dir", str(tmp_path / "work"), "--train-images", "8", "--val-images", "4", "--steps", "2"]
    probe_llava_scenes.main([*probe, "--batch-size", "8", "--threads", "1", "--out", str(tmp_path / "probe.json")])
    result = json.loads((tmp_path / "probe.json").read_text())
    assert result["steps"] == 2 and 0.0 <= result["val_exact_match"]["overall"] <= 1.0


def test_naming_words_point_at_what_they_name():
    import scene_grounding as G

    scene = next(s for s in map(S.make_scene, range(200)) if s.text_box is not None and len(s.objects) >= 3)
    for q in S.questions_for(scene):
        words = q.question.replace("?", " ?").replace(",", " ,").split()
        for index, patches in G.word_regions(scene, words):
            assert patches == sorted(set(patches)) and all(0 <= p < 576 for p in patches)
            word, before = words[index], words[index - 1]
            if word == "written":
                assert patches == G.box_patches(scene.text_box)
            elif word in S.SHAPES and before in S.COLOURS:  # a named object: its patches, none of the others'
                named = [o for o in scene.objects if (o.colour, o.shape) == (before, word)]
                assert set(patches) == {p for o in named for p in G.box_patches(o.box)}
    assert G.box_patches((0, 0, 14, 14)) == [0] and G.box_patches((14, 14, 29, 28)) == [25, 26]
    assert G.word_regions(scene, ["is", "there", "a", "zebra", "?"]) == []


def test_grounding_attention_equals_the_layers_own_softmax(processor):
    """The loss recomputes the supervised rows' attention from the captured layer input; it must be the
    attention the (eager) layer itself computes over the packed mask."""
    import scene_grounding as G
    from llava_builders import build_config
    from transformers import LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = build_config(tokenizer, {**tiny, "num_key_value_heads": 2}, spec=T.L)
    config.vision_config.num_hidden_layers = 1
    config.text_config._attn_implementation = "eager"
    model = LlavaForConditionalGeneration(config).eval()
    seeds = S.split_scenes("train", 2)
    rows = [[T.encode(tokenizer, q) for q in S.questions_for(S.make_scene(s))] for s in seeds]
    ids, positions, mask, where, _, _ = T.pack(rows, config.image_token_id, tokenizer.bos_token_id, 0)
    encoded = dict(zip(seeds, rows, strict=True))
    regions = T.scene_regions(seeds, encoded, tokenizer)
    batch_rows, at, targets = G.supervised_rows([regions[s] for s in seeds], ids.shape[1])
    assert len(at) > 0 and (targets.sum(-1) > 0).all() and not targets[:, 1 + 576 :].any()
    grounding = G.AttentionGrounding(model.model.language_model.layers[1], heads=3)
    weights = {}

    def keep_weights(module, args, out):
        weights["w"] = out[1]  # (B, heads, T, T)

    handle = model.model.language_model.layers[1].self_attn.register_forward_hook(keep_weights)
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))  # eager takes a float mask as is
    with torch.no_grad(), grounding.capture():
        T.llava_logits(model, ids, positions, additive, torch.randn(2, 576, 768), where)
    handle.remove()
    eager = weights["w"][batch_rows, :3, at]  # (N, 3, T) the layer's own attention of the supervised rows
    expected = -(eager * targets[:, None]).sum(-1).clamp_min(1e-6).log().mean()
    with torch.no_grad():
        got = grounding.loss(batch_rows, at, mask, targets)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grounding heads"):
        G.AttentionGrounding(model.model.language_model.layers[1], heads=5)


def test_online_features_are_the_cached_ones(tmp_path):
    """``--features online`` (the tower run as training goes, scenes rendered by worker processes) gives the
    decoder the numbers ``--stage cache`` stores, in the order of the batches asked for; and a whole online run
    trains and exports without writing any feature shard."""
    from llava_builders import build_image_processor

    tower, image_processor = T.build_tower(), build_image_processor(T.L.IMAGE_SIZE)
    seeds = S.split_scenes("val", 3)
    T.cache_scene_features(tower, image_processor, seeds, tmp_path / "val", shard=2, batch=2, bf16=False)
    cached = T.FeatureStore(tmp_path / "val", seeds)
    inline = T.OnlineFeatures(tower, image_processor, bf16=False, workers=0)
    rendered = T.OnlineFeatures(tower, image_processor, bf16=False, workers=1)
    batches = [seeds[2:], seeds[:2]]
    for want, a, b in zip(batches, inline.stream(batches), rendered.stream(batches), strict=True):
        assert torch.equal(a, cached[want]) and torch.equal(b, cached[want])
    mean, std = cached.statistics(seeds)
    torch.testing.assert_close(inline.statistics(seeds), (mean, std), rtol=0, atol=0)
    inline.mean, inline.std, cached.mean, cached.std = mean, std, mean, std
    assert torch.equal(inline[seeds], cached[seeds])
    assert cached[seeds].flatten(0, 1).mean(0).abs().max() < 1e-4  # standardized

    out = tmp_path / "out"
    argv = [
        *("--work-dir", str(tmp_path / "work"), "--out", str(out), "--features", "online", "--workers", "1"),
        *("--train-images", "4", "--val-images", "2", "--epochs", "1", "--batch-size", "2", "--threads", "1"),
        *("--evals-per-epoch", "1", "--warmup-steps", "1", "--text-config", '{"num_hidden_layers": 1}'),
    ]
    T.main(argv)
    assert not (tmp_path / "work" / "features").exists()
    assert (out / T.L.WEIGHTS_NAME).is_file()
    with pytest.raises(SystemExit, match="no cache stage"):
        T.main([*argv, "--stage", "cache"])
