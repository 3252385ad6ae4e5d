"""finetune: declarative fine-tuning sweeps with a chunk scheduler."""
__version__ = "0.1.0"
