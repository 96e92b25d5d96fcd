"""``--data`` in the standard layouts, checked, with errors that draw the expected layout.

* classification, an ImageFolder: ``root/<class>/<image>``; class folders are matched to the model's logits by
  its labels (HF ``id2label``, timm/zoo wnids and class names, case and ``_``/space insensitive), by a
  ``--labels`` file (one label per line, line i = logit i), or ``--labels folders`` (the sorted folder names are
  the logits' order, as torchvision's ``ImageFolder`` trains them);
* segmentation: ``root/images/<name>.{jpg,png}`` + ``root/labels/<name>.png`` (class indices per pixel; values
  outside the model's classes, e.g. 255, are ignored);
* VQA: a JSONL file, one ``{"image": "<path relative to the file>", "question": "...", "answer": "..." |
  ["...", ...]}`` per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenprune.data import IMAGE_EXTENSIONS, DatasetLayoutError, ImageFolderDataset, ImageReadError

IMAGE_FOLDER_LAYOUT = """\
  <root>/                <- --data
    <class_a>/
      image_0001.jpg     (.jpg/.jpeg/.png)
      ...
    <class_b>/
      ...
  class folders are matched to the model's labels (id2label / wnid / class name), or pass --labels FILE
  (one label per line, line i = logit i) or --labels folders (sorted folder names = logit order)"""

SEGMENTATION_LAYOUT = """\
  <root>/                <- --data
    images/
      <name>.jpg         (.jpg/.jpeg/.png)
    labels/
      <name>.png         (same name; one class index per pixel, mode L/P/I; other values, e.g. 255, ignored)"""

VQA_LAYOUT = """\
  questions.jsonl        <- --data; one JSON object per line:
    {"image": "images/0001.png", "question": "what color is the shape?", "answer": "blue"}
    {"image": "images/0002.png", "question": "...", "answer": ["yes", "yes", "no"]}
  image paths are relative to the .jsonl file (or absolute)"""


def _error(message: str, layout: str) -> DatasetLayoutError:
    return DatasetLayoutError(f"{message}\nExpected layout:\n{layout}")


def _key(label: str) -> str:
    return " ".join(label.lower().replace("_", " ").split())


def read_labels_file(path: str | os.PathLike[str]) -> list[list[str]]:
    """``--labels FILE``: one label per line (line i = logit i); ``a, b`` lists synonyms of one logit."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--labels file {path} not found (one label per line, line i = logit i)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return [[name.strip() for name in line.split(",")] for line in lines]


class ImageFolder(ImageFolderDataset):
    """``root/<class>/<image>`` with every class folder mapped to the model's logit index.

    Attributes:
        classes: The class folder names, sorted.
        targets: The logit index of each sample.
        mapping: Folder name -> logit index.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None,
        labels: list[list[str]] | None,
        num_logits: int | None = None,
        limit: int | None = None,
    ) -> None:
        root = Path(root).expanduser().resolve()  # "." has no name to split on
        if not root.is_dir():
            raise _error(f"data folder {root} does not exist.", IMAGE_FOLDER_LAYOUT)
        loose = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if loose and not any(p.is_dir() for p in root.iterdir()):
            raise _error(f"{root} holds images ({loose[:3]} ...) but no class folders.", IMAGE_FOLDER_LAYOUT)
        try:
            super().__init__(root.parent, root.name, transform=transform, limit=limit, name=root.name)
        except DatasetLayoutError as error:  # its message draws the named-dataset layout: redraw ours
            raise _error(str(error).split("\nExpected layout:")[0], IMAGE_FOLDER_LAYOUT) from None
        self.mapping = map_classes(self.classes, labels, num_logits, root)
        self.samples = [(path, self.mapping[self.classes[label]]) for path, label in self.samples]
        self.targets = [label for _, label in self.samples]


def map_classes(
    folders: list[str], labels: list[list[str]] | None, num_logits: int | None, root: Path
) -> dict[str, int]:
    """Folder name -> logit index (see the module docstring).

    Raises:
        DatasetLayoutError: A folder matches no label (or several), or the model has no labels to match.
    """
    if labels == [["folders"]]:  # --labels folders
        if num_logits is not None and len(folders) > num_logits:
            raise _error(f"{len(folders)} class folders in {root} but the model has {num_logits} outputs.",
                         IMAGE_FOLDER_LAYOUT)  # fmt: skip
        return {folder: i for i, folder in enumerate(folders)}
    if not labels:
        raise _error(
            f"the model names no labels (no id2label / label names), so the class folders of {root} cannot be "
            "matched to its outputs: pass --labels FILE or --labels folders.",
            IMAGE_FOLDER_LAYOUT,
        )
    index: dict[str, set[int]] = {}
    for i, names in enumerate(labels):
        for name in names:
            index.setdefault(_key(name), set()).add(i)
    mapping, unmatched = {}, []
    for folder in folders:
        hits = index.get(_key(folder), set())
        if len(hits) == 1:
            mapping[folder] = next(iter(hits))
        else:
            unmatched.append(folder)
    if unmatched:
        shown = ", ".join("/".join(names) for names in labels[:8]) + (" ..." if len(labels) > 8 else "")
        raise _error(
            f"class folders {unmatched[:10]} of {root} match none of the model's {len(labels)} labels (e.g. {shown}).",
            IMAGE_FOLDER_LAYOUT,
        )
    return mapping


class SegmentationFolder:
    """``root/images/<name>.<ext>`` + ``root/labels/<name>.png``; ``dataset[i] = (image tensor, (H, W) int64)``."""

    def __init__(
        self, root: str | os.PathLike[str], transform: Callable[[Any], torch.Tensor], limit: int | None = None
    ) -> None:
        root = Path(root).expanduser()
        self.root, self.transform = root, transform
        if not (root / "images").is_dir() or not (root / "labels").is_dir():
            have = sorted(p.name for p in root.iterdir())[:10] if root.is_dir() else "nothing (missing)"
            raise _error(f"{root} needs images/ and labels/ folders (it has {have}).", SEGMENTATION_LAYOUT)
        images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise _error(f"no images in {root / 'images'}.", SEGMENTATION_LAYOUT)
        missing = [p.name for p in images if not (root / "labels" / f"{p.stem}.png").is_file()]
        if missing:
            raise _error(f"{len(missing)} images have no labels/<name>.png: {missing[:5]}.", SEGMENTATION_LAYOUT)
        self.images = images[:limit] if limit is not None else images
        self.names = [p.stem for p in self.images]
        self.label(0)  # the first label map is checked now: a colour PNG fails before any model runs

    def __len__(self) -> int:
        return len(self.images)

    def label(self, index: int) -> torch.Tensor:
        """Label map ``index`` as int64 ``(H, W)``.

        Raises:
            ImageReadError: Unreadable, or a colour image instead of class indices.
        """
        import numpy as np
        from PIL import Image

        path = self.root / "labels" / f"{self.names[index]}.png"
        try:
            with Image.open(path) as im:
                if im.mode not in ("L", "P", "I", "I;16"):
                    raise ImageReadError(
                        f"{path} is a {im.mode} image; labels must be PNG class indices (mode L, P or I), one per pixel"
                    )
                return torch.from_numpy(np.array(im, dtype=np.int64))
        except (OSError, ValueError, SyntaxError) as error:
            raise ImageReadError(f"cannot read label {path}: {type(error).__name__}: {error}") from error

    def load_image(self, index: int):  # -> PIL.Image.Image
        from tokenprune.measure.accuracy import load_image

        try:
            return load_image(self.images[index])
        except ValueError as error:
            raise ImageReadError(str(error)) from error

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.load_image(index)), self.label(index)


def load_vqa_jsonl(path: str | os.PathLike[str], limit: int | None = None) -> list[dict[str, Any]]:
    """VQA rows ``{"index", "question", "answer" (str or list), "image" (absolute path)}`` from a JSONL file.

    Every line is checked (valid JSON, the three keys, the image file exists) before anything runs.

    Raises:
        DatasetLayoutError: A line breaks the format; the message names the line and shows the format.
    """
    path = Path(path).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        what = "does not exist" if not path.exists() else "is not a .jsonl file"
        raise _error(f"VQA data {path} {what}.", VQA_LAYOUT)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise _error(f"{where} is not JSON ({error}).", VQA_LAYOUT) from None
        if not isinstance(item, dict) or not {"image", "question", "answer"} <= set(item):
            keys = sorted(item) if isinstance(item, dict) else type(item).__name__
            raise _error(f"{where} needs keys image, question, answer (has {keys}).", VQA_LAYOUT)
        answer = item["answer"]
        if not (
            isinstance(answer, str) or (isinstance(answer, list) and answer and all(isinstance(a, str) for a in answer))
        ):
            raise _error(f"{where}: answer must be a string or a non-empty list of strings.", VQA_LAYOUT)
        image = Path(item["image"]).expanduser()
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise _error(f"{where}: image {image} not found.", VQA_LAYOUT)
        rows.append({"index": len(rows), "question": str(item["question"]), "answer": answer, "image": str(image)})
    if not rows:
        raise _error(f"{path} holds no questions.", VQA_LAYOUT)
    return rows[:limit] if limit else rows
