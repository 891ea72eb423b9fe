"""ReferenceConfig (issue #21 item 1): TrlParser, the CLI's flags, checks naming the field, the keyword form through
`**overrides`, and provenance built from the config. Also the sampling-settings object of issue #20 item 8 at the
unit level (EOS union, min_p taken as TRL's generate takes it)."""

from __future__ import annotations

import dataclasses
import inspect
import re
import warnings

import pytest
from datasets import Dataset

from trl_infalign import ReferenceConfig, build_reference_rewards
from trl_infalign.reference import _build_reference_rewards

from conftest import TINY_PROMPTS


def length_reward(completions, **kwargs):
    return [len(c) / 10.0 for c in completions]


# ---------------------------------------------------------------------------------------------------------------------
# Parsing


def test_trl_parser_reads_the_config():
    from trl import TrlParser

    (config,) = TrlParser((ReferenceConfig,)).parse_args_and_config(
        args=["--num_samples", "8", "--max_new_tokens", "16", "--temperature", "0.7", "--seed", "3"]
    )
    assert isinstance(config, ReferenceConfig)
    assert (config.num_samples, config.max_new_tokens, config.temperature, config.seed) == (8, 16, 0.7, 3)
    assert config.top_p == 1.0 and config.per_reward is False  # the rest keeps its defaults
    (config,) = TrlParser((ReferenceConfig,)).parse_args_and_config(
        args=["--num-samples", "4", "--per-reward", "--generation_kwargs", '{"typical_p": 0.9}', "--reward-weights", "1", "0.5"]
    )
    assert (config.num_samples, config.per_reward, config.generation_kwargs, config.reward_weights) == (
        4, True, {"typical_p": 0.9}, [1.0, 0.5])


def test_every_existing_cli_flag_still_parses():
    from trl_infalign.cli import build_parser
    from trl_infalign.commands.build_reference import config_from_args

    argv = ["build-reference", "--model", "m", "--reward-model", "a", "--reward-model", "b", "--reward-weights", "1", "0.5",
            "--dataset", "d.jsonl", "--dataset-config", "c", "--split", "test", "--prompt-column", "q",
            "--output-column", "refs", "-k", "5", "--max-new-tokens", "7", "--batch-size", "3",
            "--generation-batch-size", "6", "--temperature", "0.5", "--top-p", "0.9", "--top-k", "4", "--seed", "11",
            "--nonfinite", "skip", "--keep-completions", "--overwrite", "--output", "out", "--cache-dir", "cache",
            "--use-vllm", "--no-progress"]
    args = build_parser("build-reference").parse_args(argv)
    assert (args.model, args.reward_models, args.dataset, args.dataset_config, args.split, args.output, args.no_progress) == (
        "m", ["a", "b"], "d.jsonl", "c", "test", "out", True)
    config = config_from_args(args)
    expected = dict(reward_weights=[1.0, 0.5], prompt_column="q", output_column="refs", num_samples=5, max_new_tokens=7,
                    batch_size=3, generation_batch_size=6, temperature=0.5, top_p=0.9, top_k=4, seed=11,
                    nonfinite="skip", keep_completions=True, overwrite=True, cache_dir="cache", use_vllm=True)
    assert {k: getattr(config, k) for k in expected} == expected
    # the underscore spellings (TrlParser's) and the new per-reward flag work too
    args = build_parser("build-reference").parse_args(
        ["build-reference", "--model", "m", "--reward-model", "a", "--dataset", "d", "--output", "o", "--num_samples", "2",
         "--per_reward", "--min_p", "0.05", "--repetition-penalty", "1.1"])
    config = config_from_args(args)
    assert (config.num_samples, config.per_reward, config.min_p, config.repetition_penalty) == (2, True, 0.05, 1.1)


@pytest.mark.parametrize(
    "flag, value, match",
    [("--temperature", "0", "temperature must be a finite number > 0"), ("--top-p", "1.5", r"top_p must be in \(0, 1\]"),
     ("--top-k", "-1", "top_k must be an integer >= 0"), ("--num-samples", "0", "num_samples must be an integer >= 1")],
)
def test_cli_rejects_bad_values_naming_the_field(flag, value, match, capsys, tmp_path):
    from trl_infalign.cli import main

    argv = ["build-reference", "--model", "m", "--reward-model", "r", "--dataset", "d", "--output", str(tmp_path / "o"),
            flag, value]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # rejected before anything was probed or loaded


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_samples=0), r"num_samples must be an integer >= 1 \(K reference samples per prompt\)"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(min_p=2.0), r"min_p must be in \[0, 1\] or None"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(nonfinite="ignore"), "nonfinite must be 'raise' or 'skip'"),
        (dict(generation_kwargs="{not json"), "generation_kwargs must be a dict or a JSON object string"),
        (dict(vllm_kwargs="[1, 2]"), "vllm_kwargs must be a dict"),
        (dict(generation_kwargs={"num_return_sequences": 2}), "must not set 'num_return_sequences'.*num_samples"),
        (dict(reward_weights=[1.0, float("nan")]), "reward_weights must be a non-empty list of finite numbers"),
        (dict(output_column="prompt"), "must be different columns"),
    ],
)
def test_config_checks_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ReferenceConfig(**kwargs)


def test_generation_kwargs_overriding_a_field_warns():
    with pytest.warns(UserWarning, match=r"generation_kwargs\['temperature'\]=0.5 overrides temperature=1.0"):
        ReferenceConfig(generation_kwargs={"temperature": 0.5})


# ---------------------------------------------------------------------------------------------------------------------
# build_reference_rewards(dataset, model, reward_funcs, args=None, **overrides)


def test_signature_has_at_most_six_parameters():
    parameters = inspect.signature(build_reference_rewards).parameters
    assert len(parameters) <= 6
    assert list(parameters)[:4] == ["dataset", "model", "reward_funcs", "args"]


@pytest.fixture(scope="module")
def prompts():
    return Dataset.from_dict({"prompt": TINY_PROMPTS})


def test_config_and_keyword_forms_give_the_same_build(tiny, prompts):
    path, tokenizer = tiny
    settings = dict(num_samples=3, max_new_tokens=3, batch_size=2, seed=5, keep_completions=True)
    by_keywords, stats = _build_reference_rewards(prompts, path, length_reward, progress=False, **settings)
    config = ReferenceConfig(**settings)
    by_config = build_reference_rewards(prompts, path, length_reward, config, progress=False)
    assert by_config["ref_rewards"] == by_keywords["ref_rewards"]
    assert by_config["ref_completions"] == by_keywords["ref_completions"]
    # provenance is the config's: K, seed, chunk size, nonfinite and the sampling settings
    record = stats.extra["provenance"]
    assert (record["num_samples"], record["seed"], record["batch_size"], record["nonfinite"]) == (3, 5, 2, "raise")
    assert record["sampling"]["max_new_tokens"] == 3
    # a keyword that changes a field of an explicit config is announced, naming the field
    with pytest.warns(UserWarning, match=r"override the ReferenceConfig.*seed=6 \(args.seed=5\)"):
        other = build_reference_rewards(prompts, path, length_reward, config, seed=6, progress=False)
    assert other["ref_completions"] != by_config["ref_completions"]  # the override took effect
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same value is no override
        build_reference_rewards(prompts.select([0]), path, length_reward, config, seed=5, progress=False)


def test_unknown_keyword_is_a_type_error_naming_it_and_the_valid_names(tiny, prompts):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_sample'\].*'num_samples'.*'tokenizer'"):
        build_reference_rewards(prompts, tiny[0], length_reward, num_sample=3)
    with pytest.raises(TypeError, match="args must be a trl_infalign.ReferenceConfig"):
        build_reference_rewards(prompts, tiny[0], length_reward, {"num_samples": 3})


def test_from_training_args_maps_the_trainer_fields():
    class Args:  # the fields of a CTRLConfig that the reference pass must share
        num_reference_samples, max_completion_length, temperature, top_p, top_k = 8, 12, 0.9, 0.95, None
        min_p, repetition_penalty, generation_kwargs, chat_template_kwargs = 0.05, 1.2, None, {"x": 1}
        reward_weights, seed, nonfinite_rewards, use_vllm, model_init_kwargs = [1.0, 2.0], 4, "skip", False, None
        reference_rewards_column = "refs"

    config = ReferenceConfig.from_training_args(Args(), batch_size=3)
    assert dataclasses.asdict(config) == {
        **dataclasses.asdict(ReferenceConfig()), "num_samples": 8, "max_new_tokens": 12, "temperature": 0.9,
        "top_p": 0.95, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.2, "chat_template_kwargs": {"x": 1},
        "reward_weights": [1.0, 2.0], "seed": 4, "nonfinite": "skip", "output_column": "refs", "batch_size": 3,
    }


# ---------------------------------------------------------------------------------------------------------------------
# Sampling settings (issue #20 item 8), unit level


def test_eos_ids_are_the_union_of_tokenizer_and_generation_config(tiny):
    from transformers import AutoModelForCausalLM

    from trl_infalign.sampling import eos_token_ids

    path, tokenizer = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    other = (tokenizer.eos_token_id + 7) % len(tokenizer)
    model.generation_config.eos_token_id = [other]  # e.g. an end-of-turn token
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, other]  # RLOOTrainer's order
    model.generation_config.eos_token_id = None
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id]


def test_min_p_none_is_resolved_as_trl_generate_resolves_it(tiny):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trl_infalign.sampling import SamplingSettings

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    model.generation_config.min_p = 0.2
    model.generation_config.repetition_penalty = 3.0
    # What transformers' generate makes of TRL's RLOOTrainer generation config (min_p=None, repetition_penalty=1.0):
    trl_config = GenerationConfig(max_new_tokens=4, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, min_p=None,
                                  repetition_penalty=1.0)
    effective, _ = model._prepare_generation_config(trl_config)
    settings = SamplingSettings(max_new_tokens=4).resolved(model)
    assert (settings.min_p, settings.repetition_penalty) == (effective.min_p, effective.repetition_penalty) == (0.2, 1.0)
    assert settings.record()["min_p"] == 0.2
    assert SamplingSettings(max_new_tokens=4).resolved(model, sampler="vllm").min_p == 0.0  # TRL gives vLLM 0.0
    assert SamplingSettings(max_new_tokens=4, min_p=0.0).resolved(model).min_p == 0.0  # explicit wins
