"""The Gradio app: one tab per task, each comparing the original model with its token-reduced version.

Tabs: image classification (always: the zoo classifier, else its backbone, else a random timm ViT),
semantic segmentation (DToP early exit) and visual question answering (AIM/FastV), each shown when its zoo
model is installed. Everything runs offline: no share link, no analytics, fonts served by the local server,
example photos from ``tokenprune/assets/examples``. All events share one queue: one forward at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from tokenprune.demo.classification import classification_tab
from tokenprune.demo.common import ALLOWED_DIRS, gr
from tokenprune.measure.accuracy import EXAMPLES_DIR

logger = logging.getLogger(__name__)


def _optional_tabs() -> list[tuple[str, Callable[[], bool]]]:
    """``(task, add_tab)`` for the tabs whose model may be missing; ``add_tab()`` returns False to skip."""
    tabs: list[tuple[str, Callable[[], bool]]] = []
    try:
        from tokenprune.demo.segmentation import segmentation_tab

        tabs.append(("segmentation", segmentation_tab))
    except ImportError:
        pass
    try:
        from tokenprune.demo.vqa import vqa_tab

        tabs.append(("vqa", vqa_tab))
    except ImportError:
        pass
    return tabs


TASKS = ("classification", "segmentation", "vqa")


def build_app(model_name: str = "auto", tasks: tuple[str, ...] = TASKS) -> gr.Blocks:
    """The Gradio app.

    Args:
        model_name: Classifier of the classification tab: 'auto', a zoo name or a timm architecture.
        tasks: Which tabs to offer; a tab whose model is not installed is left out (and logged).
    """
    with gr.Blocks(title="tokenprune demo", analytics_enabled=False, delete_cache=(900, 3600)) as app:
        gr.Markdown(
            "# tokenprune: original vs token-reduced models, side by side\n"
            "Each tab runs one input through the original model and through the same model with tokens merged, "
            "pruned or exited early, on this machine's CPU, and shows both results with their measured cost."
        )
        with gr.Tabs():
            if "classification" in tasks:
                classification_tab(model_name)
            for task, add_tab in _optional_tabs():
                if task in tasks and not add_tab():
                    logger.warning("demo: the %s tab is left out (its model is not installed)", task)
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, model_name: str = "auto", **launch_kwargs: Any) -> None:
    """Build the app and serve it at ``http://host:port`` (blocks until interrupted). Never shares publicly.

    Args:
        host: Interface to listen on ("0.0.0.0" for all).
        port: TCP port.
        model_name: Classifier: 'auto', a zoo name or a timm architecture (random weights).
        **launch_kwargs: More ``gr.Blocks.launch`` options.
    """
    app = build_app(model_name)
    app.queue(default_concurrency_limit=1)
    options: dict[str, Any] = {
        "server_name": host,
        "server_port": port,
        "share": False,
        "ssr_mode": False,
        "inbrowser": False,
        "allowed_paths": sorted({str(EXAMPLES_DIR), *ALLOWED_DIRS}),
        "max_file_size": "200mb",
    }
    options.update(launch_kwargs)
    app.launch(**options)
