import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")


import pytest  # noqa: E402

TINY_PROMPTS = ["the movie was", "this film is", "the plot felt", "the cast was"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(path, tokenizer) of a tiny saved Llama policy with a locally trained tokenizer; one per test module."""
    from trl_infalign.tiny import build_tiny_policy, build_tokenizer

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer(TINY_PROMPTS * 5 + ["great awful fine good bad 0 1 2 3 4 5 6 7 8 9"] * 5, vocab_size=300)
    path = build_tiny_policy(tokenizer, root / "policy", hidden_size=32, num_layers=1)
    return path, tokenizer
