"""LightningModules: training and evaluation of retrieval models."""

from modules.bi_encoder import BiEncoderModule
from modules.cross_encoder import CrossEncoderModule

__all__ = ["BiEncoderModule", "CrossEncoderModule"]
