"""The device and encoder-shape flags the GPU benchmarks share (``moe_step.py``, ``train_mfu.py``):
BGE-M3's geometry by default (XLM-R large: 24 layers, hidden 1024, intermediate 4096, heads of 64)."""

from __future__ import annotations

import argparse

import torch

from clp_ray.cli import int_at_least

positive = int_at_least(1)


def add_shape_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=positive, default=24)
    ap.add_argument("--hidden", type=positive, default=1024)
    ap.add_argument("--intermediate", type=positive, default=4096)


def check_shape_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 with the flag's name for a GPU that is not there or a hidden size heads cannot split."""
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU is visible to torch")
    if args.hidden % 64:
        ap.error(f"--hidden {args.hidden}: must be a multiple of 64 (attention heads of 64)")
