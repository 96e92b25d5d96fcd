"""ViT adapters: the shared block-wrapper flow (``reducing``), timm and the Hugging Face vision encoders.

Each family module registers its adapter on import (``tokenprune.adapters`` imports them).
"""
