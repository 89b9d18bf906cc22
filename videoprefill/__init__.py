"""videoprefill: long-video question answering with FlashPrefill prefill (video, pipeline, CLI, batch, benchmarks)."""


def quiet_libraries() -> None:
    """Keep command-line output to our own lines: no progress bars or notices from the libraries."""
    import logging
    import warnings

    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("qwen_vl_utils").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
