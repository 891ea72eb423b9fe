"""Anthropic HH-RLHF helpers for the CTRL recipes: transcript parsing, prompt loading, a text-pair reward adapter.

HH-RLHF rows (`Anthropic/hh-rlhf`, subsets `helpful-base`, `harmless-base`, ...) hold two transcripts, `chosen` and
`rejected`, in the form

    "\\n\\nHuman: first question\\n\\nAssistant: answer\\n\\nHuman: follow-up\\n\\nAssistant: final answer"

:func:`parse_hh_transcript` turns one into chat messages; :func:`hh_prompt` keeps everything before the final assistant
answer (the prompt CTRL trains on); :func:`load_hh_prompts` does this for a whole split, from the Hub or a local file.

:class:`TextPairRewardModel` adapts reward models that score a *(question, answer)* text pair — e.g.
`OpenAssistant/reward-model-deberta-v3-large-v2` — to TRL's reward-callable interface (TRL itself feeds reward models the
concatenated prompt + completion as one text, which such models were not trained on).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}
_LABEL = {"user": "Human", "assistant": "Assistant", "system": "System"}


class HHFormatError(ValueError):
    """A transcript is not in HH-RLHF's `\\n\\nHuman: ... \\n\\nAssistant: ...` form."""


def _preview(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """Split an HH-RLHF transcript into `[{"role": "user"|"assistant", "content": ...}, ...]`.

    The transcript must start with a `"\\n\\nHuman:"` turn (leading/trailing spaces on each turn are stripped).
    Consecutive turns of the same speaker — a handful of HH rows have them — are merged into one message, so roles
    always alternate. The last message may be an assistant turn with empty content (a bare final `"\\n\\nAssistant:"`).

    Raises:
        HHFormatError: the text is not a string, has no `Human:` / `Assistant:` turns, has text before the first
            turn, or does not start with a human turn. The message says what was expected and shows the start.
    """
    if not isinstance(text, str):
        raise HHFormatError(
            f'Expected an HH-RLHF transcript string ("\\n\\nHuman: ...\\n\\nAssistant: ..."), got '
            f"{type(text).__name__}: {_preview(repr(text))}."
        )
    normalised = text if text.startswith("\n\n") else "\n\n" + text.lstrip(" \n")
    parts = _TURN.split(normalised)
    # parts = [before, role1, content1, role2, content2, ...]
    expected = 'Expected "\\n\\nHuman: <question>\\n\\nAssistant: <answer>..." (Anthropic HH-RLHF format)'
    if len(parts) < 3:
        raise HHFormatError(f"{expected}, but found no 'Human:'/'Assistant:' turns in {_preview(text)}.")
    if parts[0].strip():
        raise HHFormatError(f"{expected}, but found text before the first turn: {_preview(parts[0])} in {_preview(text)}.")
    if parts[1] != "Human":
        raise HHFormatError(f"{expected}: the transcript must start with a 'Human:' turn, got {_preview(text)}.")
    messages: list[dict[str, str]] = []
    for role_label, content in zip(parts[1::2], parts[2::2]):
        role, content = _ROLE[role_label], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = (messages[-1]["content"] + "\n\n" + content).strip()
        else:
            messages.append({"role": role, "content": content})
    return messages


def hh_prompt(example: dict[str, Any], column: str = "chosen") -> list[dict[str, str]]:
    """The chat prompt of an HH-RLHF row: the `chosen` transcript up to, and excluding, its final assistant answer.

    The result ends with a user message. A transcript that ends with a human turn (no final answer) is returned whole.

    Raises:
        KeyError: the row has no `column` (HH rows have `chosen` and `rejected`).
        HHFormatError: the transcript is malformed (see :func:`parse_hh_transcript`).
    """
    if column not in example:
        raise KeyError(
            f"The example has no {column!r} field (fields: {sorted(example)}). HH-RLHF rows hold the transcript in "
            f"'chosen' (and 'rejected'); pass the column that holds '\\n\\nHuman: ... \\n\\nAssistant: ...' text."
        )
    messages = parse_hh_transcript(example[column])
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise HHFormatError(f"The transcript has no human turn before its final answer: {_preview(example[column])}.")
    return messages


def _is_save_to_disk_dir(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists()


def _local_split_files(root: Path, data_dir: str | None, split: str) -> list[str]:
    base = root / data_dir if data_dir else root
    for pattern in (f"{split}.jsonl", f"{split}.jsonl.gz", f"{split}.json", f"{split}.json.gz", f"{split}-*.jsonl", f"{split}*.parquet"):
        files = sorted(str(p) for p in base.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(
        f"No {split!r} split under {base}: expected {split}.jsonl[.gz], {split}.json[.gz] or {split}*.parquet there "
        "(the Hub layout of Anthropic/hh-rlhf is <data_dir>/<split>.jsonl.gz), or a `save_to_disk` directory."
    )


def load_hh_prompts(
    name_or_path: str,
    data_dir: str | None = None,
    split: str = "train",
    max_prompts: int | None = None,
    *,
    name: str | None = None,
    prompt_column: str = "prompt",
    transcript_column: str = "chosen",
    seed: int | None = None,
):
    """A `datasets.Dataset` with one column, `prompt`: chat prompts (message lists) or the dataset's own prompts.

    `name_or_path` is a Hub dataset (`"Anthropic/hh-rlhf"` with `data_dir="helpful-base"` / `"harmless-base"`, loaded
    with `datasets.load_dataset`), a local `.jsonl`/`.json`/`.parquet` file, a directory laid out like the Hub repo
    (`<data_dir>/<split>.jsonl[.gz]`), or a `save_to_disk` directory.

    Rows with a `transcript_column` (`chosen`) and no `prompt_column` are HH transcripts: they become chat prompts
    with :func:`hh_prompt`. Datasets that already have a `prompt_column` (e.g. `trl-lib/tldr`) keep it as is. Every
    other column is dropped. `max_prompts` keeps the first rows (after an optional shuffle with `seed`).
    """
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    path = Path(os.path.expanduser(name_or_path))
    if path.is_file():
        suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
        builder = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}.get(suffix)
        if builder is None:
            raise ValueError(f"Unsupported dataset file {path}: use .jsonl, .json (optionally .gz) or .parquet.")
        data = load_dataset(builder, data_files=str(path), split="train")
    elif path.is_dir() and _is_save_to_disk_dir(path):
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if split not in data:
                raise ValueError(f"Split {split!r} not in {path} (splits: {list(data)}).")
            data = data[split]
    elif path.is_dir():
        files = _local_split_files(path, data_dir, split)
        builder = "parquet" if files[0].endswith(".parquet") else "json"
        data = load_dataset(builder, data_files=files, split="train")
    else:
        data = load_dataset(name_or_path, name=name, data_dir=data_dir, split=split)
    assert isinstance(data, Dataset), type(data)

    if seed is not None:
        data = data.shuffle(seed=seed)
    if max_prompts is not None and max_prompts < len(data):
        data = data.select(range(max_prompts))

    if prompt_column in data.column_names:
        return data.select_columns([prompt_column]).rename_column(prompt_column, "prompt") if prompt_column != "prompt" else data.select_columns(["prompt"])
    if transcript_column not in data.column_names:
        raise KeyError(
            f"{name_or_path} (split {split!r}) has neither a {prompt_column!r} column nor a {transcript_column!r} column "
            f"of HH-RLHF transcripts (columns: {data.column_names}). Pass a dataset in Anthropic's HH format "
            "('chosen'/'rejected' transcripts) or one with a prompt column."
        )

    def to_prompt(example, index):
        try:
            return {"prompt": hh_prompt(example, transcript_column)}
        except HHFormatError as error:
            raise HHFormatError(f"{name_or_path}, split {split!r}, row {index}: {error}") from None

    return data.map(to_prompt, with_indices=True, remove_columns=data.column_names, desc="HH transcripts -> prompts")


# ---------------------------------------------------------------------------------------------------------------------
# Text-pair reward models


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style [{"type": "text", "text": ...}]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def flatten_prompt(prompt) -> str:
    """A prompt as plain text: strings unchanged; a single user message is its content; longer conversations are
    written as an HH transcript (`Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...`)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if len(messages) == 1 and messages[0].get("role") == "user":
        return _message_text(messages[0].get("content", ""))
    return "\n\n".join(
        f"{_LABEL.get(m.get('role'), str(m.get('role')).capitalize())}: {_message_text(m.get('content', ''))}" for m in messages
    )


def flatten_completion(completion) -> str:
    """A completion as plain text: strings unchanged; message lists (`[{"role": "assistant", ...}]`) joined."""
    if isinstance(completion, str):
        return completion
    return "\n\n".join(_message_text(m.get("content", "")) for m in completion)


class TextPairRewardModel:
    """A TRL reward callable for reward models that score `tokenizer(question, answer)`; reward = `logits[:, 0]`.

    Use it for pair-trained RMs such as `OpenAssistant/reward-model-deberta-v3-large-v2`:

    ```python
    rm = AutoModelForSequenceClassification.from_pretrained("OpenAssistant/reward-model-deberta-v3-large-v2")
    reward = TextPairRewardModel(rm, AutoTokenizer.from_pretrained("OpenAssistant/reward-model-deberta-v3-large-v2"))
    trainer = CTRLTrainer(model=..., reward_funcs=reward, ...)
    ```

    Prompts may be strings or chat messages (flattened with :func:`flatten_prompt`), completions strings or
    `[{"role": "assistant", "content": ...}]` lists. Scores `batch_size` pairs per forward pass, truncating pairs to
    `max_length` tokens (longest side first), and returns one float per completion.

    TRL does not place a callable's model: the model is moved to `device` (default: the current accelerate process's
    device) on first use and kept in eval mode. Under DeepSpeed ZeRO-3 it is therefore a full, unsharded copy per process.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16, max_length: int = 512, device=None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        model_name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__)
        self.__name__ = name or model_name.rstrip("/").split("/")[-1] or "text_pair_reward"
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None and getattr(tokenizer, "pad_token_id", None) is not None:
            config.pad_token_id = tokenizer.pad_token_id
        self._placed = False

    def _place(self):
        if self._placed:
            return
        import torch

        device = self.device
        if device is None:
            try:
                from accelerate import PartialState

                device = PartialState().device
            except Exception:  # pragma: no cover - accelerate is a TRL dependency
                device = torch.device("cpu")
        self.model.to(device)
        self.model.eval()
        self.device = torch.device(device)
        self._placed = True

    def __call__(self, prompts: Sequence, completions: Sequence, **kwargs) -> list[float]:
        import torch

        if len(prompts) != len(completions):
            raise ValueError(f"Got {len(prompts)} prompts for {len(completions)} completions: one prompt per completion.")
        self._place()
        questions = [flatten_prompt(p) for p in prompts]
        answers = [flatten_completion(c) for c in completions]
        rewards: list[float] = []
        for start in range(0, len(questions), self.batch_size):
            inputs = self.tokenizer(
                questions[start : start + self.batch_size],
                answers[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                padding_side="right",
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            rewards.extend(logits[:, 0].float().cpu().tolist())
        return rewards


def text_pair_reward(model, tokenizer, **kwargs) -> TextPairRewardModel:
    """Build a :class:`TextPairRewardModel`; `model`/`tokenizer` may be loaded objects or a path / Hub id."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(str(model), num_labels=1)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer or model.config._name_or_path))
    return TextPairRewardModel(model, tokenizer, **kwargs)
