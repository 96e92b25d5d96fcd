"""Launch the tokenprune Gradio demo: ``python demos/app.py [--host H] [--port P] [--model M]``.

A thin launcher; the app lives in the package (``tokenprune/demo/``), so ``tokenprune demo`` does the
same after ``pip install 'tokenprune[demo]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import tokenprune  # noqa: F401
except ImportError:  # run from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default="auto", help="'auto' (zoo model, else its backbone), zoo name or timm arch")
    args = parser.parse_args()

    from tokenprune.demo import launch

    launch(host=args.host, port=args.port, model_name=args.model)


if __name__ == "__main__":
    main()
