"""Tiny, fully offline models and tokenizers for tests, the quickstart and the CPU benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained on the strings you pass, the models are
built from a `LlamaConfig` and saved to a local directory (TRL rebuilds the reference model from
`config._name_or_path`, so policies must live on disk, not only in memory).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PAD, EOS, BOS = "<pad>", "</s>", "<s>"

# A few generic prompts/texts for tokenizers and prompt sets of the CPU benchmarks.
SAMPLE_TEXTS = [
    "the cat sat on the mat", "a dog ran in the park", "hello world, how are you", "good morning to you all",
    "the quick brown fox jumps over the lazy dog", "tell me a story about a cat", "write a poem about the rain",
    "what is the capital of france", "explain how a rainbow forms", "give me three tips for sleeping well",
]


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512, chat_template: bool = False):
    """A byte-level BPE `PreTrainedTokenizerFast` trained on `texts`, left padded, with pad/eos/bos tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, padding_side="left"
    )
    if chat_template:
        fast.chat_template = (
            "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
    return fast


def _llama_config(tokenizer, hidden_size: int, num_layers: int, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
        **overrides,
    )


def build_tiny_policy(tokenizer, output_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0):
    """A randomly initialised `LlamaForCausalLM`, saved with its tokenizer to `output_dir`; returns the path."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden_size, num_layers))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def build_tiny_reward_model(tokenizer, output_dir: str | Path | None = None, hidden_size: int = 32, seed: int = 0):
    """A randomly initialised `LlamaForSequenceClassification` with one label (a reward model)."""
    import torch
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, hidden_size, 1, num_labels=1))
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model


def pretrain_on_texts(model, tokenizer, texts: Sequence[str], steps: int = 200, lr: float = 3e-3, batch_size: int = 16,
                      seed: int = 0, decay_lr: bool = False):
    """A few steps of plain next-token training so that a random tiny model produces varied, text-like samples.

    `decay_lr=True` decays the learning rate linearly to 0, so that a long enough run settles at the corpus's
    distribution rather than wherever the last noisy step left it (the quickstart uses it to make its SFT policy a
    property of the corpus, not of the machine's float rounding)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(t + tokenizer.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1) if decay_lr else 1.0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(encoded), (batch_size,), generator=generator).tolist()
        rows = [encoded[i] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval()
    return model


# ---------------------------------------------------------------------------------------------------------------------
# One-token bandit: the cleanest end-to-end check of CTRL. With one prompt and one-token completions, RLOO with its k1
# KL penalty has the exact stationary point π*(a) ∝ π_ref(a)·exp(Φ(c(a))/β), computable from the reference policy's
# action probabilities and the prompt's fixed reference rewards.

BANDIT_PROMPT = "q"


def build_bandit_tokenizer(num_actions: int):
    """A word-level tokenizer whose vocabulary is the special tokens, the prompt token `q` and actions `a0..a{V-1}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, BOS: 2, BANDIT_PROMPT: 3}
    vocab.update({f"a{i}": 4 + i for i in range(num_actions)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, padding_side="left")


def bandit_action_ids(tokenizer, num_actions: int) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(f"a{i}") for i in range(num_actions)]


def build_bandit_policy(tokenizer, output_dir, target_probs, steps: int = 300, lr: float = 1e-2, seed: int = 0) -> str:
    """A tiny Llama whose next-token distribution after the prompt is close to `target_probs` over the actions.

    Saved to `output_dir` (TRL rebuilds the reference model from that path).
    """
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, 32, 1))
    prompt_ids = torch.tensor([tokenizer(BANDIT_PROMPT)["input_ids"]])
    target = torch.as_tensor(target_probs, dtype=torch.float32).unsqueeze(0)
    return _fit_next_token_distribution(model, tokenizer, output_dir, prompt_ids, target, steps, lr)


def _fit_next_token_distribution(model, tokenizer, output_dir, prompt_ids, target, steps: int, lr: float) -> str:
    """Fit π(action | prompt p) to `target[p]` (a (P, V) tensor over `bandit_action_ids(tokenizer, V)`) by
    cross-entropy with Adam, then save model and tokenizer to `output_dir`."""
    import torch

    actions = torch.tensor(bandit_action_ids(tokenizer, target.shape[1]))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=prompt_ids).logits[:, -1], dim=-1)
        loss = -(target * logp[:, actions]).sum(dim=1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return str(output_dir)


def bandit_next_token_probs(model, tokenizer):
    """π(· | prompt) over the whole vocabulary, as a float64 tensor."""
    import torch

    prompt_ids = torch.tensor([tokenizer(BANDIT_PROMPT)["input_ids"]], device=next(model.parameters()).device)
    with torch.no_grad():
        return torch.softmax(model(input_ids=prompt_ids).logits[0, -1].double(), dim=-1).cpu()


# ---------------------------------------------------------------------------------------------------------------------
# Multi-prompt (contextual) one-token bandit: prompts `q0..q{P-1}`, one token each, actions `a0..a{V-1}`. With one-token
# completions RLOO's exact stationary point is, per prompt, π*(a|x) ∝ π_ref(a|x)·exp(Φ_x(a)/β) with one global β; a
# tiny Llama pre-trained on P target distributions makes π_ref(·|x) known exactly for every prompt.


def contextual_bandit_prompts(num_prompts: int) -> list[str]:
    """The prompt strings `q0..q{P-1}` of the contextual bandit (one token each)."""
    return [f"q{i}" for i in range(num_prompts)]


def build_contextual_bandit_tokenizer(num_prompts: int, num_actions: int):
    """A word-level tokenizer: special tokens, prompt tokens `q0..q{P-1}`, then action tokens `a0..a{V-1}`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, BOS: 2}
    vocab.update({p: 3 + i for i, p in enumerate(contextual_bandit_prompts(num_prompts))})
    vocab.update({f"a{i}": 3 + num_prompts + i for i in range(num_actions)})
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, bos_token=BOS, padding_side="left")


def _prompt_id_batch(tokenizer, prompts: Sequence[str]):
    import torch

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"contextual bandit prompts must be one token each, got {prompts!r} -> {ids!r}")
    return torch.tensor(ids)


def build_contextual_bandit_policy(tokenizer, output_dir, target_probs, hidden_size: int = 64, steps: int = 600,
                                   lr: float = 1e-2, seed: int = 0) -> str:
    """A tiny Llama whose next-token distribution after prompt `q{i}` is close to `target_probs[i]` over the actions.

    `target_probs`: (P, V) rows summing to 1; actions are `bandit_action_ids(tokenizer, V)`. Saved to `output_dir`.
    hidden_size ≥ P keeps the P×V logit matrix representable (its rank is at most hidden_size).
    """
    import torch
    from transformers import LlamaForCausalLM

    target = torch.as_tensor(target_probs, dtype=torch.float32)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer, hidden_size, 1))
    prompt_ids = _prompt_id_batch(tokenizer, contextual_bandit_prompts(target.shape[0]))
    return _fit_next_token_distribution(model, tokenizer, output_dir, prompt_ids, target, steps, lr)


def contextual_bandit_next_token_probs(model, tokenizer, num_prompts: int):
    """π(· | q_i) over the whole vocabulary for every prompt: a (P, vocab) float64 tensor."""
    import torch

    prompt_ids = _prompt_id_batch(tokenizer, contextual_bandit_prompts(num_prompts)).to(next(model.parameters()).device)
    with torch.no_grad():
        return torch.softmax(model(input_ids=prompt_ids).logits[:, -1].double(), dim=-1).cpu()
