"""Image-folder datasets laid out as ``<root>/<name>/<split>/<class>/<image>``.

The only dataset tokenprune knows by name is Imagenette (10 easy ImageNet classes)::

    from tokenprune.data import load_dataset
    ds = load_dataset("imagenette", "val", transform=transform, limit=100)
    img, label = ds[0]; ds.class_names[label]

The root is the argument, else ``$TOKENPRUNE_DATA``; it is the directory that *contains*
``imagenette/`` (passing the ``imagenette`` directory itself also works). Class order is
the sorted folder names (wnids), so label ``i`` means ``ds.classes[i]``; for a known
dataset the folder names must be exactly the expected ones, since a missing or extra
class would silently shift every label of a pretrained classifier.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

DATA_ENV = "TOKENPRUNE_DATA"
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLITS = ("train", "val")
LIMIT_SEED = 0

# wnid -> human-readable name, in sorted wnid (= label) order.
IMAGENETTE_CLASSES: dict[str, str] = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}

KNOWN_DATASETS: dict[str, dict[str, str]] = {"imagenette": IMAGENETTE_CLASSES}


class DatasetError(RuntimeError):
    """Base class for dataset problems."""


class DatasetLayoutError(DatasetError):
    """The dataset directory is missing or not laid out as ``<root>/<name>/<split>/<class>/<image>``."""


class ImageReadError(DatasetError):
    """An image file could not be decoded; the message names the file."""


def expected_layout(name: str = "imagenette", root: str | os.PathLike[str] | None = None) -> str:
    """Returns a text drawing of the directory layout the loader expects.

    Args:
        name: Dataset name (the folder under the root).
        root: Root to show; ``<root>`` when not given.

    Returns:
        A multi-line string.
    """
    classes = list(KNOWN_DATASETS.get(name, {}))
    first = classes[0] if classes else "<class_a>"
    second = classes[1] if len(classes) > 1 else "<class_b>"
    more = f"... ({len(classes)} class folders: {', '.join(classes)})" if classes else "..."
    return "\n".join(
        [
            f"  {root if root is not None else '<root>'}/        <- pass as root=... or set ${DATA_ENV}",
            f"    {name}/",
            "      train/",
            f"        {first}/",
            f"          {first}_1234.JPEG   (.JPEG/.jpg/.png)",
            "          ...",
            f"        {second}/",
            f"        {more}",
            "      val/",
            "        (same class folders)",
        ]
    )


def _layout_error(message: str, name: str, root: Path | None) -> DatasetLayoutError:
    return DatasetLayoutError(f"{message}\nExpected layout:\n{expected_layout(name, root)}")


def find_dataset(name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """Resolves the directory of a named dataset.

    Args:
        name: Dataset folder name, e.g. ``"imagenette"``.
        root: Directory containing ``<name>/``; if it is itself named ``<name>`` and holds
            split folders, it is used directly. ``None``: use ``$TOKENPRUNE_DATA``.

    Returns:
        The dataset directory (containing ``train/`` and/or ``val/``).

    Raises:
        DatasetLayoutError: No root given / set, or no ``<name>`` directory there; the
            message shows the expected layout.
    """
    if root is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise _layout_error(
                f"no data root given for dataset {name!r}: pass root=... (CLI: --data) "
                f"or set ${DATA_ENV} to the directory containing {name}/.",
                name,
                None,
            )
        root = env
    root_path = Path(root).expanduser()
    candidate = root_path / name
    if candidate.is_dir():
        return candidate
    if root_path.name == name and any((root_path / s).is_dir() for s in SPLITS):
        return root_path
    found = sorted(p.name for p in root_path.iterdir())[:20] if root_path.is_dir() else None
    detail = f"it contains {found}" if found is not None else "it does not exist"
    raise _layout_error(
        f"dataset {name!r} not found: no directory {candidate} ({root_path}: {detail}).", name, root_path
    )


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def balanced_subset(
    files_per_class: Sequence[Sequence[Any]],
    limit: int,
    seed: int = LIMIT_SEED,
    keys: Sequence[str] | None = None,
) -> list[list[Any]]:
    """Deterministic class-balanced pick of ``limit`` items.

    Class ``c`` gets ``limit // C`` items, plus one for the first ``limit % C`` classes
    (fewer if it has fewer). The items are taken from a seeded shuffle of each class's
    (already sorted) list -- ``random.Random(f"{seed}:{key}")``, stable across platforms
    and Python versions -- and returned in their original order. The pick for a smaller
    ``limit`` is a subset of the pick for a larger one.

    Args:
        files_per_class: One sorted sequence per class.
        limit: Total number of items wanted (>= 0).
        seed: Shuffle seed.
        keys: Per-class seed key (e.g. the class folder name); default the class index.

    Returns:
        One list per class.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    n_cls = len(files_per_class)
    out = []
    for c, files in enumerate(files_per_class):
        want = limit // n_cls + (1 if c < limit % n_cls else 0)
        order = list(range(len(files)))
        random.Random(f"{seed}:{keys[c] if keys is not None else c}").shuffle(order)
        out.append([files[i] for i in sorted(order[:want])])
    return out


class ImageFolderDataset:
    """Map-style dataset over ``<dataset_dir>/<split>/<class>/<image>`` (torch-compatible).

    Attributes:
        root: The split directory.
        classes: Class folder names (wnids), sorted; label ``i`` is ``classes[i]``.
        class_names: Human-readable names (the folder name when unknown).
        samples: ``(path, label)`` pairs, sorted by label, then file name.
        targets: The labels of ``samples``.
    """

    def __init__(
        self,
        dataset_dir: str | os.PathLike[str],
        split: str = "val",
        transform: Callable[[Any], Any] | None = None,
        limit: int | None = None,
        name: str | None = None,
        limit_seed: int = LIMIT_SEED,
    ) -> None:
        """Scans the split directory.

        Args:
            dataset_dir: Directory holding the split folders (see ``find_dataset``).
            split: Split folder name, e.g. ``"train"`` or ``"val"``.
            transform: Applied to the RGB PIL image; ``None`` returns the PIL image.
            limit: Keep a deterministic class-balanced subset of this many images
                (``balanced_subset``); ``None`` keeps everything.
            name: Dataset name, for the known-class check and error messages
                (default: the folder name of ``dataset_dir``).
            limit_seed: Seed of the ``limit`` pick.

        Raises:
            DatasetLayoutError: Missing split folder, no class folders, a class folder
                without images, or (known dataset) class folders differing from the
                expected ones. The message shows the expected layout.
        """
        dataset_dir = Path(dataset_dir).expanduser()
        self.name = name or dataset_dir.name
        self.split = split
        self.root = dataset_dir / split
        self.transform = transform
        layout_root = dataset_dir.parent
        if not self.root.is_dir():
            have = sorted(p.name for p in dataset_dir.iterdir()) if dataset_dir.is_dir() else "nothing (missing)"
            raise _layout_error(
                f"split folder {self.root} not found ({dataset_dir} contains {have}).", self.name, layout_root
            )
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise _layout_error(f"no class folders in {self.root}.", self.name, layout_root)
        known = KNOWN_DATASETS.get(self.name)
        if known is not None and classes != sorted(known):
            missing = sorted(set(known) - set(classes))
            extra = sorted(set(classes) - set(known))
            raise _layout_error(
                f"{self.root} has the wrong class folders for {self.name!r}: missing {missing}, unexpected {extra}.",
                self.name,
                layout_root,
            )
        self.classes = classes
        self.class_names = [known[c] if known else c for c in classes]
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        per_class: list[list[Path]] = []
        for c in classes:
            files = sorted((p for p in (self.root / c).iterdir() if _is_image(p)), key=lambda p: p.name)
            if not files:
                raise _layout_error(
                    f"class folder {self.root / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}).",
                    self.name,
                    layout_root,
                )
            per_class.append(files)
        if limit is not None:
            per_class = balanced_subset(per_class, limit, seed=limit_seed, keys=classes)
        self.samples: list[tuple[Path, int]] = [(p, i) for i, files in enumerate(per_class) for p in files]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int):  # -> PIL.Image.Image
        """Returns image ``index`` decoded and converted to RGB.

        Raises:
            ImageReadError: The file is missing, truncated or not an image.
        """
        from PIL import Image

        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")  # ~2% of Imagenette is grayscale (or CMYK)
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.load_image(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index][1]

    def __repr__(self) -> str:
        return f"ImageFolderDataset({self.name!r}, split={self.split!r}, n={len(self)}, classes={len(self.classes)})"


def load_dataset(
    name: str,
    split: str = "val",
    root: str | os.PathLike[str] | None = None,
    transform: Callable[[Any], Any] | None = None,
    limit: int | None = None,
) -> ImageFolderDataset:
    """``find_dataset`` + ``ImageFolderDataset`` in one call.

    Args:
        name: Dataset name, e.g. ``"imagenette"``.
        split: ``"train"`` or ``"val"``.
        root: Directory containing ``<name>/`` (else ``$TOKENPRUNE_DATA``).
        transform: Applied to each RGB PIL image.
        limit: Deterministic class-balanced subset size.

    Returns:
        The dataset.
    """
    return ImageFolderDataset(find_dataset(name, root), split, transform=transform, limit=limit, name=name)


def class_names(name: str) -> list[str]:
    """Human-readable class names of a known dataset, in label order."""
    if name not in KNOWN_DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {sorted(KNOWN_DATASETS)}")
    return list(KNOWN_DATASETS[name].values())
