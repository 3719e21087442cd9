"""The original's dataset module: its torch Datasets ``GhibliDataset(dataset_dir, transform=None)`` and
``ProductImageDataset(dataset_dir, transform=None)`` (items ``{"image", "text"}``, product adds
``product_image``), kept at the original's import path. They live in utils/compat/datasets.py, built on the
dataset layouts of utils/data."""

from utils.compat.datasets import GhibliDataset, ProductImageDataset  # noqa: F401

__all__ = ["GhibliDataset", "ProductImageDataset"]
