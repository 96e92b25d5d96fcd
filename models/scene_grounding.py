"""Train-time word-region alignment for ``llava-scenes``: an auxiliary loss on where naming words look.

A decoder trained from scratch on 576 visual tokens sits long on a plateau where it answers from the question
alone: the answer head cannot use an object's features before attention finds the object, and attention gets no
gradient towards the object before the head can use what it finds. Grounded pretraining (GLIP's word-region
alignment, attention supervision in VQA) breaks that loop with a direct signal; the scene generator knows every
object's box, so the train split has that signal for free. The shipped model is unchanged (a standard LLaVA);
only training adds this loss.

What is supervised: at one decoder layer, ``heads`` query heads of every *naming word* of a question put their
attention mass on the patches of what the word names (``-log`` of the mass on those patches). Naming words are a
shape after a colour or a size (``the blue triangle``, ``the small star``: that object), ``shapes`` after a colour
and a plural shape (``red shapes``, ``circles``: every such object) and ``written`` (the text plate). A word that
names nothing in the scene (``is there a blue triangle?`` -> no) is not supervised. The answer's own rows (the
``answer :`` token FastV ranks by) are never supervised, so the loss shapes where question words look, not what
the last prompt token attends to.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from tokenprune.zoo import scenes as S

PATCH = 14
GRID = S.SIZE // PATCH  # 24 patches a side
SIZE_NAMES = {name for name, _, _ in S.SIZES}


def box_patches(box: tuple[int, int, int, int]) -> list[int]:
    """Indices (row-major, 0..575) of the 14-px patches a pixel box ``(x0, y0, x1, y1)`` overlaps."""
    x0, y0, x1, y1 = box
    cols = range(max(0, x0 // PATCH), min(GRID - 1, (x1 - 1) // PATCH) + 1)
    rows = range(max(0, y0 // PATCH), min(GRID - 1, (y1 - 1) // PATCH) + 1)
    return [r * GRID + c for r in rows for c in cols]


def word_regions(scene: S.Scene, words: list[str]) -> list[tuple[int, list[int]]]:
    """``(index in words, sorted patch indices)`` for every word of a question that names something in ``scene``."""
    out = []
    for i, word in enumerate(words):
        before = words[i - 1] if i > 0 else ""
        boxes: list[tuple[int, int, int, int]] = []
        if word in S.SHAPES and before in S.COLOURS:
            boxes = [o.box for o in scene.objects if o.shape == word and o.colour == before]
        elif word in S.SHAPES and before in SIZE_NAMES:
            boxes = [o.box for o in scene.objects if o.shape == word and o.size == before]
        elif word == "shapes" and before in S.COLOURS:
            boxes = [o.box for o in scene.objects if o.colour == before]
        elif word.endswith("s") and word[:-1] in S.SHAPES:
            boxes = [o.box for o in scene.objects if o.shape == word[:-1]]
        elif word == "written" and scene.text_box is not None:
            boxes = [scene.text_box]
        if boxes:
            out.append((i, sorted({p for box in boxes for p in box_patches(box)})))
    return out


class AttentionGrounding:
    """Captures one layer's attention inputs during the forward and scores chosen query rows against patches.

    ``with grounding.capture(): forward`` keeps what the layer itself computed: its query and key projections
    (B, T, heads * d) and rotary ``(cos, sin)`` (B, T, d); :meth:`loss` then rebuilds, for the N supervised rows
    only, the first ``heads`` heads' attention over every key the row may see (``mask``), as the layer's own
    softmax does (SDPA returns no weights, so they are not there to take).
    """

    def __init__(self, layer: nn.Module, heads: int):
        self.attention, self.heads = layer.self_attn, heads
        config = self.attention.config
        self.n_heads, self.n_kv = config.num_attention_heads, config.num_key_value_heads
        if not 1 <= heads <= self.n_heads:
            raise ValueError(f"grounding heads must be 1..{self.n_heads}, got {heads}")
        self.captured: dict[str, torch.Tensor] = {}

    @contextmanager
    def capture(self):
        def keep(name):
            def hook(module, args, out):
                self.captured[name] = out

            return hook

        def keep_rotary(module, args, kwargs):
            self.captured["cos"], self.captured["sin"] = kwargs["position_embeddings"]

        handles = [
            self.attention.q_proj.register_forward_hook(keep("q")),
            self.attention.k_proj.register_forward_hook(keep("k")),
            self.attention.register_forward_pre_hook(keep_rotary, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def loss(self, batch_rows: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor):
        """Mean ``-log`` attention mass on ``targets`` over the N rows and the supervised heads.

        Args:
            batch_rows, rows: (N,) batch index and sequence position of each supervised word.
            mask: (B, 1, T, T) boolean, True where a query may see a key (the packed rows' mask).
            targets: (N, T) boolean, True at the keys (image positions) the word names.
        """
        c = self.captured
        d = self.attention.head_dim
        kv_of = torch.arange(self.heads) // (self.n_heads // self.n_kv)  # (h,) the kv head of each query head
        q = c["q"][batch_rows, rows].view(-1, self.n_heads, d)[:, : self.heads].float()  # (N, h, d)
        cos, sin = c["cos"].float(), c["sin"].float()  # (B, T, d)
        q = q * cos[batch_rows, rows][:, None] + rotate_half(q) * sin[batch_rows, rows][:, None]
        k = c["k"].view(*c["k"].shape[:2], self.n_kv, d).float()  # (B, T, kv, d)
        k = k * cos[:, :, None] + rotate_half(k) * sin[:, :, None]
        k = k[batch_rows][:, :, kv_of]  # (N, T, h, d)
        logits = torch.einsum("nhd,nthd->nht", q, k) * self.attention.scaling  # (N, h, T)
        logits = logits.masked_fill(~mask[batch_rows, 0, rows][:, None], float("-inf"))
        mass = (logits.softmax(-1) * targets[:, None]).sum(-1)  # (N, h)
        return -(mass.clamp_min(1e-6)).log().mean()


def supervised_rows(
    regions: list[list[tuple[int, list[int]]]], length: int, image_start: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The supervised rows of a packed batch: ``(batch_rows, rows)`` (N,) and ``targets`` (N, length).

    Args:
        regions: per batch row, ``(position in the packed row, patch indices)`` of each naming word.
        length: the packed length T; ``image_start``: the position of the first image token.
    """
    flat = [(r, position, patches) for r, row in enumerate(regions) for position, patches in row]
    targets = torch.zeros(len(flat), length, dtype=torch.bool)
    for n, (_, _, patches) in enumerate(flat):
        targets[n, torch.tensor(patches) + image_start] = True
    batch_rows = torch.tensor([r for r, _, _ in flat], dtype=torch.long)
    return batch_rows, torch.tensor([p for _, p, _ in flat], dtype=torch.long), targets
