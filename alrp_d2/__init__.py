"""aLRP Loss for Detectron2, trained with PyTorch Lightning."""

__version__ = "0.1.0"
