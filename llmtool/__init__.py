"""llmtool: convert Hugging Face checkpoints to on-device TFLite artifacts and run them."""

__version__ = "0.1.0"
