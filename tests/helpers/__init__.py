"""Shared test cases: the tiny VLM families and ViT model forms the matrix suites run every method on."""
