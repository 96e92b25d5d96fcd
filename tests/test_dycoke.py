"""``dycoke`` (stage 1, token temporal merging) on the videos of tiny random Qwen2-VL / 2.5-VL / 3-VL / 3.5 and
LLaVA-OneVision.

The shared matrix runs dycoke with its identity options only (images keep every token); the reducing checks
run here on videos. Qwen: a video of grid ``(6, 4, 8)`` reaches the LLM as 6 frames of 8 tokens (windows of 4:
frames 0-3 and 4-5), one of ``(3, 4, 8)`` as 3 frames, an image ``(1, 8, 8)`` as 16 tokens. LLaVA-OneVision:
every video is 6 frames of 2 x 2 pooled tokens and a newline (videos of one batch share a frame count), an
image the wide one of the family case (a 16-token base grid, a 32-token high-res grid and 4 newlines).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import tokenprune
from tests.helpers.vlm_families import (
    OV_IMAGE,
    OV_PLACEHOLDERS,
    OV_VIDEO,
    OV_WIDE,
    QWEN_IMAGE,
    QWEN_VIDEO,
    families,
    ov_images,
    padded,
    qwen3_prompt,
    qwen_inputs,
    qwen_prompt,
)
from tests.test_hf_qwen2_vl import PATCH_DIM, rope_positions
from tests.vlm_checks import (
    assert_batch_rows_equal_alone,
    assert_batched_generate_equals_alone,
    assert_remove_restores,
    assert_zero_reduction_exact,
)
from tokenprune.methods.dycoke import reference_frames

FAMILIES = {
    "qwen2": "qwen2-vl",
    "qwen2.5": "qwen2.5-vl",
    "qwen3": "qwen3-vl",
    "qwen3.5": "qwen3.5",
    "onevision": "llava-onevision",
}
QWEN = [f for f in FAMILIES if f.startswith("qwen")]
#: Per sample: text before, [(kind, grid (t, h, w) in patches, pixel seed), ...], text after.
MEDIA = {
    "long": ([1, 5], [("video", (6, 4, 8), 0)], [7, 8, 9, 10]),
    "short": ([1, 11, 4], [("video", (3, 4, 8), 3)], [12, 13, 14, 15, 16]),
    "mixed": ([1, 6], [("image", (1, 8, 8), 20), ("video", (6, 4, 8), 21)], [7, 8, 9]),
    "image": ([1, 5], [("image", (1, 8, 8), 1)], [7, 8]),
}
FRAME = 8  # tokens per video frame (Qwen)
OV_FRAMES, OV_FRAME = 6, 4  # LLaVA-OneVision: frames per video, tokens per frame
SPANS = {"qwen": [[48], [16, 48]], "onevision": [[24], [16, 32, 24]]}  # of ["long", "mixed"]


def frame_tokens(family: str) -> int:
    return OV_FRAME if family == "onevision" else FRAME


def ids_of(family: str) -> tuple[int, int]:
    """``(image, video)`` placeholder ids."""
    return (OV_IMAGE, OV_VIDEO) if family == "onevision" else (QWEN_IMAGE, QWEN_VIDEO)


def prompt(family: str, name: str) -> list[int]:
    before, media, after = MEDIA[name]
    if family == "onevision":
        ids = list(before)
        for i, (kind, _, _) in enumerate(media):
            size = OV_PLACEHOLDERS[OV_WIDE] if kind == "image" else OV_FRAMES * OV_FRAME + 1
            ids += ([3] if i else []) + [OV_IMAGE if kind == "image" else OV_VIDEO] * size
        return ids + list(after)
    if family in ("qwen3", "qwen3.5"):  # per temporal slice: a timestamp, then its run of placeholders
        return qwen3_prompt(before, after, [(kind, grid) for kind, grid, _ in media])
    tokens = [QWEN_IMAGE if kind == "image" else QWEN_VIDEO for kind, _, _ in media]
    return qwen_prompt(before, after, [grid for _, grid, _ in media], tokens)


def inputs(family: str, names: list[str], side: str = "left") -> dict:
    ids, mask = padded([prompt(family, n) for n in names], side)
    if family == "onevision":
        out = {"input_ids": ids, "attention_mask": mask}
        media = [(kind, seed) for name in names for kind, _, seed in MEDIA[name][1]]
        images = [ov_images([OV_WIDE], seed) for kind, seed in media if kind == "image"]
        videos = [torch.randn(1, OV_FRAMES, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for k, s in media]
        videos = [v for v, (kind, _) in zip(videos, media, strict=True) if kind == "video"]
        if images:
            out |= {key: torch.cat([image[key] for image in images]) for key in ("pixel_values", "image_sizes")}
        if videos:
            out["pixel_values_videos"] = torch.cat(videos)  # (V, F, 3, 32, 32)
        return out
    media: dict[str, list] = {"image": [], "video": []}
    for name in names:
        for kind, (t, h, w), seed in MEDIA[name][1]:
            patches = torch.randn(t * h * w, PATCH_DIM, generator=torch.Generator().manual_seed(seed))
            media[kind].append(((t, h, w), patches))
    return qwen_inputs(ids, mask, media, "qwen2.5" if family == "qwen2.5" else "qwen2")  # as the families' cases


@functools.cache
def _built(family: str) -> torch.nn.Module:
    return families()[FAMILIES[family]].build()


def build(family: str) -> torch.nn.Module:
    return copy.deepcopy(_built(family))


def greedy(model, x: dict, steps: int = 3, **extra) -> torch.Tensor:
    return model.generate(**x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, **extra)


def reference_keep(frames: torch.Tensor, ratio: float, window: int) -> list[int]:
    """Kept tokens of one video ``frames`` ``(T, m, C)``, as flat indices, from the definition, in float64.

    Frame ``f`` is the ``i``-th of its window (``i = f % window``); ``i = 0``: the pivot, kept whole; otherwise it
    is compared with frame ``f - (i & -i)`` and keeps the ``round(m (1 - ratio))`` tokens least cosine-similar
    to the token at the same place there.
    """
    frames = frames.double()
    t, m, _ = frames.shape
    keep = int(m * (1 - ratio) + 0.5 + 1e-9)
    kept = []
    for f in range(t):
        i = f % window
        if i == 0:
            kept += [f * m + j for j in range(m)]
            continue
        other = frames[f - (i & -i)]
        cosine = [float(frames[f, j] @ other[j] / (frames[f, j].norm() * other[j].norm())) for j in range(m)]
        kept += [f * m + j for j in sorted(range(m), key=lambda j: cosine[j])[:keep]]
    return sorted(kept)


def video_positions(family: str, x: dict, b: int) -> torch.Tensor:
    """Input positions of sample ``b``'s video tokens, frame after frame (LLaVA-OneVision's newlines left out)."""
    video = (x["input_ids"][b] == ids_of(family)[1]).nonzero().squeeze(1)
    return video.view(-1, OV_FRAMES * OV_FRAME + 1)[:, :-1].flatten() if family == "onevision" else video


def llm_inputs(model, x: dict) -> torch.Tensor:
    """``(B, L, C)`` the unreduced input embeddings of the text model (the visual features in place)."""
    seen = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, k: seen.append(k["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad(), tokenprune.disabled(model):
        model(**x)
    handle.remove()
    return seen[0]


# ----------------------------------------------------------------------------- the rule, exactness first
def test_reference_frames_are_the_reference_codes():
    """Window 4: frames 1 and 2 against frame 0, frame 3 against frame 2 (dycole_ttm), every window alike."""
    assert reference_frames(8, 4).tolist() == [0, 0, 0, 2, 4, 4, 4, 6]
    assert reference_frames(6, 2).tolist() == [0, 0, 2, 2, 4, 4]
    assert reference_frames(9, 8).tolist() == [0, 0, 0, 2, 0, 4, 4, 6, 8]
    assert reference_frames(3, 1).tolist() == [0, 1, 2]  # every frame a pivot


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("options", [{"ratio": 0.0, "kv_ratio": 0.0}, {"ratio": 0.7, "window": 1, "kv_ratio": 0.0}])
def test_nothing_dropped_is_bit_exact_on_videos(family, options):
    model = build(family)
    patch = assert_zero_reduction_exact(model, inputs(family, ["long", "mixed"]), "dycoke", options, greedy)
    assert patch.state.spans == SPANS["onevision" if family == "onevision" else "qwen"]  # one span per video


@pytest.mark.parametrize("family", list(FAMILIES))
def test_images_keep_every_token(family):
    """An image is one frame: no temporal redundancy, every token stays and the outputs are bit-exact (the
    reducer still takes its merge path: ``state.merged``, nothing removed)."""
    model = build(family)
    x = inputs(family, ["image"])
    with torch.no_grad():
        expected, expected_tokens = model(**x).logits, greedy(model, x)
        patch = tokenprune.apply(model, "dycoke", ratio=0.7)
        got, tokens = model(**x).logits, greedy(model, x)
    assert torch.equal(got, expected) and torch.equal(tokens, expected_tokens)
    assert patch.state.num_tokens == x["input_ids"].shape[1]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_remove_restores_and_flops_are_counted(family):
    model = build(family)
    x = inputs(family, ["mixed"])
    assert_remove_restores(model, x, "dycoke", {"ratio": 0.5}, greedy)
    full = tokenprune.count_flops(model, x)
    assert full.analytic == pytest.approx(full.measured, rel=1e-9)  # the tower on every video frame counted
    patch = tokenprune.apply(model, "dycoke", ratio=0.5)
    reduced = tokenprune.count_flops(model, x)
    assert reduced.analytic == pytest.approx(reduced.measured, rel=1e-9)
    assert patch.adapter.flops_for(patch.state)["total"] == pytest.approx(reduced.measured, rel=1e-9)
    assert reduced.measured < full.measured


# ----------------------------------------------------------------------------- which tokens, where
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("ratio, window", [(0.5, 4), (0.7, 2), (1.0, 4), (0.3, 8)])
def test_kept_tokens_match_a_float64_reference(family, ratio, window):
    model = build(family)
    x = inputs(family, ["long", "mixed", "short"])
    embeds = llm_inputs(model, x)
    patch = tokenprune.apply(model, "dycoke", ratio=ratio, window=window)
    with torch.no_grad():
        model(**x)
    first = patch.state.index_in[0]  # (B, N0) input position of each token entering the LLM
    m = frame_tokens(family)
    for b in range(3):
        video = video_positions(family, x, b)  # frame after frame
        frames = embeds[b, video].view(-1, m, embeds.shape[-1])  # (T, m, C)
        expected = video[reference_keep(frames, ratio, window)].tolist()
        kept = [i for i in first[b].tolist() if i in set(video.tolist())]
        assert kept == expected, b
        image = (x["input_ids"][b] == ids_of(family)[0]).nonzero().squeeze(1).tolist()
        assert [i for i in first[b].tolist() if i in image] == image  # images whole
    pivots = -(-6 // window)
    assert patch.state.visual_per_layer()[0][0] == pivots * m + (6 - pivots) * int(m * (1 - ratio) + 0.5)


@pytest.mark.parametrize("family", QWEN)
def test_kept_tokens_keep_their_3axis_positions(family):
    """Every layer's (cos, sin) are the rotary embedding of get_rope_index's positions of the tokens it sees."""
    model = build(family)
    x = inputs(family, ["long", "mixed"])
    lm = model.model.language_model
    patch = tokenprune.apply(model, "dycoke", ratio=0.5)
    seen = []
    handles = [
        layer.base_layer.register_forward_pre_hook(
            lambda m, a, k: seen.append(k["position_embeddings"]), with_kwargs=True
        )
        for layer in lm.layers
    ]
    with torch.no_grad():
        model(**x)
    for handle in handles:
        handle.remove()
    state, positions = patch.state, rope_positions(model, x)  # (3, B, L) the model's own (t, h, w) positions
    assert state.reduced and state.spans == [[48], [16, 48]]
    for b in range(2):  # per frame: the pivots whole, the others half, each token at its own (t, h, w)
        video = (x["input_ids"][b] == QWEN_VIDEO).nonzero().squeeze(1).view(6, FRAME)
        kept = state.index_in[0][b]
        assert [int(torch.isin(kept, frame).sum()) for frame in video] == [8, 4, 4, 4, 8, 4]
    for layer, index in enumerate(state.index_in):
        gathered = positions.gather(-1, index.clamp(min=0).expand(3, *index.shape))  # (3, B, N_l)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), gathered)
        valid = (index >= 0)[..., None]
        assert torch.equal(torch.where(valid, seen[layer][0], 0), torch.where(valid, cos, 0)), layer
        assert torch.equal(torch.where(valid, seen[layer][1], 0), torch.where(valid, sin, 0)), layer


# ----------------------------------------------------------------------------- batches, generate
BATCHES = [("long", "short"), ("mixed", "image"), ("short", "mixed")]


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_samples_run_alone(family, side):
    model = build(family)
    patch = tokenprune.apply(model, "dycoke", ratio=0.6)
    for names in BATCHES:
        with torch.no_grad():
            batched = model(**inputs(family, list(names), side)).logits
        state = patch.state
        singles = [inputs(family, [n]) for n in names]
        lengths = [len(prompt(family, n)) for n in names]
        assert_batch_rows_equal_alone(model, patch, batched, state, singles, lengths, side)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_generate_equals_samples_alone(family):
    model = build(family)
    patch = tokenprune.apply(model, "dycoke", ratio=0.6)
    for names in BATCHES[:2]:
        singles = [inputs(family, [n]) for n in names]
        lengths = [len(prompt(family, n)) for n in names]
        assert_batched_generate_equals_alone(model, greedy, inputs(family, list(names)), singles, lengths)
        assert patch.state.reduced and patch.state.generated == 2


# ----------------------------------------------------------------------------- budgets and refusals
def test_flops_budget_is_solved_per_video_prompt():
    """flops=: the LLM prefill of a video prompt at the budget (closest reachable), a prompt
    with images only refused (nothing there to drop)."""
    model = build("qwen2")
    x = inputs("qwen2", ["long"])
    full = sum(row["flops"] for row in tokenprune.count_flops(model, x).layers)
    patch = tokenprune.apply(model, "dycoke", flops=0.8)
    got = sum(row["flops"] for row in tokenprune.count_flops(model, x).layers) / full
    assert patch.schedule is None and patch.state.reduced
    kept = (patch.state.visual_per_layer()[0][0] - 2 * FRAME) // 4  # tokens each of the 4 non-pivot frames keeps
    with pytest.raises(ValueError, match="valid budgets"), torch.no_grad():
        model(**inputs("qwen2", ["image"]))
    ids, mask = padded([qwen_prompt([1], [7], [(3, 8, 8)], [QWEN_VIDEO])])  # 48 tokens again: 3 frames of 16
    media = {"image": [], "video": [((3, 8, 8), torch.randn(192, PATCH_DIM))]}
    with pytest.raises(ValueError, match="had 6 frames before"), torch.no_grad():
        model(**qwen_inputs(ids, mask, media, "qwen2"))  # the solved plan of a 48-token span was for 6 frames
    patch.remove()
    # One token more or less per non-pivot frame moves 4 tokens (~7% of this prefill): the closest of those.
    for other in (kept - 1, kept + 1):
        patch = tokenprune.apply(model, "dycoke", ratio=1 - other / FRAME)
        cost = sum(row["flops"] for row in tokenprune.count_flops(model, x).layers) / full
        assert abs(got - 0.8) <= abs(cost - 0.8) and patch.state.visual_per_layer()[0][0] == 2 * FRAME + 4 * other
        patch.remove()
    assert abs(got - 0.8) < 0.04


def test_bad_options_and_models_are_refused():
    for bad in ({"window": 0}, {"window": 2.0}, {"ratio": 1.5}, {"ratio": -0.1}):
        with pytest.raises((TypeError, ValueError)):
            tokenprune.apply(build("qwen2"), "dycoke", **bad)
    for other in ("llava-llama", "llava-next-video"):  # no frame layout for a temporal method
        with pytest.raises(NotImplementedError, match="Qwen2-VL"):
            tokenprune.apply(families()[other].build(), "dycoke", ratio=0.5)
    llava = families()["llava-llama"].build()
    tokenprune.apply(llava, "dycoke", ratio=0.0).remove()  # nothing to lay out: accepted, unreduced


def test_an_image_and_a_video_of_one_size_are_refused():
    """Spans of equal size but different frame counts in one call: which is which is not known, so refused."""
    model = build("qwen2")
    ids, mask = padded([qwen_prompt([1], [7], [(1, 8, 8), (2, 4, 8)], [QWEN_IMAGE, QWEN_VIDEO])])
    media = {"image": [((1, 8, 8), torch.randn(64, PATCH_DIM))], "video": [((2, 4, 8), torch.randn(64, PATCH_DIM))]}
    tokenprune.apply(model, "dycoke", ratio=0.5)
    with pytest.raises(ValueError, match="different frame counts"), torch.no_grad():
        model(**qwen_inputs(ids, mask, media, "qwen2"))


# ----------------------------------------------------------------------------- stage 2: decode-time selection
def generate(model, x: dict, steps: int, **extra):
    """Greedy ``generate`` with its scores and cache (``return_dict_in_generate``)."""
    with torch.no_grad():
        return model.generate(
            **x,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            **extra,
        )


def selection(patch, out):
    """The decode selection (``DecodeKV``) of the cache ``out`` generated on."""
    return patch.adapter.reducer.sessions[out.past_key_values].decode_kv


def eligible_count(family: str, names: list[str], ratio: float) -> int:
    """Video tokens entering the LLM per sample (every sample here has one 6-frame video)."""
    m = frame_tokens(family)
    return 2 * m + 4 * int(m * (1 - ratio) + 0.5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stage2_selects_its_share_of_each_video_and_leaves_the_prefill_alone(family):
    model = build(family)
    x = inputs(family, ["long", "mixed"])
    patch = tokenprune.apply(model, "dycoke", ratio=0.5, kv_ratio=0.0)
    plain = generate(model, x, 1)
    patch.remove()
    patch = tokenprune.apply(model, "dycoke", ratio=0.5, kv_ratio=0.5)
    out = generate(model, x, 3)
    assert torch.equal(out.scores[0], plain.scores[0])  # the prefill: stage 1 only
    kv = selection(patch, out)
    videos = eligible_count(family, ["long"], 0.5)
    assert kv.eligible.sum(dim=1).tolist() == [videos, videos]  # the videos' entries only, not the image's
    assert kv.counts.tolist() == [videos // 2] * 2
    assert kv.selected.sum(dim=1).tolist() == [videos // 2] * 2 and not bool((kv.selected & ~kv.eligible).any())
    state = patch.state
    first = state.index_in[0]  # (B, N0): the prompt slots hold these input positions
    for b in range(2):
        video = set(video_positions(family, x, b).tolist())
        assert [int(i) in video for i in first[b][kv.eligible[b]]] == [True] * videos


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stage2_ranks_by_the_new_tokens_attention_at_the_ranking_layer(family):
    """ratio=0 (nothing dropped before the LLM): the first decode step's scores are the unpatched eager model's
    attention from that token at the ranking layer, head-averaged, and the selection is their top ``keep``."""
    model = build(family)
    x = inputs(family, ["long", "mixed"])
    patch = tokenprune.apply(model, "dycoke", ratio=0.0, kv_ratio=0.6)
    out = generate(model, x, 2)  # one decode step
    kv = selection(patch, out)
    ranking = kv.policy.layer
    patch.remove()
    reference = copy.deepcopy(model)
    reference.set_attn_implementation("eager")
    length = x["input_ids"].shape[1]
    full = dict(x, input_ids=out.sequences[:, :-1])  # the prompt and the token the decode step fed
    for key in ("attention_mask", "mm_token_type_ids"):  # per-token inputs: one more entry (valid / text)
        if key in x:
            full[key] = torch.cat([x[key], torch.full_like(x[key][:, :1], int(key == "attention_mask"))], dim=1)
    with torch.no_grad():
        attentions = reference(**full, output_attentions=True).attentions
    probs = attentions[ranking][:, :, -1].float().mean(dim=1)  # (B, L + 1)
    expected = torch.where(kv.eligible, probs[:, :length], 0.0)
    torch.testing.assert_close(kv.scores, expected, rtol=1e-4, atol=1e-6)
    for b in range(2):
        top = expected[b].topk(int(kv.counts[b])).indices
        assert sorted(top.tolist()) == kv.selected[b].nonzero().squeeze(1).tolist()


def perturb_hooks(patch, model, which: str) -> list:
    """Pre-hooks on the layers after the ranking layer adding noise to the keys and values of the ``which``
    (``"skipped"`` or ``"selected"``) video entries of their cache at decode steps."""
    reducer = patch.adapter.reducer
    generator = torch.Generator().manual_seed(0)

    def hook(layer: int):
        def perturb(module, args, kwargs):
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            session = reducer.sessions.get(cache) if cache is not None else None
            if session is None or session.decode_kv is None or session.decode_kv.selected is None:
                return
            kv = session.decode_kv
            chosen = kv.eligible & (~kv.selected if which == "skipped" else kv.selected)  # (B, P)
            entries = cache.layers[layer]
            for name in ("keys", "values"):
                tensor = getattr(entries, name)  # (B, Hkv, K, D)
                noise = torch.randn(tensor[:, :, : chosen.shape[1]].shape, generator=generator)
                tensor[:, :, : chosen.shape[1]] += 10 * noise * chosen[:, None, :, None]

        return perturb

    lm = model.model.language_model
    ranking = patch.runtime.method.decode_selection().layer
    return [
        wrapper.base_layer.register_forward_pre_hook(hook(i), with_kwargs=True)
        for i, wrapper in enumerate(lm.layers)
        if i > ranking and wrapper.capture is not None
    ]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_stage2_skipped_entries_are_not_attended_after_the_ranking_layer(family):
    """The decode step's logits do not move when the skipped video entries' keys and values change in the later
    layers' caches (bit-exact), and do when the selected ones change."""
    model = build(family)
    x = inputs(family, ["long", "mixed"])
    patch = tokenprune.apply(model, "dycoke", ratio=0.5, kv_ratio=0.6)
    clean = generate(model, x, 2).scores[1]
    for which, moves in (("skipped", False), ("selected", True)):
        handles = perturb_hooks(patch, model, which)
        try:
            got = generate(model, x, 2).scores[1]
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(got, clean) != moves, which


@pytest.mark.parametrize("refresh, expected", [(2.0, [4, 4]), (-2.0, [1, 1])])
def test_stage2_reselects_where_the_attention_changed(refresh, expected):
    """kv_refresh above every cosine similarity: every step reselects; below: only the first."""
    model = build("qwen2")
    patch = tokenprune.apply(model, "dycoke", ratio=0.5, kv_refresh=refresh)
    out = generate(model, inputs("qwen2", ["long", "mixed"]), 5)  # four decode steps
    assert selection(patch, out).refreshes.tolist() == expected


@pytest.mark.parametrize("family", ["qwen2", "qwen3.5", "onevision"])
def test_stage2_beams_and_batches_equal_samples_alone(family):
    model = build(family)
    tokenprune.apply(model, "dycoke", ratio=0.5, kv_ratio=0.6)
    names = ["long", "short"]
    singles = [inputs(family, [n]) for n in names]
    lengths = [len(prompt(family, n)) for n in names]
    for beams in (1, 2):
        search = functools.partial(greedy, steps=4, num_beams=beams)
        assert_batched_generate_equals_alone(model, search, inputs(family, names), singles, lengths)


def test_stage2_options_are_checked():
    for bad in ({"kv_ratio": 1.5}, {"kv_ratio": -0.1}, {"kv_layer": 0}, {"kv_layer": 2.0}, {"kv_refresh": "a"}):
        with pytest.raises((TypeError, ValueError)):
            tokenprune.apply(build("qwen2"), "dycoke", **bad)
    with pytest.raises(ValueError, match="valid kv_layer values are 1.."):
        tokenprune.apply(build("qwen2"), "dycoke", kv_layer=99)
    tokenprune.apply(build("qwen2"), "dycoke", kv_layer=99, kv_ratio=0.0).remove()  # stage 2 off: not read
