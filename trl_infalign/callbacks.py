"""Training-time monitoring of inference-time win rates (BoN-N / WoN-N / mixtures / any procedure) and KL against
the reference.

    from trl_infalign import InferenceWinRateCallback
    trainer = CTRLTrainer(...)          # or any TRL / transformers Trainer
    trainer.add_callback(InferenceWinRateCallback(eval_prompts, reward_funcs=["my-rm"], trainer=trainer,
                                                  ns=(4,), procedures=("bon", "won"), num_samples=8, every_n_steps=50))

Every `every_n_steps` optimizer steps the callback samples `num_samples` completions per prompt from the current
policy, scores them with the reward functions, and logs `eval_infalign/bon@4_win_rate` (+ `_ci_low` / `_ci_high`),
`eval_infalign/won@4_win_rate`, `eval_infalign/kl_k1` (KL per completion, k1, nats, with `_ci_low` / `_ci_high`) and
`eval_infalign/kl_k3` next to the trainer's other metrics. `procedures` also takes full specs evaluated at their own N,
e.g. `procedures=("mixture:0.5*standard+0.5*bon:n=4",)` logs `eval_infalign/mixture(0.5*standard+0.5*bon@4)_win_rate`
(each key is the procedure's `metric_key`); a deployment that names rewards,
`procedures=("mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless",)`, logs each component's win rate on its own reward
(`eval_infalign/bon@4_win_rate/helpful`) and `eval_infalign/deployment_win_rate`. The reference samples and their
rewards are computed once, on first use, and cached. Each `EvaluationResult` in `callback.history` names what was evaluated in its `metadata`
(`policy` = "<output_dir> (step <k>)", `global_step`, `reference`, sampling settings).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import warnings

import torch
from transformers import TrainerCallback

from .evaluation import EvaluationResult, evaluate_scored, plan_procedures, split_by_samples
from .evaluation.planning import _describe_needs, _resolve_plan, deployment_min_samples, split_deployments
from .evaluation.policy import (
    _check_sampling,
    _completion_lengths,
    _gather_rows,
    _is_default_sampling,
    _kl_sampling_note,
    _load_causal_lm,
    _local_indices,
    _bind_deployments,
    _by_reward,
    _policy_sample_logps,
    _sample_and_score,
    _split_prompts,
)
from .sampling import model_name


class InferenceWinRateCallback(TrainerCallback):
    """Log inference-time win rates (standard / BoN-N / WoN-N / mixtures / user procedures) and KL(π‖π_ref) of the
    policy being trained, every `every_n_steps` steps.

    Args:
        prompts: evaluation prompts (strings or conversational), or a `datasets.Dataset` with a `prompt` column.
        reward_funcs: reward model path(s) / model(s) / callable(s), as for TRL trainers (combined with
            `reward_weights`).
        reference_model: reference policy (path or model). Default: the trainer's `ref_model` if it has one (TRL
            trainers with beta > 0), else the policy's `config._name_or_path` at the start of training (the initial
            checkpoint). It must share the policy's tokenizer.
        tokenizer: policy tokenizer (default: the trainer's `processing_class`).
        ns, procedures: which win rates to log: "standard" once, "bon" / "won" at every N of `ns`, full specs
            ("bon:n=8", "mixture:0.5*standard+0.5*bon:n=4", registered names, `InferenceProcedure` instances) once at
            their own N. `num_samples` (m) samples per prompt; every procedure needs N <= m (a ValueError otherwise).
            A deployment that names rewards (``"mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless"``) logs each
            component's win rate on its own reward (`eval_infalign/bon@4_win_rate/helpful`) and the deployment's
            Σ_j w_j W_j (`eval_infalign/deployment_win_rate`), each with `_ci_low` / `_ci_high`; its reward names
            must be the reward functions' names (checked here).
        every_n_steps: evaluate when `state.global_step % every_n_steps == 0`.
        temperature, top_p, top_k: sampling settings for the reference and the policy samples (defaults 1, 1, 0:
            sample the models themselves). Other settings compare the models as deployed with them, but the KL
            estimators then no longer estimate KL(π‖π_ref) (a UserWarning says so once, here).
        trainer: the trainer, to log through `Trainer.log` (so the metrics reach W&B / TensorBoard / ...) and to use
            its accelerator (prompts sharded across processes). Without it, the metrics are appended to
            `state.log_history` only, and the model comes from the hook's `model` argument.
        metric_prefix: prefix of the logged keys (default `eval_infalign/`).
        policy_name: what the results' `metadata["policy"]` names (default: the training run's `output_dir`); the
            step is appended as " (step <k>)".

    Results are also kept in `self.history` as `(global_step, EvaluationResult)` pairs.
    """

    def __init__(
        self,
        prompts,
        reward_funcs,
        reference_model=None,
        tokenizer=None,
        reward_processing_classes=None,
        reward_weights=None,
        ns: Sequence[int] = (4,),
        procedures: Sequence = ("bon", "won"),
        num_samples: int = 8,
        every_n_steps: int = 50,
        max_new_tokens: int = 64,
        batch_size: int = 32,
        num_bootstrap: int = 200,
        seed: int = 0,
        trainer=None,
        metric_prefix: str = "eval_infalign/",
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        policy_name: str | None = None,
    ):
        from .sampling import load_reward_funcs

        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}.")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self.prompts, self.columns = _split_prompts(prompts)
        self.ns = [int(n) for n in ns]
        self.procedures = [procedures] if isinstance(procedures, str) else list(procedures)
        ordinary, deployments = split_deployments(self.procedures)
        too_big = split_by_samples(plan_procedures(ordinary, self.ns), num_samples)[1] if ordinary else []
        too_big_d = [d for d in deployments if deployment_min_samples(d) > num_samples]
        if too_big or too_big_d:
            raise ValueError(
                f"{_describe_needs(too_big, too_big_d)} need more than num_samples = {num_samples} samples per prompt: "
                "every procedure's N must be <= num_samples (raise num_samples or lower N)."
            )
        plans, deployments = _resolve_plan(self.ns, self.procedures, num_samples)
        #: the procedure objects evaluated, in order (bare names expanded over `ns`)
        self.inference_procedures = [p.procedure for p in plans]
        self.temperature, self.top_p, self.top_k = _check_sampling(temperature, top_p, top_k)
        self._kl_note = None
        if not _is_default_sampling(self.temperature, self.top_p, self.top_k):
            self._kl_note = _kl_sampling_note(self.temperature, self.top_p, self.top_k)
            warnings.warn(f"InferenceWinRateCallback: {self._kl_note}", UserWarning, stacklevel=2)
        if policy_name is not None and (not isinstance(policy_name, str) or not policy_name):
            raise ValueError(f"policy_name must be a non-empty string, got {policy_name!r}.")
        self.policy_name = policy_name
        self.reward_funcs, self.reward_processing_classes = load_reward_funcs(reward_funcs, reward_processing_classes)
        #: the deployments that name rewards, bound to the reward functions' names (`reward_names`)
        self.reward_names, self.deployments = _bind_deployments(deployments, self.reward_funcs)
        self.reward_weights = reward_weights
        self.reference_model = reference_model
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.every_n_steps = every_n_steps
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.num_bootstrap = num_bootstrap
        self.seed = seed
        self.trainer = trainer
        self.metric_prefix = metric_prefix
        self.history: list[tuple[int, EvaluationResult]] = []
        self._reference = None  # resolved reference model
        self._reference_path = None
        self._reference_rewards = None  # cached (P_local, m) rewards of the reference samples
        self._reference_per_func = None  # cached (P_local, m, F): each reward function's score of them
        self._local = None
        self._last_step = -1

    # -- resolution ---------------------------------------------------------------------------------------------------
    def _state(self):
        if self.trainer is not None and getattr(self.trainer, "accelerator", None) is not None:
            return self.trainer.accelerator
        from accelerate import PartialState

        return PartialState()

    def _model(self, kwargs):
        if self.trainer is not None:
            return self.trainer.model
        model = kwargs.get("model")
        if model is None:
            raise ValueError("InferenceWinRateCallback needs `trainer=` or a `model` argument in the callback hook.")
        return model

    def _tokenizer(self, kwargs):
        tok = self.tokenizer or kwargs.get("processing_class")
        if tok is None and self.trainer is not None:
            tok = getattr(self.trainer, "processing_class", None)
        if tok is None:
            raise ValueError("InferenceWinRateCallback needs a tokenizer: pass `tokenizer=` (or use it with a trainer).")
        tok = getattr(tok, "tokenizer", tok)  # processors wrap their tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
        return tok

    def _remember_reference(self, model) -> None:
        """Decide the reference at the start of training (before the policy has moved)."""
        if self.reference_model is not None or self._reference is not None or self._reference_path is not None:
            return
        ref = getattr(self.trainer, "ref_model", None) if self.trainer is not None else None
        if ref is not None:
            self._reference = ref
            return
        path = getattr(getattr(model, "config", None), "_name_or_path", "") if model is not None else ""
        if not path:
            raise ValueError(
                "InferenceWinRateCallback could not find a reference model: pass `reference_model=` (path or model); "
                "the trainer has no `ref_model` and the policy's `config._name_or_path` is empty."
            )
        self._reference_path = path

    def _reference_for(self, model):
        if self._reference is None:
            source = self.reference_model if self.reference_model is not None else self._reference_path
            if source is None:
                self._remember_reference(model)
                source = self._reference if self._reference is not None else self._reference_path
            device = next(model.parameters()).device
            self._reference = _load_causal_lm(source, device) if isinstance(source, (str, Path)) else source
            self._reference.eval()
        return self._reference

    # -- hooks --------------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        model = self.trainer.model if self.trainer is not None else kwargs.get("model")
        self._remember_reference(model)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step == self._last_step or step % self.every_n_steps != 0:
            return
        self._last_step = step
        result = self.evaluate(kwargs, args=args, step=step)
        self.history.append((step, result))
        metrics = result.metrics(prefix=self.metric_prefix)
        self._log(metrics, state, control)

    def evaluate(self, kwargs: dict | None = None, *, args=None, step: int | None = None) -> EvaluationResult:
        """Run one evaluation of the current policy now (what `on_step_end` does every `every_n_steps` steps).

        `args` (the `TrainingArguments`) and `step` name the evaluated model in `metadata["policy"]` as
        "<output_dir> (step <step>)"; both default to the trainer's when the callback has one.
        """
        kwargs = kwargs or {}
        model = self._model(kwargs)
        tokenizer = self._tokenizer(kwargs)
        dist = self._state()
        reference = self._reference_for(model)
        if self._local is None:
            self._local = _local_indices(dist, len(self.prompts))
        prompts = [self.prompts[i] for i in self._local]
        columns = {k: [v[i] for i in self._local] for k, v in self.columns.items()}
        rank = getattr(dist, "process_index", 0)
        common = dict(num_samples=self.num_samples, max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                      progress=False, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        was_training = model.training
        rng_state = torch.random.get_rng_state()
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            if self._reference_rewards is None:
                if prompts:
                    torch.manual_seed(self.seed * 1_000_003 + 2 * rank + 1)
                    ref = _sample_and_score(reference, tokenizer, prompts, columns, self.reward_funcs,
                                            self.reward_processing_classes, self.reward_weights, **common)
                    self._reference_rewards, self._reference_per_func = ref.rewards, ref.per_func
                else:
                    self._reference_rewards = torch.zeros(0, self.num_samples, dtype=torch.float64)
                    self._reference_per_func = torch.zeros(0, self.num_samples, len(self.reward_funcs),
                                                           dtype=torch.float64)
            if prompts:
                torch.manual_seed(self.seed * 1_000_003 + 2 * rank + 1_000 * (self._last_step + 1))
                pol = _sample_and_score(model, tokenizer, prompts, columns, self.reward_funcs,
                                        self.reward_processing_classes, self.reward_weights, **common)
                lp, lr = _policy_sample_logps(model, reference, tokenizer, pol.completions, self.num_samples,
                                              self.batch_size)
                pr, pf, lengths = pol.rewards, pol.per_func, _completion_lengths(pol.completions)
            else:
                pr = lp = lr = lengths = torch.zeros(0, self.num_samples, dtype=torch.float64)
                pf = torch.zeros(0, self.num_samples, len(self.reward_funcs), dtype=torch.float64)
        finally:
            model.train(was_training)
            # do not perturb the trainer's sampling stream
            torch.random.set_rng_state(rng_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
        pr, rr, lp, lr, lengths, pf, rf = _gather_rows(dist, self._local, pr, self._reference_rewards, lp, lr, lengths,
                                                       pf, self._reference_per_func)
        by_reward = {} if not self.deployments else dict(
            policy_rewards_by_reward=_by_reward(self.reward_names, pf),
            reference_rewards_by_reward=_by_reward(self.reward_names, rf))
        return evaluate_scored(pr, rr, self.ns, self.inference_procedures + self.deployments, lp, lr,
                               num_bootstrap=self.num_bootstrap, seed=self.seed,
                               metadata=self._metadata(args, step, lengths), **by_reward)

    def _metadata(self, args, step, lengths) -> dict:
        """What was evaluated: the run (output_dir) at its step, the reference, and the sampling settings."""
        if args is None and self.trainer is not None:
            args = getattr(self.trainer, "args", None)
        if step is None and self.trainer is not None and getattr(self.trainer, "state", None) is not None:
            step = self.trainer.state.global_step
        base = self.policy_name or (str(args.output_dir) if getattr(args, "output_dir", None) else None)
        if base is None:
            base = "policy being trained"
        source = self.reference_model if self.reference_model is not None else self._reference_path
        reference = model_name(source if source is not None else self._reference)
        metadata = {
            "policy": base if step is None else f"{base} (step {step})", "global_step": step,
            "reference": reference, "policy_in_memory": True, "num_samples": self.num_samples,
            "max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed,
            "num_processes": getattr(self._state(), "num_processes", 1),
            "mean_completion_tokens": float(lengths.mean()) if lengths.numel() else None,
        }
        if self._kl_note is not None:
            metadata["kl_note"] = self._kl_note
        return metadata

    def _log(self, metrics: dict, state, control=None) -> None:
        if self.trainer is not None:
            from transformers import Trainer

            # `on_log` clears `control.should_log`: keep the trainer's own logging decision for this step.
            should_log = control.should_log if control is not None else None
            if isinstance(self.trainer, Trainer):
                # Base-class log: appends to state.log_history and fires on_log (reporters), without TRL's override,
                # which would merge in and clear the trainer's accumulated training metrics.
                Trainer.log(self.trainer, dict(metrics))
            else:
                self.trainer.log(dict(metrics))
            if control is not None:
                control.should_log = should_log
                if getattr(self.trainer, "control", None) is not None:
                    self.trainer.control.should_log = should_log
        else:
            state.log_history.append({**metrics, "step": state.global_step})
