"""Rebuild tokenprune/assets/examples/: freely licensed photos bundled with scikit-image, 224x224 JPEG.

Run: pip install scikit-image && python models/make_example_images.py
Licences (from scikit-image's data docs): astronaut, rocket, hubble_deep_field: public domain (NASA / SpaceX
releases); chelsea, coffee: CC0.
"""

from __future__ import annotations

from pathlib import Path

import skimage.data
from PIL import Image

NAMES = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field"]
OUT = Path(__file__).resolve().parents[1] / "tokenprune" / "assets" / "examples"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((224, 224), Image.BICUBIC)
        image.save(OUT / f"{name}.jpg", quality=90)


if __name__ == "__main__":
    main()
