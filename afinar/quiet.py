"""Keep the libraries' own progress bars and advice out of afinar's output; afinar prints what matters."""

from __future__ import annotations

import os


def quiet_environment() -> None:
    """Environment switches the libraries read when imported: call before importing them."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF conversion and weight loading bars; ours are rich


def quiet_libraries() -> None:
    """transformers' own progress bars (GGUF conversion, weight loading) and known harmless notices."""
    import logging as std_logging
    import warnings

    from transformers.utils import logging

    quiet_environment()
    logging.disable_progress_bar()
    # bitsandbytes announces an optional hub-downloaded CPU kernel we deliberately do without.
    std_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(std_logging.ERROR)
    # peft still calls a transformers API deprecated for v6; not the user's concern.
    warnings.filterwarnings("ignore", category=FutureWarning)
