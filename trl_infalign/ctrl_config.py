"""Configuration of the CTRL trainers (Calibrate-and-Transform RL, InfAlign, arXiv 2412.19792).

`CTRLArguments` holds the InfAlign fields and their validation; `CTRLConfig` (RLOO) and `CTRLGRPOConfig` (GRPO,
`trl_infalign.ctrl_grpo_config`) inherit them together with TRL's own config.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, fields

from trl import RLOOConfig

from .deployment import Deployment, get_deployment, is_multi_reward_spec, parse_reward_transforms
from .procedures import PROCEDURES, InferenceProcedure, get_procedure


@dataclass
class CTRLArguments:
    r"""
    The InfAlign fields shared by [`CTRLConfig`] (RLOO) and [`CTRLGRPOConfig`] (GRPO), with their validation.

    A mixin for a TRL config dataclass: `class MyConfig(CTRLArguments, SomeTRLConfig)` gets every field of both, and
    `__post_init__` validates the CTRL fields (then `_validate_trainer_fields`, the hook a trainer-specific config
    overrides), runs the TRL config's own `__post_init__`, and resolves `transform` (setting `beta` from `kl_budget`).
    Error messages name the concrete config class.

    Parameters:
        inference_procedure (`str`, defaults to `"bon"`):
            How the trained model will be used (see [`~trl_infalign.procedures`]): `standard` (one sample), `bon` (best
            of `inference_n`), `won` (worst of `inference_n`, e.g. a jailbreak attacker keeping the worst of N), a spec
            with its own N (`bon:n=8`), a request-level mixture (`mixture:0.7*standard+0.2*bon:n=8+0.1*bon:n=32`),
            a registered user procedure, or an `InferenceProcedure`. The resolved object is `config.procedure`.
            A deployment that serves different procedures on different rewards names them after `@`
            (`mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless`, the names of the reward functions as TRL derives
            them): each reward is calibrated on its own and the run trains on Φ = Σ_r W_r Φ_r(c_r)
            (`config.deployment`; docs/multi_reward.md).
        inference_n (`int`, defaults to `4`):
            N of a bare `bon` / `won`. A spec with its own N sets it (to the largest N of a mixture).
        transform (`str`, defaults to `"auto"`):
            Transform spec, e.g. `"bon:t=10"`, `"won:t=5"`, `"identity"`, `"lsc"`, `"optimal"`. `auto` picks the
            procedure's exp family with t chosen by the theory module (identity for `standard`). `optimal` is the
            numerically optimal transform for the procedure at `beta` (any procedure, mixtures included). With a
            deployment that names rewards: one transform per reward (`bon:t=3@helpful+won:t=5@harmless`), or `auto` /
            `optimal`, fitted by the trainer on the training set's reference rewards
            ([`~trl_infalign.diagnose_deployment.fit_deployment`]).
        kl_budget (`float` or `None`, defaults to `None`):
            Target KL(π‖π_ref) **per completion** in nats (the sum over a completion's tokens of log π − log π_ref; the
            unit of the theory, and of the `ctrl/sequence_kl` metric — TRL's `kl` metric is a per-token mean).
            `beta` starts at the value where the calibrated-space theory predicts KL = `kl_budget` for the chosen
            transform (with `auto`, t is the best of the family at that KL); `kl_control` says what happens next. A
            `beta` given together with `kl_budget` is replaced (with a warning).
        kl_control (`str` or `None`, defaults to `None` → `"adaptive"` with a `kl_budget`, else `"fixed"`):
            `adaptive`: a closed-loop controller ([`~trl_infalign.kl_control.AdaptiveKLController`]) corrects β in
            log space from the measured per-completion KL until the run sits on the budget; the optimum stays
            π_ref·exp(Φ(c)/β)/Z (the Lagrangian of max E[Φ(c)] s.t. KL ≤ budget). Its state is checkpointed and the
            final β is logged (`ctrl/beta`), saved in `ctrl_calibration.json` and shown on the model card. `fixed`:
            β never changes.
        reference_rewards_column (`str`, defaults to `"ref_rewards"`):
            Dataset column holding, per prompt, the rewards of K reference-policy samples
            (see [`build_reference_rewards`]).
        num_reference_samples (`int`, defaults to `16`):
            K used when building reference rewards with this config (recipes, `trl-infalign build-reference`).
        min_reference_samples (`int`, defaults to `4`):
            Rows with fewer valid reference rewards are refused: c has a resolution of 1/K.
        normalize_transform (`bool`, defaults to `True`):
            Train on (Φ − min Φ)/(max Φ − min Φ) with β/(max Φ − min Φ) (min/max over c ∈ [0, 1]). Φ and a·Φ + b at
            a·β have the same optimum, so this changes nothing but the reward scale RLOO sees; `beta` keeps the units
            of the unnormalised Φ that `trl-infalign theory` reports. Transforms of raw rewards (`lsc`) are not rescaled.
        reference_provenance_check (`str`, defaults to `"raise"`):
            Compare how the reference rewards were made (the provenance column `build_reference_rewards` writes:
            reference model, reward functions and weights, prompt format, sampling settings) with this run, and list
            every difference in one error with its fix. `warn` only warns; `off` skips the check.
        calibration_check (`str`, defaults to `"raise"`):
            Step-0 health check ([`~trl_infalign.health`]): while the policy is still the reference, its calibrated
            rewards must be ≈ Uniform[0, 1]. Exact rank tests on the first batch (false-alarm rate ≤ 1e-4) catch
            references made with another reward scale, reward model, weights, formatting or sampling before the
            first optimizer step. When the first batch is too small for the test to decide (even complete
            separation would not be significant), more completions of its prompts are drawn from the policy — still
            the reference — with the trainer's own generation and reward functions, up to
            `calibration_check_max_samples`; if that is not enough, a warning says the check was inconclusive and
            why. `warn` only warns; `off` skips it. Skipped on a resumed run.
        calibration_check_max_samples (`int`, defaults to `256`):
            At most this many extra completions (over all processes) drawn at step 0 for the health check.
        nonfinite_rewards (`str`, defaults to `"raise"`):
            What to do with a ±inf reward from any reward function, or a NaN from a reward *model*: `raise` (names the
            function, prompt and completion) or `skip` (the completion gets no advantage and is counted in
            `ctrl/nonfinite_rewards`). A `None` (or NaN) from a reward *callable* means "no reward" and is always
            skipped, as in TRL.
    """

    inference_procedure: str = field(
        default="bon",
        metadata={
            "help": "Inference-time procedure to align for: standard, bon, won (N from inference_n), a spec such as "
            "bon:n=8, a mixture such as mixture:0.7*standard+0.2*bon:n=8+0.1*bon:n=32, or a deployment that names "
            "rewards: mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless."
        },
    )
    inference_n: int = field(
        default=4, metadata={"help": "N of a bare bon / won (a spec with its own N, or a mixture, sets it)."}
    )
    transform: str = field(
        default="auto",
        metadata={
            "help": "Transform spec (`bon:t=10`, `won:t=5`, `identity`, `log`, `lsc`, `optimal`) or `auto` (the "
            "procedure's exp family with t from the theory module; identity for `standard`). Several rewards: one "
            "per reward (`bon:t=3@helpful+won:t=5@harmless`), or `auto` / `optimal` fitted on the references."
        },
    )
    kl_budget: float | None = field(
        default=None,
        metadata={"help": "Target KL(pi || pi_ref): sets `beta` (and t with `auto`) from the calibrated-space theory."},
    )
    kl_control: str | None = field(
        default=None,
        metadata={
            "help": "`adaptive` (default when kl_budget is set): start from the theory's beta and correct it from the "
            "measured per-completion KL until the run sits on kl_budget. `fixed`: keep beta (default without a "
            "budget; with a budget, beta is the theory's open-loop value).",
            "choices": ["adaptive", "fixed"],
        },
    )
    reference_rewards_column: str = field(
        default="ref_rewards",
        metadata={"help": "Dataset column with the rewards of K reference-policy samples per prompt."},
    )
    num_reference_samples: int = field(
        default=16, metadata={"help": "K: reference samples per prompt when building reference rewards."}
    )
    min_reference_samples: int = field(
        default=4, metadata={"help": "Refuse rows with fewer valid reference rewards than this."}
    )
    normalize_transform: bool = field(
        default=True,
        metadata={
            "help": "Rescale Phi affinely to [0, 1] and beta by the same factor: the optimum pi_ref*exp(Phi/beta) is "
            "unchanged, but rewards stay O(1) (exp(t*c) at t=12 reaches 1.6e5). Off: RLOO sees Phi as is."
        },
    )
    reference_provenance_check: str = field(
        default="raise",
        metadata={
            "help": "Compare how the reference rewards were made (recorded by build_reference_rewards: reference "
            "model, reward functions and weights, prompt format, sampling settings) with this run: `raise` (default) "
            "lists every difference with its fix, `warn` only warns, `off` skips the check.",
            "choices": ["raise", "warn", "off"],
        },
    )
    calibration_check: str = field(
        default="raise",
        metadata={
            "help": "Step-0 health check: while the policy is still the reference, its calibrated rewards must be "
            "~Uniform[0, 1]; a gross mismatch (references made with another reward, weights, formatting or sampling) "
            "is detected on the first batch (false-alarm rate 1e-4). `raise` (default), `warn` or `off`.",
            "choices": ["raise", "warn", "off"],
        },
    )
    calibration_check_max_samples: int = field(
        default=256,
        metadata={
            "help": "At most this many extra completions (all processes) drawn at step 0 when the first batch is too "
            "small for the health check to decide; 0 never draws (the check then warns that it was inconclusive)."
        },
    )
    nonfinite_rewards: str = field(
        default="raise",
        metadata={"help": "On a +-inf reward (or NaN from a reward model): `raise` (default) or `skip` (no advantage, counted).", "choices": ["raise", "skip"]},
    )

    def __post_init__(self):
        self._validate_ctrl_fields()
        self._validate_trainer_fields()
        super().__post_init__()
        self.resolve_transform()

    #: Appended to the `beta` error (a trainer-specific reason, e.g. GRPO's default beta=0.0).
    _beta_hint = ""

    @property
    def _ctrl_name(self) -> str:
        return type(self).__name__

    @classmethod
    def _default_beta(cls) -> float:
        return next(f.default for f in fields(cls) if f.name == "beta")

    def _validate_trainer_fields(self) -> None:
        """Hook: checks of the underlying TRL trainer's own fields (none for RLOO; see `CTRLGRPOConfig`)."""

    @property
    def procedure(self) -> InferenceProcedure:
        """The inference procedure this run aligns for (:mod:`trl_infalign.procedures`); for a deployment that names
        rewards, every component's procedure as one reward-free mixture (see :attr:`deployment`)."""
        spec = self.inference_procedure
        if is_multi_reward_spec(spec):
            return self.deployment.procedure
        bare = isinstance(spec, str) and ":" not in spec
        return get_procedure(spec, self.inference_n if bare else None)

    @property
    def deployment(self) -> Deployment:
        """The deployment this run aligns for (:mod:`trl_infalign.deployment`): the procedure on the one reward, or
        procedures judged on named rewards (``mixture:0.5*bon:n=4@helpful+0.5*won:n=4@harmless``)."""
        spec = self.inference_procedure
        if is_multi_reward_spec(spec):
            return get_deployment(spec, self.inference_n)
        return get_deployment(self.procedure)

    @property
    def is_multi_reward(self) -> bool:
        """True when the deployment names rewards: each is calibrated against its own reference rewards."""
        return is_multi_reward_spec(self.inference_procedure)

    def _validate_ctrl_fields(self):
        if isinstance(self.inference_n, bool) or not isinstance(self.inference_n, int) or self.inference_n < 1:
            raise ValueError(f"{self._ctrl_name}.inference_n must be an integer >= 1, got {self.inference_n!r}.")
        try:
            procedure = self.procedure
        except ValueError as error:
            raise ValueError(f"{self._ctrl_name}.inference_procedure={self.inference_procedure!r}: {error}") from None
        if self.is_multi_reward:
            self.inference_procedure, self.inference_n = self.deployment.spec, procedure.n
        bare = isinstance(self.inference_procedure, str) and ":" not in self.inference_procedure
        if bare and procedure.name == "standard" and self.inference_n != 1:
            raise ValueError(
                f"{self._ctrl_name}.inference_procedure='standard' means one sample: set inference_n=1, or use 'bon'/'won'."
            )
        unknown = [p for _, p in procedure.components() if not p.samples_known]
        if unknown:
            raise ValueError(
                f"{self._ctrl_name}.inference_procedure={self.inference_procedure!r}: the number of samples one request "
                f"draws is unknown for {', '.join(repr(p.spec) for p in unknown)} (registered without samples=, and its "
                "output_cdf is neither the identity nor given as a polynomial), so inference_n, the model card and the "
                f"evaluations cannot know it. Register it with samples=, e.g. register_procedure({unknown[0].name!r}, f, "
                "samples=lambda **params: ...) (an int works too)."
            )
        user_bare = bare and procedure.name not in PROCEDURES  # a registered user procedure under its bare name
        if user_bare and procedure.params.get("n") == self.inference_n and procedure.n != self.inference_n:
            warnings.warn(
                f"{self._ctrl_name}: inference_procedure={self.inference_procedure!r} takes inference_n="
                f"{self.inference_n} as its n: it is {procedure.spec!r}, which draws {procedure.n} samples per request, "
                f"so inference_n is set to {procedure.n}. Give the spec (inference_procedure={procedure.spec!r}) to "
                "silence this.",
                UserWarning,
                stacklevel=4,
            )
            self.inference_procedure, self.inference_n = procedure.spec, procedure.n
        elif (not bare or user_bare) and not self.is_multi_reward:
            default_n = next(f.default for f in fields(self) if f.name == "inference_n")
            if self.inference_n not in (default_n, procedure.n):
                warnings.warn(
                    f"{self._ctrl_name}: inference_n={self.inference_n} is overridden by inference_procedure="
                    f"{procedure.spec!r}, which draws up to {procedure.n} samples per request: inference_n is set to "
                    f"{procedure.n}. Drop inference_n to silence this.",
                    UserWarning,
                    stacklevel=4,
                )
            self.inference_procedure, self.inference_n = procedure.spec, procedure.n
        if self.kl_budget is not None and not (math.isfinite(self.kl_budget) and self.kl_budget > 0):
            raise ValueError(f"{self._ctrl_name}.kl_budget must be a finite number > 0 (or None), got {self.kl_budget!r}.")
        if self.kl_control is None:
            self.kl_control = "adaptive" if self.kl_budget is not None else "fixed"
        if self.kl_control not in ("adaptive", "fixed"):
            raise ValueError(f"{self._ctrl_name}.kl_control must be 'adaptive' or 'fixed', got {self.kl_control!r}.")
        if self.kl_control == "adaptive" and self.kl_budget is None:
            raise ValueError(
                f"{self._ctrl_name}.kl_control='adaptive' needs a target: set kl_budget (per-completion KL in nats), or use "
                "kl_control='fixed' with an explicit beta."
            )
        if self.kl_budget is None and not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(
                f"{self._ctrl_name}.beta must be > 0, got {self.beta!r}: CTRL is KL-regularised RL, its optimum "
                f"pi_ref * exp(Phi(c)/beta) needs beta > 0. Set beta > 0 or a kl_budget.{self._beta_hint}"
            )
        if not self.reference_rewards_column:
            raise ValueError(f"{self._ctrl_name}.reference_rewards_column must name a dataset column, e.g. 'ref_rewards'.")
        if self.num_reference_samples < 1:
            raise ValueError(f"{self._ctrl_name}.num_reference_samples must be >= 1, got {self.num_reference_samples}.")
        if self.min_reference_samples < 1:
            raise ValueError(f"{self._ctrl_name}.min_reference_samples must be >= 1, got {self.min_reference_samples}.")
        if self.reference_provenance_check not in ("raise", "warn", "off"):
            raise ValueError(
                f"{self._ctrl_name}.reference_provenance_check must be 'raise', 'warn' or 'off', got "
                f"{self.reference_provenance_check!r}."
            )
        if self.calibration_check not in ("raise", "warn", "off"):
            raise ValueError(
                f"{self._ctrl_name}.calibration_check must be 'raise', 'warn' or 'off', got {self.calibration_check!r}."
            )
        if (isinstance(self.calibration_check_max_samples, bool) or not isinstance(self.calibration_check_max_samples, int)
                or self.calibration_check_max_samples < 0):
            raise ValueError(
                f"{self._ctrl_name}.calibration_check_max_samples must be an integer >= 0, got "
                f"{self.calibration_check_max_samples!r}."
            )
        if self.nonfinite_rewards not in ("raise", "skip"):
            raise ValueError(f"{self._ctrl_name}.nonfinite_rewards must be 'raise' or 'skip', got {self.nonfinite_rewards!r}.")

    def resolve_transform(self):
        """Turn `transform` into a concrete spec (stored in `resolved_transform`), setting `beta` from `kl_budget`.

        Called at construction so that an invalid spec fails before any model is loaded.  What a spec states is kept,
        or its override announced: see :meth:`_resolve_optimal` for the parameters of an ``optimal:…`` spec, and
        :meth:`_warn_if_transform_family_mismatch` for a transform that aligns for another deployment.
        """
        from . import theory
        from .transforms import TransformError, get_transform

        if self.is_multi_reward:
            return self._resolve_reward_transforms()
        procedure, budget = self.procedure, self.kl_budget
        given_beta, beta_given = self.beta, self.beta != self._default_beta()
        spec = self.transform.strip()
        try:
            if spec == "auto":
                if procedure.is_standard:
                    spec = "identity"
                elif budget is not None:
                    best = theory.best_t(procedure, kl=budget)
                    spec, self.beta = best.transform, best.beta
                else:
                    spec = theory.best_t_for_beta(procedure, beta=self.beta, details=True).transform
            elif spec.split(":", 1)[0].strip() == "optimal":
                spec = self._resolve_optimal(spec, procedure, budget, beta_given)
            transform = get_transform(spec)
            if budget is not None and transform.requires_raw_rewards:
                if self.kl_control != "adaptive":
                    raise ValueError(
                        f"{self._ctrl_name}.kl_budget with transform={self.transform!r} needs kl_control='adaptive': the "
                        "transform has no calibrated-space form to predict beta from. Use kl_control='adaptive' "
                        "(it starts from `beta`) or set beta directly without a kl_budget."
                    )
                warnings.warn(
                    f"{self._ctrl_name}: transform={self.transform!r} has no calibrated-space prediction of beta for "
                    f"kl_budget={budget:g}; the adaptive KL controller starts from beta={self.beta:g} and corrects it "
                    "from the measured per-completion KL. Start it closer with `beta` to converge faster.",
                    UserWarning,
                    stacklevel=3,
                )
                beta_given = False  # `beta` is the controller's start here, not overridden
            elif budget is not None and not (self.transform.strip() == "auto" and not procedure.is_standard) and (
                transform.name != "optimal"
            ):
                self.beta = theory.beta_for_kl(transform, budget)
        except TransformError as error:
            raise ValueError(f"{self._ctrl_name}.transform={self.transform!r}: {error}") from error
        if budget is not None and beta_given:
            control = (
                "the adaptive KL controller then corrects it from the measured per-completion KL"
                if self.kl_control == "adaptive"
                else "kept for the whole run (kl_control='fixed')"
            )
            warnings.warn(
                f"{self._ctrl_name}: beta={given_beta:g} and kl_budget={budget:g} were both given; kl_budget wins: beta is "
                f"set to {self.beta:.6g}, the calibrated-space theory's value for {spec!r} at that KL, and "
                f"{control}. Drop beta to silence this, or drop kl_budget to train at beta={given_beta:g}.",
                UserWarning,
                stacklevel=3,
            )
        self._warn_if_transform_family_mismatch(transform)
        self.resolved_transform = transform.spec
        return transform

    @property
    def fits_on_references(self) -> bool:
        """True when the trainer fits the transform's t's and/or β on the training set's reference rewards at
        construction: several rewards with `transform="auto"` / `"optimal"` or a `kl_budget` (their joint law under
        the reference matters, so no data-free theory exists; :func:`trl_infalign.diagnose.fit_deployment`)."""
        return self.is_multi_reward and (self.transform.strip() in ("auto", "optimal") or self.kl_budget is not None)

    def _resolve_reward_transforms(self):
        """Several rewards: check the per-reward transform spec now; `auto`, `optimal` and `kl_budget` are fitted by
        the trainer on the training set's reference rewards (`fits_on_references`)."""
        from .transforms import TransformError, get_transform

        spec = self.transform.strip()
        self.resolved_transform = spec
        if spec in ("auto", "optimal"):
            return None
        if spec.split(":", 1)[0] in ("auto", "optimal"):
            raise ValueError(
                f"{self._ctrl_name}.transform={self.transform!r}: with several rewards, 'optimal' (and 'auto') are fitted "
                "on the training set's reference rewards: give transform='optimal' or 'auto' without parameters, or a "
                "per-reward spec such as 'bon:t=3@helpful+won:t=5@harmless'."
            )
        named = {r for r in self.deployment.rewards if r is not None}
        try:
            parsed = parse_reward_transforms(spec)
            for reward, inner in parsed.items():
                if reward is not None and reward not in named:
                    raise TransformError(
                        f"it names reward {reward!r}, which inference_procedure={self.inference_procedure!r} does not "
                        f"judge on (its rewards: {sorted(named)})"
                    )
                transform = get_transform(inner)
                if transform.requires_raw_rewards:
                    raise TransformError(
                        f"{transform.spec!r} shapes raw rewards; with several rewards each reward's transform must "
                        "be a function of its calibrated reward (identity, bon:t=..., won:t=..., log, ...)"
                    )
        except (TransformError, ValueError) as error:
            raise ValueError(f"{self._ctrl_name}.transform={self.transform!r}: {error}") from None
        missing = sorted(named - set(parsed)) if None not in parsed else []
        if missing:
            raise ValueError(
                f"{self._ctrl_name}.transform={self.transform!r} gives no transform for reward(s) {missing} of "
                f"inference_procedure={self.inference_procedure!r}: give one per reward, e.g. "
                "'bon:t=3@helpful+won:t=5@harmless', or 'auto'."
            )
        return None

    def _resolve_optimal(self, spec: str, procedure: InferenceProcedure, budget: float | None, beta_given: bool) -> str:
        """The concrete spec of an ``optimal[:procedure=…,n=…,beta=…]`` transform, setting `beta`.

        - `procedure=` / `n=` in the spec are kept: the transform aligns for that procedure (a missing `procedure=`
          with `n=` is `inference_procedure`'s name at that n), and a procedure other than `inference_procedure`
          warns with the cost (:meth:`_warn_if_transform_family_mismatch`).  Without them it is `inference_procedure`.
        - `beta=` in the spec: with `kl_budget`, the budget sets β (the β at which the optimum spends that KL) and a
          different `beta=` is replaced with a warning naming both; without a budget it is the trainer's β, and a
          different explicit `beta` raises (Φ* is optimal only when trained at its own β).
        """
        from . import theory
        from .transforms import get_transform, parse_spec

        _, given = parse_spec(spec)
        get_transform(spec)  # validates the parameters (TransformError names them)
        target = procedure
        if "procedure" in given or "n" in given:
            params = {"procedure": given.get("procedure", procedure.short_name or procedure)}
            if "n" in given:
                params["n"] = given["n"]
            target = get_transform("optimal", **params).procedure
        if budget is not None:
            try:
                self.beta = theory.optimal_policy(target, kl=budget).beta
            except ValueError as error:
                raise ValueError(f"{self._ctrl_name}.kl_budget={budget:g} with transform={self.transform!r}: {error}") from None
            if "beta" in given and float(f"{float(given['beta']):.6g}") != float(f"{self.beta:.6g}"):
                warnings.warn(
                    f"{self._ctrl_name}: beta={float(given['beta']):g} in transform={self.transform!r} is replaced by "
                    f"{self.beta:.6g}: kl_budget={budget:g} sets the trainer's beta, and the optimal transform is "
                    f"tabulated at the beta where the optimal {target.label} policy spends {budget:g} nats. Drop beta= "
                    f"from the transform to silence this, or drop kl_budget to train at beta={float(given['beta']):g}.",
                    UserWarning,
                    stacklevel=5,
                )
        elif "beta" in given:
            written = float(given["beta"])
            if beta_given and not math.isclose(self.beta, written, rel_tol=1e-9):
                raise ValueError(
                    f"{self._ctrl_name}.transform={self.transform!r} is the optimal transform at beta={written:g}, but "
                    f"{self._ctrl_name}.beta={self.beta:g}: Phi* is optimal only when trained at its own beta. Give one: "
                    f"drop beta= from the transform (it then takes {self._ctrl_name}.beta), or set beta={written:g}."
                )
            self.beta = written
        return get_transform("optimal", procedure=target, beta=float(f"{self.beta:.6g}")).spec

    #: A calibrated transform whose theory win rate for the deployment is this far below `auto`'s at the same KL warns.
    _MISMATCH_MARGIN = 0.01

    def _warn_if_transform_family_mismatch(self, transform) -> None:
        """Warn, with what it costs at the run's KL by the calibrated-space theory, when the transform aligns for
        another deployment than `inference_procedure`: always for an exp family of the other procedure (bon:t for won,
        either for standard) and for the optimal transform of another procedure; for any other calibrated transform
        (identity, log, a tabulated one, ...) when its win rate for the deployment is more than `_MISMATCH_MARGIN`
        below what `auto` reaches at the same KL.  Not checked: `auto`, the procedure's own exp family (its t is the
        user's choice), the optimal transform of this procedure and transforms of raw rewards; nor, for the other
        calibrated transforms, a run that left `inference_procedure` / `inference_n` at their defaults."""
        from . import theory
        from .transforms import EXP_FAMILIES

        procedure = self.procedure
        if self.transform.strip() == "auto" or transform.requires_raw_rewards:
            return
        if procedure.is_standard and transform.name == "identity":
            return
        family = transform.name in EXP_FAMILIES
        if family and not procedure.is_standard and transform.name in procedure.families:
            return
        trained_for = getattr(transform, "procedure", None) if transform.name == "optimal" else None
        if trained_for is not None and trained_for == procedure:
            return
        always = family or trained_for is not None
        defaults = {f.name: f.default for f in fields(self) if f.name in ("inference_procedure", "inference_n")}
        if not always and (self.inference_procedure, self.inference_n) == (
            defaults["inference_procedure"], defaults["inference_n"]
        ):
            return  # a calibrated transform with the deployment left at its default: the user chose no deployment
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # best_t's own limit warnings are not this run's business
                given = theory.policy(transform, self.beta)
                kl = given.kl()
                if self.kl_budget is not None and abs(kl - self.kl_budget) <= 1e-6 * self.kl_budget:
                    kl = self.kl_budget  # the budget's own search is cached
                given_win = given.win_rate(procedure)
                if procedure.is_standard:
                    better = "identity"
                    better_win = theory.policy("identity", theory.beta_for_kl("identity", kl)).win_rate()
                else:
                    best = theory.best_t(procedure, kl=kl)
                    better, better_win = best.transform, best.win_rate
        except ValueError:  # e.g. an unreachable KL: no numbers to give, a mismatch is still worth saying
            if not always:
                return
            given = None
        if not always and given_win >= better_win - self._MISMATCH_MARGIN:
            return
        label = procedure.label
        called = "" if label == self.inference_procedure else f" ({label})"
        numbers = (
            f" At its KL {kl:.3g} the theory gives a {label} win rate of {given_win:.3f}; "
            f"{better!r} gives {better_win:.3f} at the same KL."
            if given is not None
            else ""
        )
        if family:
            family_label = get_procedure(transform.name, max(procedure.n, 2)).label  # the deployment the family is for
            head = f"transform={transform.spec!r} is the {family_label} family, but inference_procedure={self.inference_procedure!r}."
            advice = f" Use transform='auto' to align for {label}."
        elif trained_for is not None:
            head = (
                f"transform={self.transform!r} is the optimal transform for {trained_for.label}, but inference_procedure="
                f"{self.inference_procedure!r}{called}; it is kept as written, so the run aligns for {trained_for.label}."
            )
            advice = (f" Use transform='optimal' (or 'auto') to align for {label}, or set inference_procedure="
                      f"{trained_for.spec!r} if that is the deployment.")
        else:
            head = f"transform={transform.spec!r} does not align for inference_procedure={self.inference_procedure!r}{called}."
            advice = f" Use transform='auto' (or 'optimal') to align for {label}."
        warnings.warn(f"{self._ctrl_name}: {head}{numbers}{advice}", UserWarning, stacklevel=4)


@dataclass
class CTRLConfig(CTRLArguments, RLOOConfig):
    r"""
    Configuration class for [`CTRLTrainer`]: every [`trl.RLOOConfig`] field, plus the InfAlign ones below.

    CTRL replaces the reward RLOO sees by \\(\Phi(c)\\), where \\(c\\) is the calibrated reward (the response's
    empirical CDF value among K reference-policy responses to the same prompt) and \\(\Phi\\) a transform chosen for the
    inference-time procedure: Best-of-N (`bon`: \\(e^{t c}\\)), Worst-of-N (`won`: \\(-e^{-t c}\\)) or plain sampling
    (`standard`: identity, exactly optimal for the win rate). The KL-regularised optimum is
    \\(\pi^*(y|x) \propto \pi_{\mathrm{ref}}(y|x)\, e^{\Phi(c(x,y))/\beta}\\).

    The InfAlign fields come from [`CTRLArguments`] (shared with [`CTRLGRPOConfig`]); their documentation follows.
    """


# One parameter list for both configs: CTRLConfig's docstring ends with CTRLArguments' "Parameters:" section.
CTRLConfig.__doc__ += CTRLArguments.__doc__[CTRLArguments.__doc__.index("    Parameters:"):]

