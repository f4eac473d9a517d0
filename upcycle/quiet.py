"""Silence the progress bars and info logs of transformers and huggingface_hub (for ``--quiet``)."""


def quiet_libraries(progress: bool = False) -> None:
    """Keep warnings, drop info logs; drop progress bars unless ``progress``."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
        disable_progress_bars()
