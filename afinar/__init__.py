"""afinar: fine-tune an open LLM on your own Q&A data with LoRA or QLoRA, measure it, serve it."""

__version__ = "0.1.0"
