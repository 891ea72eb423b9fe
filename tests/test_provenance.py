"""Reference provenance: recorded by build_reference_rewards, checked by CTRLTrainer at construction.

Each case of issue #11 part 1 has a test: another reward model, max_new_tokens vs max_completion_length, chat vs plain
prompts, reward weights, the "warn" / "off" overrides, a dataset without provenance, save/load round trips, and the
matched case (no error, no warning)."""

from __future__ import annotations

import copy
import shutil
import warnings

import pytest
import torch
from datasets import Dataset, load_dataset, load_from_disk

from trl_infalign import CTRLConfig, CTRLTrainer
from trl_infalign.provenance import (
    ReferenceProvenanceWarning,
    prompt_fingerprint,
    read_reference_provenance,
    read_reference_provenances,
    weights_fingerprint,
)
from trl_infalign.reference import build_reference_rewards
from trl_infalign.tiny import build_tiny_policy, build_tiny_reward_model

from conftest import TINY_PROMPTS

CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
BUILD = dict(num_samples=4, max_new_tokens=2, batch_size=4, seed=3, progress=False)


def length_reward(completions, **kwargs):
    return [len(c if isinstance(c, str) else c[0]["content"]) / 10.0 for c in completions]


def other_reward(completions, **kwargs):
    return [0.0 for _ in completions]


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    path, tokenizer = tiny
    root = tmp_path_factory.mktemp("provenance")
    rm_a, rm_b = str(root / "rm_a"), str(root / "rm_b")
    build_tiny_reward_model(tokenizer, rm_a, hidden_size=16, seed=0)
    build_tiny_reward_model(tokenizer, rm_b, hidden_size=16, seed=1)
    prompts = Dataset.from_dict({"prompt": TINY_PROMPTS})
    built = build_reference_rewards(prompts, path, [rm_a, length_reward], reward_weights=[1.0, 0.5], **BUILD)
    return {"policy": path, "tokenizer": tokenizer, "root": root, "rm_a": rm_a, "rm_b": rm_b, "built": built}


def make_trainer(tmp_path, setup, ds=None, reward_funcs=None, model=None, processing_class=None, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2, max_completion_length=2,
        max_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, transform="bon:t=2", beta=0.5,
        min_reference_samples=2, disable_tqdm=True, reward_weights=[1.0, 0.5],
    )
    kwargs.update(overrides)
    return CTRLTrainer(
        model=model or setup["policy"], reward_funcs=reward_funcs or [setup["rm_a"], length_reward],
        args=CTRLConfig(**kwargs), train_dataset=setup["built"] if ds is None else ds,
        processing_class=processing_class or setup["tokenizer"],
    )


def provenance_warnings(caught):
    return [w for w in caught if issubclass(w.category, ReferenceProvenanceWarning)]


# ----------------------------------------------------------------------------------------------------------- recorded
def test_build_records_provenance(setup):
    built = setup["built"]
    assert built.column_names == ["prompt", "ref_rewards", "ref_rewards_provenance"]
    record = read_reference_provenance(built)
    assert record["num_samples"] == 4 and record["seed"] == 3 and record["prompt_format"] == "plain"
    assert record["sampling"] == {"max_new_tokens": 2, "min_p": 0.0, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert record["reference_model"]["name"] == str(__import__("pathlib").Path(setup["policy"]).resolve())
    assert len(record["reference_model"]["fingerprint"]) == 16
    rm, func = record["reward_funcs"]
    assert rm["kind"] == "model" and rm["name"].endswith("rm_a") and rm["weight"] == 1.0 and rm["fingerprint"]
    assert func == {"kind": "callable", "name": f"{__name__}:length_reward", "weight": 0.5}
    assert record["trl_infalign"] == __import__("trl_infalign").__version__
    rows = built["ref_rewards_provenance"]
    assert [r["prompt_sha256"] for r in rows] == [prompt_fingerprint(p) for p in TINY_PROMPTS]
    assert read_reference_provenance(Dataset.from_dict({"prompt": ["a"], "ref_rewards": [[1.0]]})) is None


def test_provenance_survives_save_to_disk_json_and_row_operations(setup, tmp_path):
    built, record = setup["built"], read_reference_provenance(setup["built"])
    built.save_to_disk(str(tmp_path / "disk"))
    assert read_reference_provenance(load_from_disk(str(tmp_path / "disk"))) == record
    built.to_json(str(tmp_path / "data.jsonl"))
    from_json = load_dataset("json", data_files=str(tmp_path / "data.jsonl"), split="train")
    assert read_reference_provenance(from_json) == record
    assert read_reference_provenance(built.shuffle(seed=0).select([2, 0])) == record
    assert read_reference_provenance(built.train_test_split(test_size=1, seed=0)["test"]) == record
    assert [p["prompt_sha256"] for p in from_json["ref_rewards_provenance"]] == [p["prompt_sha256"] for p in built["ref_rewards_provenance"]]


def test_weights_fingerprint_is_dtype_and_peft_independent(setup):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(setup["policy"])
    bf16 = AutoModelForCausalLM.from_pretrained(setup["policy"], dtype=torch.bfloat16)
    reference = weights_fingerprint(fp32)
    assert reference is not None and weights_fingerprint(bf16) == reference
    peft = get_peft_model(copy.deepcopy(fp32), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], lora_alpha=4))
    assert weights_fingerprint(peft) == reference
    with torch.no_grad():  # like a few fine-tuning steps: every weight moves a little (a single edited value may not
        for param in fp32.parameters():  # be among the sampled ones: the fingerprint is cheap, not exhaustive)
            param.mul_(1.01)
    assert weights_fingerprint(fp32) != reference


# ------------------------------------------------------------------------------------------------------------ checked
def test_matched_references_construct_without_error_or_warning(setup, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup)
    assert provenance_warnings(caught) == []


def test_copied_model_directory_is_accepted_by_fingerprint(setup, tmp_path):
    copy_dir = tmp_path / "policy-copy"
    shutil.copytree(setup["policy"], copy_dir)
    rm_copy = tmp_path / "rm-copy"
    shutil.copytree(setup["rm_a"], rm_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, model=str(copy_dir), reward_funcs=[str(rm_copy), length_reward])
    assert provenance_warnings(caught) == []


def test_other_reward_model_raises_naming_the_reward_function(setup, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)reward function 0 'rm_b': recorded reward model '.*rm_a'.*this run reward model '.*rm_b'") as info:
        make_trainer(tmp_path, setup, reward_funcs=[setup["rm_b"], length_reward])
    assert "1 difference" in str(info.value) and 'reference_provenance_check="warn"' in str(info.value)
    with pytest.raises(ValueError, match=r"reward function 1 'other_reward': recorded callable .*:length_reward, this run callable .*:other_reward"):
        make_trainer(tmp_path, setup, reward_funcs=[setup["rm_a"], other_reward])


def test_max_new_tokens_vs_max_completion_length_raises(setup, tmp_path):
    with pytest.raises(ValueError, match=r"max_new_tokens: the references were sampled with max_new_tokens=2, this run samples with max_completion_length=8.*CTRLConfig.max_completion_length=2"):
        make_trainer(tmp_path, setup, max_completion_length=8)


def test_reward_weights_mismatch_raises_naming_the_weights(setup, tmp_path):
    with pytest.raises(ValueError, match=r"reward weights: recorded \[1.0, 0.5\], this run \[1.0, 5.0\].*CTRLConfig.reward_weights=\[1.0, 0.5\]"):
        make_trainer(tmp_path, setup, reward_weights=[1.0, 5.0])


def test_all_differences_in_one_error(setup, tmp_path, tiny):
    other_policy = build_tiny_policy(tiny[1], tmp_path / "other-policy", hidden_size=32, num_layers=1, seed=5)
    with pytest.raises(ValueError) as info:
        make_trainer(tmp_path, setup, model=other_policy, reward_funcs=[setup["rm_b"], length_reward],
                     reward_weights=[1.0, 5.0], max_completion_length=8, temperature=0.7)
    text = str(info.value)
    assert text.startswith("train_dataset: ") and "5 differences" in text
    for field in ("reference model:", "reward function 0", "reward weights:", "max_new_tokens:", "temperature:"):
        assert field in text, field


def test_chat_formatted_references_vs_plain_training_prompts(setup, tmp_path):
    chat_tokenizer = copy.deepcopy(setup["tokenizer"])
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    chat = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in TINY_PROMPTS]})
    built = build_reference_rewards(chat, setup["policy"], length_reward, tokenizer=chat_tokenizer, **BUILD)
    assert read_reference_provenance(built)["prompt_format"] == "conversational"
    plain = built.map(lambda row: {"prompt": row["prompt"][0]["content"]})
    with pytest.raises(ValueError, match=r"(?s)prompt format: the references were sampled from conversational prompts, this dataset's prompts are plain.*prompts: 4 of 4 rows"):
        make_trainer(tmp_path, setup, ds=plain, reward_funcs=[length_reward], reward_weights=[1.0])


def test_prompts_edited_after_the_build_are_named(setup, tmp_path):
    edited = setup["built"].map(lambda row, i: {"prompt": row["prompt"] + "!" if i == 2 else row["prompt"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"prompts: 1 of 4 rows have a different prompt .*\(rows 2\)"):
        make_trainer(tmp_path, setup, ds=edited)


def test_warn_and_off_overrides(setup, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, reward_weights=[1.0, 5.0], reference_provenance_check="warn")
    relevant = provenance_warnings(caught)
    assert len(relevant) == 1 and "reward weights: recorded [1.0, 0.5]" in str(relevant[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, reward_weights=[1.0, 5.0], reference_provenance_check="off")
    assert provenance_warnings(caught) == []


def test_dataset_without_provenance_warns_once_and_trains(setup, tmp_path):
    bare = setup["built"].remove_columns(["ref_rewards_provenance"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, setup, ds=bare)
    relevant = provenance_warnings(caught)
    assert len(relevant) == 1
    assert "check skipped" in str(relevant[0].message) and "build_reference_rewards" in str(relevant[0].message)
    trainer.train()
    assert trainer.state.global_step == 1


def test_read_back_several_builds(setup):
    from datasets import concatenate_datasets

    other = build_reference_rewards(Dataset.from_dict({"prompt": TINY_PROMPTS[:2]}), setup["policy"], length_reward, **BUILD)
    mixed = concatenate_datasets([setup["built"].remove_columns([]), other])
    builds = read_reference_provenances(mixed)
    assert sorted(count for _, count in builds) == [2, 4]
    with pytest.raises(ValueError, match="2 different reference builds"):
        read_reference_provenance(mixed)


# ---------------------------------------------------------------------------------------------------- per reward (#19)
def _fake_trainer(setup, policy, reward_funcs, names, weights):
    """What `check_reference_provenance` reads from a trainer, without building one (TRL's names and weights)."""
    from types import SimpleNamespace

    args = SimpleNamespace(
        reference_provenance_check="raise", reference_rewards_column="ref_rewards", temperature=1.0, top_p=1.0, top_k=0,
        min_p=None, repetition_penalty=1.0, max_completion_length=BUILD["max_new_tokens"], generation_kwargs=None,
        chat_template_kwargs=None, use_vllm=False,
    )
    return SimpleNamespace(args=args, accelerator=None, model=policy, processing_class=setup["tokenizer"],
                           reward_funcs=reward_funcs, reward_func_names=names, reward_weights=weights)


def test_per_reward_provenance_is_checked_per_reward_in_any_order(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from trl_infalign.provenance import check_reference_provenance, read_per_reward_identities

    prompts = Dataset.from_dict({"prompt": TINY_PROMPTS})
    built = build_reference_rewards(prompts, setup["policy"], [setup["rm_a"], length_reward], per_reward=True, **BUILD)
    recorded = read_per_reward_identities(built)
    assert sorted(recorded) == ["length_reward", "rm_a"] and recorded["rm_a"]["fingerprint"]
    policy = AutoModelForCausalLM.from_pretrained(setup["policy"])
    rm_a, rm_b = setup["rm_a"], setup["rm_b"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the same functions in another order, with other weights (each reward is stored unweighted), or one of them
        check_reference_provenance(_fake_trainer(setup, policy, [length_reward, rm_a], ["length_reward", "rm_a"], [2.0, 1.0]), built, "train")
        check_reference_provenance(_fake_trainer(setup, policy, [rm_a], ["rm_a"], [1.0]), built, "train")
    with pytest.raises(ValueError, match=r"reward 'rm_b': the per-reward references hold no rewards for it \(they hold "
                                         r"\['length_reward', 'rm_a'\]\)"):
        check_reference_provenance(_fake_trainer(setup, policy, [rm_b, length_reward], ["rm_b", "length_reward"], [1.0, 1.0]), built, "train")
    impostor = tmp_path / "elsewhere" / "rm_a"  # another reward model under a recorded name
    shutil.copytree(rm_b, impostor)
    with pytest.raises(ValueError, match=r"reward 'rm_a': recorded reward model '.*/rm_a' \(weights [0-9a-f]+\), this run "
                                         r"reward model '.*elsewhere/rm_a'"):
        check_reference_provenance(_fake_trainer(setup, policy, [str(impostor), length_reward], ["rm_a", "length_reward"], [1.0, 1.0]), built, "train")


# ------------------------------------------------------------------------------------------- effective sampling (#20.8)
def test_trainer_check_sees_the_min_p_that_generate_uses(setup, tmp_path):
    import json

    leaky = tmp_path / "policy-min-p"
    shutil.copytree(setup["policy"], leaky)
    config = json.loads((leaky / "generation_config.json").read_text())
    (leaky / "generation_config.json").write_text(json.dumps({**config, "min_p": 0.2}))
    prompts = Dataset.from_dict({"prompt": TINY_PROMPTS})
    built = build_reference_rewards(prompts, str(leaky), [setup["rm_a"], length_reward], reward_weights=[1.0, 0.5], **BUILD)
    assert read_reference_provenance(built)["sampling"]["min_p"] == 0.2  # what generate used
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, ds=built, model=str(leaky))  # min_p=None: TRL's generate takes 0.2 as well
    assert provenance_warnings(caught) == []
    with pytest.raises(ValueError, match=r"min_p: the references were sampled with min_p=0.2, this run samples with min_p=0.0"):
        make_trainer(tmp_path, setup, ds=built, model=str(leaky), min_p=0.0)


# ------------------------------------------------------------------------------------- provenance binds (#20 item 2)
def _with_rewards(ds, rewards, column="ref_rewards"):
    """`ds` with its reference rewards replaced (provenance column kept), as a user script might do it."""
    return ds.remove_columns([column]).add_column(column, list(rewards))


def test_permuted_reference_rewards_are_refused_naming_the_rows(setup, tmp_path):
    built = setup["built"]
    rows = list(built["ref_rewards"])
    assert len({tuple(r) for r in rows}) == len(rows)  # distinct rows, so a permutation changes every row
    with pytest.raises(ValueError, match=r"reference rewards: 4 of 4 rows of 'ref_rewards' hold other rewards than the "
                                         r"ones their provenance row was recorded with \(rows 0, 1, 2, 3\).*permuted"):
        make_trainer(tmp_path, setup, ds=_with_rewards(built, rows[1:] + rows[:1]))
    swapped = _with_rewards(built, [rows[0], rows[2], rows[1], rows[3]])
    with pytest.raises(ValueError, match=r"2 of 4 rows of 'ref_rewards' .*\(rows 1, 2\)"):
        make_trainer(tmp_path, setup, ds=swapped)
    # whole rows reordered (shuffle / select) keep every row's rewards with its provenance: accepted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, ds=built.select([3, 1, 0, 2]))
    assert provenance_warnings(caught) == []


def test_another_builds_rewards_under_this_provenance_are_refused(setup):
    from transformers import AutoModelForCausalLM

    from trl_infalign.provenance import check_reference_provenance

    prompts = Dataset.from_dict({"prompt": TINY_PROMPTS})
    policy = AutoModelForCausalLM.from_pretrained(setup["policy"])
    trainer = _fake_trainer(setup, policy, [setup["rm_a"], length_reward], ["rm_a", "length_reward"], [1.0, 0.5])
    other = build_reference_rewards(prompts, setup["policy"], [setup["rm_a"], length_reward], reward_weights=[1.0, 0.5],
                                    **{**BUILD, "seed": 4})
    foreign = _with_rewards(setup["built"], other["ref_rewards"])
    with pytest.raises(ValueError, match=r"reference rewards: 4 of 4 rows .*another build's rewards placed under this "
                                         r"build's provenance"):
        check_reference_provenance(trainer, foreign, "train")
    # per-reward rows {name: [K floats]}: one reward's lists permuted across rows
    per_reward = build_reference_rewards(prompts, setup["policy"], [setup["rm_a"], length_reward], per_reward=True, **BUILD)
    trainer = _fake_trainer(setup, policy, [setup["rm_a"], length_reward], ["rm_a", "length_reward"], [1.0, 1.0])
    check_reference_provenance(trainer, per_reward, "train")
    rows = list(per_reward["ref_rewards"])
    mixed = [{**row, "rm_a": rows[(i + 1) % 4]["rm_a"]} for i, row in enumerate(rows)]
    with pytest.raises(ValueError, match=r"4 of 4 rows of 'ref_rewards' hold other rewards"):
        check_reference_provenance(trainer, _with_rewards(per_reward, mixed), "train")


def varied_reward(completions, prompts, **kwargs):
    return [len(c) + 0.01 * len(p) + 1e-3 * i for i, (p, c) in enumerate(zip(prompts, completions))]


def test_provenance_costs_under_100_bytes_per_row_and_survives_row_only_formats(setup, tmp_path):
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from trl_infalign.provenance import ANCHOR_ALL_ROWS_UP_TO, ANCHOR_STRIDE, check_reference_provenance, provenance_rows

    n = ANCHOR_ALL_ROWS_UP_TO + 76  # a build large enough to store its record in every 32nd row only
    prompts = Dataset.from_dict({"prompt": [f"{TINY_PROMPTS[i % 4]} {i}" for i in range(n)]})
    built = build_reference_rewards(prompts, setup["policy"], varied_reward, num_samples=2, max_new_tokens=1,
                                    batch_size=n // 2, seed=0, progress=False)
    record = read_reference_provenance(built)
    per_row = built.data.column("ref_rewards_provenance").nbytes / n
    old_per_row = pa.array(provenance_rows(record, prompts["prompt"])).nbytes / n  # format 1: the record in every row
    assert per_row < 100 and per_row < old_per_row / 4, (per_row, old_per_row)
    policy = AutoModelForCausalLM.from_pretrained(setup["policy"])
    trainer = _fake_trainer(setup, policy, [varied_reward], ["varied_reward"], [1.0])
    trainer.args.max_completion_length = 1
    built.to_json(str(tmp_path / "big.jsonl"))  # JSON keeps only rows, and rounds floats to 10 decimals
    from_json = load_dataset("json", data_files=str(tmp_path / "big.jsonl"), split="train")
    assert read_reference_provenance(from_json) == record
    as_float32 = built.cast_column("ref_rewards", __import__("datasets").List(__import__("datasets").Value("float32")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ds in (built, from_json, as_float32, built.shuffle(seed=0).select(range(300))):
            check_reference_provenance(trainer, ds, "train")  # the digest's tolerance absorbs JSON / float32 rounding
    # a few rows without a copy of the record, in a row-only format: the settings cannot be compared; said, not raised
    few = from_json.select([i for i in range(1, 40) if i % ANCHOR_STRIDE])
    with pytest.raises(ValueError, match="whose record none of these rows carries"):
        read_reference_provenance(few)
    fresh = _fake_trainer(setup, policy, [varied_reward], ["varied_reward"], [1.0])
    fresh.args.max_completion_length = 1
    with pytest.warns(ReferenceProvenanceWarning, match=r"eval_dataset: .*38 row\(s\) belong to build\(s\)"):
        check_reference_provenance(fresh, few, "eval_dataset")
    with warnings.catch_warnings():  # the same trainer has seen the record in its training set
        warnings.simplefilter("error")
        check_reference_provenance(trainer, few, "eval_dataset")


def test_provenance_of_format_1_is_still_accepted_with_its_checks(setup, tmp_path):
    from trl_infalign.provenance import provenance_rows

    record = {**read_reference_provenance(setup["built"]), "format": 1}
    old = setup["built"].remove_columns(["ref_rewards_provenance"])
    old = old.add_column("ref_rewards_provenance", provenance_rows(record, TINY_PROMPTS))
    assert old.features["ref_rewards_provenance"].keys() == {"build", "prompt_sha256"}
    assert read_reference_provenance(old) == record
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, ds=old)
    assert provenance_warnings(caught) == []
    with pytest.raises(ValueError, match=r"reward weights: recorded \[1.0, 0.5\]"):
        make_trainer(tmp_path, setup, ds=old, reward_weights=[1.0, 5.0])
    edited = old.map(lambda row, i: {"prompt": row["prompt"] + "!" if i == 1 else row["prompt"]}, with_indices=True)
    with pytest.raises(ValueError, match=r"prompts: 1 of 4 rows .*\(rows 1\)"):
        make_trainer(tmp_path, setup, ds=edited)


def test_greedy_reference_build_is_refused_by_a_sampling_run(setup, tmp_path):
    """`generation_kwargs={"do_sample": False}` builds greedy references (one completion per prompt, repeated): another
    distribution than the one TRL trains on, which the provenance check must name (it was left out of the record)."""
    greedy = build_reference_rewards(Dataset.from_dict({"prompt": TINY_PROMPTS}), setup["policy"],
                                     [setup["rm_a"], length_reward], reward_weights=[1.0, 0.5],
                                     generation_kwargs={"do_sample": False}, **BUILD)
    assert read_reference_provenance(greedy)["sampling"]["do_sample"] is False
    with pytest.raises(ValueError, match=r"do_sample: the references were sampled with do_sample=False, this run "
                                         r"samples with generation_kwargs without 'do_sample'"):
        make_trainer(tmp_path, setup, ds=greedy)
    sampled = build_reference_rewards(Dataset.from_dict({"prompt": TINY_PROMPTS}), setup["policy"],
                                      [setup["rm_a"], length_reward], reward_weights=[1.0, 0.5],
                                      generation_kwargs={"do_sample": True}, **BUILD)
    assert "do_sample" not in read_reference_provenance(sampled)["sampling"]  # TRL's own setting: nothing to check
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, setup, ds=sampled)
    assert provenance_warnings(caught) == []
