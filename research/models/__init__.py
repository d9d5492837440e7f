"""Pure torch / Hugging Face models that round-trip through ``save_pretrained``."""
