r"""Reward transforms Φ applied to calibrated rewards c ∈ [0, 1] (InfAlign / CTRL, arXiv 2412.19792).

CTRL trains with KL-regularised RL on Φ(c); the optimum is π*(y|x) ∝ π_ref(y|x)·exp(Φ(c(x, y))/β), so only the shape
of Φ matters (a·Φ + b at β·a gives the same policy).  Built-ins:

============  ==========================================  ======================================================
name          Φ(c)                                        parameters
============  ==========================================  ======================================================
identity      c                                           —
log           log(max(c, eps))                            eps ∈ (0, 1), default 1e-3
bon           exp(t·c)                                    t ∈ (0, 700], default 10
won           −exp(−t·c)                                  t ∈ (0, 700], default 10
lsc           log σ(r − r_ref(x))  (raw rewards!)         centre ∈ {mean, median} or a quantile level in [0, 1]
par           mean_k σ(r − r_ref,k(x))  (raw rewards!)    —  (PAR, Fu et al. 2025)
raw           r  (raw rewards!)                           —  (standard RLHF baseline)
optimal       β·log g*(c) (tabulated, solved)             procedure (any spec), n ≥ 1, beta > 0
============  ==========================================  ======================================================

Spec strings: ``"name"`` or ``"name:k=v,k2=v2"`` (values parsed as int, then float, else string), e.g. ``"bon:t=10"``,
``"optimal:procedure=bon,n=4,beta=0.1"``.  ``Transform.spec`` gives the canonical, round-trippable spec.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._registry import registrar

__all__ = [
    "Transform",
    "TransformParam",
    "TransformError",
    "TabulatedTransform",
    "register_transform",
    "get_transform",
    "available_transforms",
    "parse_spec",
]


class TransformError(ValueError):
    """Unknown transform name, bad spec string or invalid transform parameter."""


# ---------------------------------------------------------------------------------------------------------------------
# parameters
@dataclass(frozen=True)
class TransformParam:
    """Declaration of one transform parameter.

    `kind` is float, int or str; `check(value) -> bool` validates the coerced value and `valid` describes the valid
    range in words (used in error messages).  `required=True` means there is no default.
    """

    kind: type = float
    default: Any = None
    check: Callable[[Any], bool] | None = None
    valid: str = ""
    required: bool = False
    choices: tuple | None = None


def _coerce(name: str, param: TransformParam, value: Any, transform: str, accepted: str) -> Any:
    def fail(reason: str):
        return TransformError(
            f"Invalid parameter {name}={value!r} for transform {transform!r}: {reason}. Valid range of {name}: "
            f"{param.valid or param.kind.__name__}. Accepted parameters for {transform!r}: {accepted}."
        )

    if param.choices is not None and isinstance(value, str):
        if value not in param.choices:
            raise fail(f"expected one of {', '.join(map(str, param.choices))}")
        return value
    if param.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise fail("expected a number")
        value = float(value)
        if not math.isfinite(value):
            raise fail("must be finite")
    elif param.kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or (
            not math.isfinite(float(value)) or float(value) != int(value)
        ):
            raise fail("expected an integer")
        value = int(value)
    elif param.kind is str:
        if not isinstance(value, str):
            raise fail("expected a string")
        if any(ch in value for ch in ",=:"):
            raise fail("must not contain ',', '=' or ':'")
    if param.choices is not None and value not in param.choices:
        raise fail(f"expected one of {', '.join(map(str, param.choices))}")
    if param.check is not None and not param.check(value):
        raise fail("out of range")
    return value


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def _parse_value(text: str) -> Any:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:k=v,k2=v2"`` into ``("name", {"k": v, "k2": v2})`` (values: int, then float, else str)."""
    if not isinstance(spec, str):
        raise TransformError(f"A transform spec must be a string or a Transform, got {type(spec).__name__}.")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise TransformError(
                    f"Malformed transform spec {spec!r}: parameters must look like 'name:k=v,k2=v2' (bad item "
                    f"{item!r})."
                )
            if key in params:
                raise TransformError(f"Malformed transform spec {spec!r}: parameter {key!r} given twice.")
            params[key] = _parse_value(value)
    return name, params


# ---------------------------------------------------------------------------------------------------------------------
# base class
def _float_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class Transform:
    r"""Base class of reward transforms Φ: calibrated reward c ∈ [0, 1] → training reward.

    Subclasses set `parameters` (a dict of :class:`TransformParam`) and implement :meth:`forward` (torch).  The
    numpy :meth:`phi` used by :mod:`trl_infalign.theory` defaults to running :meth:`forward` in float64.  Transforms
    that need the raw rewards (not a function of c alone) set `requires_raw_rewards = True` and override
    :meth:`__call__`.  Register a subclass with :func:`register_transform`.
    """

    name: str = "transform"
    parameters: dict[str, TransformParam] = {}
    requires_raw_rewards: bool = False

    def __init__(self, **params: Any):
        declared = type(self).parameters
        accepted = self._accepted()
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise TransformError(
                f"Unknown parameter(s) {', '.join(unknown)} for transform {self.name!r}. Accepted parameters: "
                f"{accepted}."
            )
        resolved: dict[str, Any] = {}
        for key, param in declared.items():
            if key in params:
                resolved[key] = _coerce(key, param, params[key], self.name, accepted)
            elif param.required:
                raise TransformError(
                    f"Transform {self.name!r} requires parameter {key!r} ({param.valid}). Accepted parameters: "
                    f"{accepted}."
                )
            else:
                resolved[key] = param.default
        self.params = resolved

    @classmethod
    def _accepted(cls) -> str:
        if not cls.parameters:
            return "none"
        parts = []
        for key, p in cls.parameters.items():
            default = "required" if p.required else f"default {_format_value(p.default)}"
            parts.append(f"{key} ({p.valid or p.kind.__name__}; {default})")
        return "; ".join(parts)

    # -- evaluation ---------------------------------------------------------------------------------------------------
    def forward(self, c: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(c) or phi(c).")

    def __call__(
        self,
        calibrated: torch.Tensor,
        *,
        rewards: torch.Tensor | None = None,
        ref_rewards: torch.Tensor | None = None,
        ref_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Φ(calibrated), same shape and device; float64 for float64 input, else float32 (NaN stays NaN)."""
        c = torch.as_tensor(calibrated)
        return self.forward(c.to(_float_dtype(c)))

    def phi(self, c: np.ndarray) -> np.ndarray:
        """Φ(c) in float64 numpy (calibrated-space form used by :mod:`trl_infalign.theory`)."""
        c = np.asarray(c, dtype=np.float64)
        return self.forward(torch.from_numpy(np.ascontiguousarray(c))).double().numpy()

    # -- identity -----------------------------------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        """Canonical spec string, e.g. ``"bon:t=10"``; ``get_transform(t.spec) == t``."""
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.params.items())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})" if args else f"{type(self).__name__}()"

    def __str__(self) -> str:
        return self.spec

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.spec == other.spec  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))


# ---------------------------------------------------------------------------------------------------------------------
# registry
_REGISTRY: dict[str, Callable[..., Transform]] = {}


def register_transform(name: str):
    """Class decorator registering a :class:`Transform` subclass (or a factory ``(**params) -> Transform``).

    >>> @register_transform("square")
    ... class Square(Transform):
    ...     def forward(self, c):
    ...         return c**2

    A class gets `name` set to the registered name.  Registering a name twice raises :class:`ValueError`.
    """
    if not isinstance(name, str) or not name or any(ch in name for ch in ":,= "):
        raise TransformError(f"Transform names must be non-empty strings without ':', ',', '=' or spaces, got {name!r}.")

    return registrar(_REGISTRY, name, "transform", Transform)


def available_transforms() -> list[str]:
    """Registered transform names, sorted."""
    return sorted(_REGISTRY)


def get_transform(spec: str | Transform, **params: Any) -> Transform:
    """Build a transform from a name or spec string (``"bon:t=10"``) plus keyword parameters.

    ``get_transform("bon", t=10) == get_transform("bon:t=10")``.  A :class:`Transform` passes through unchanged
    (giving keyword parameters with one is an error).
    """
    if isinstance(spec, Transform):
        if params:
            raise TransformError(
                f"get_transform got a Transform instance ({spec.spec}) and parameters {sorted(params)}; build a new "
                f"one with get_transform({spec.name!r}, ...)."
            )
        return spec
    name, spec_params = parse_spec(spec)
    if name not in _REGISTRY:
        raise TransformError(
            f"Unknown transform {name!r}. Available transforms: {', '.join(available_transforms())}. Register your "
            "own with @trl_infalign.register_transform(name)."
        )
    for key, value in params.items():
        if key in spec_params and spec_params[key] != value:
            raise TransformError(
                f"Parameter {key!r} given twice with different values: {spec_params[key]!r} in spec {spec!r} and "
                f"{value!r} as a keyword."
            )
        spec_params[key] = value
    transform = _REGISTRY[name](**spec_params)
    if not isinstance(transform, Transform):
        raise TransformError(f"The factory registered as {name!r} returned {type(transform).__name__}, not a Transform.")
    return transform


# ---------------------------------------------------------------------------------------------------------------------
# built-ins
def _t_param() -> TransformParam:
    return TransformParam(
        float, 10.0, check=lambda v: 0.0 < v <= 700.0, valid="a finite number with 0 < t <= 700 (exp(t) must be finite)"
    )


def _exp_safe(x: torch.Tensor, max_exponent: float) -> torch.Tensor:
    """exp(x), upcast to float64 when exp would overflow the input dtype (only possible for t > ~88 in float32)."""
    if x.dtype != torch.float64 and max_exponent > math.log(torch.finfo(x.dtype).max):
        x = x.double()
    return torch.exp(x)


@register_transform("identity")
class IdentityTransform(Transform):
    r"""Φ(c) = c.

    Optimal for the standard win rate (N = 1) at every KL; InfAlign's "calibration alone" baseline
    (Balashankar et al., arXiv 2412.19792).
    """

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c.clone()

    def phi(self, c: np.ndarray) -> np.ndarray:
        return np.array(c, dtype=np.float64)


@register_transform("log")
class LogTransform(Transform):
    r"""Φ(c) = log(max(c, eps)).

    At β = 1/(N−1) the KL-regularised optimum of `log` is exactly the Best-of-N policy: g(c) ∝ exp(log c /β) = c^{N−1},
    i.e. g(c) = N c^{N−1} (Beirami et al., arXiv 2401.01879; InfAlign, arXiv 2412.19792).  `eps` (default 1e-3, in
    (0, 1)) keeps Φ finite at c = 0 (a response below every reference).
    """

    parameters = {"eps": TransformParam(float, 1e-3, check=lambda v: 0.0 < v < 1.0, valid="in (0, 1)")}

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.clamp(c, min=self.params["eps"]))

    def phi(self, c: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(np.asarray(c, dtype=np.float64), self.params["eps"]))


@register_transform("bon")
class BoNTransform(Transform):
    r"""Φ(c) = exp(t·c): InfAlign's Best-of-N transform (CTRL, Balashankar et al., arXiv 2412.19792, §4).

    Emphasises the top of the reference distribution, as Best-of-N sampling does; t > 0 is tuned per
    (N, KL budget) — :func:`trl_infalign.theory.best_t` finds it.  Default t = 10 (a reasonable value for BoN with
    N ≈ 4–32 at moderate KL).  Computed in the input dtype; exp(t) is finite in float32 up to t ≈ 88 and the
    result is upcast to float64 beyond that (0 < t ≤ 700).
    """

    parameters = {"t": _t_param()}

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        t = self.params["t"]
        return _exp_safe(c * t, t)

    def phi(self, c: np.ndarray) -> np.ndarray:
        return np.exp(self.params["t"] * np.asarray(c, dtype=np.float64))

    @staticmethod
    def span(t: float) -> float:
        """max Φ − min Φ on [0, 1]: e^t − 1."""
        return math.expm1(t)

    @staticmethod
    def bounded(c: np.ndarray, t: float) -> tuple[np.ndarray, float]:
        """(Φ/e^t = exp(t(c − 1)), e^t): the same policy at β/e^t, without overflow at large t."""
        return np.exp(t * (np.asarray(c, dtype=np.float64) - 1.0)), math.exp(t)


@register_transform("won")
class WoNTransform(Transform):
    r"""Φ(c) = −exp(−t·c): InfAlign's Worst-of-N (jailbreak-robustness) transform (arXiv 2412.19792, §4).

    Penalises the bottom of the reference distribution, as Worst-of-N evaluation does; t > 0 (default 10) is tuned
    per (N, KL budget).  |Φ| ≤ 1 on [0, 1], so there is no overflow.
    """

    parameters = {"t": _t_param()}

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return -torch.exp(c * -self.params["t"])

    def phi(self, c: np.ndarray) -> np.ndarray:
        return -np.exp(-self.params["t"] * np.asarray(c, dtype=np.float64))

    @staticmethod
    def span(t: float) -> float:
        """max Φ − min Φ on [0, 1]: 1 − e^{−t}."""
        return -math.expm1(-t)

    @staticmethod
    def bounded(c: np.ndarray, t: float) -> tuple[np.ndarray, float]:
        """(Φ, 1): already bounded by 1."""
        return -np.exp(-t * np.asarray(c, dtype=np.float64)), 1.0


#: The exp transform families CTRL tunes t for: name → class (with `span(t)` and `bounded(c, t)`).
EXP_FAMILIES = {"bon": BoNTransform, "won": WoNTransform}


def _check_centre(value: Any) -> bool:
    return value in ("mean", "median") if isinstance(value, str) else 0.0 <= float(value) <= 1.0


@register_transform("lsc")
class LogSigmoidCentredTransform(Transform):
    r"""u = log σ(r − r_ref(x)): the log-sigmoid centred transform of Wang et al. 2024, "Transforming and Combining
    Rewards for Aligning LLMs" (arXiv 2402.00742).

    r is the *raw* reward and r_ref(x) a per-prompt centre of the valid reference rewards: `centre="mean"` (default),
    `"median"`, or a number q ∈ [0, 1] for the q-quantile.  Not a function of the calibrated reward alone, so it has
    no calibrated-space form (:meth:`phi` raises) and needs ``rewards=`` and ``ref_rewards=`` when called.
    """

    parameters = {
        "centre": TransformParam(str, "mean", check=_check_centre, valid="'mean', 'median' or a quantile level in [0, 1]")
    }
    requires_raw_rewards = True

    def __init__(self, **params: Any):
        centre = params.get("centre")
        if centre is not None and not isinstance(centre, str):  # a quantile level
            if isinstance(centre, bool) or not isinstance(centre, (int, float)) or not 0.0 <= float(centre) <= 1.0:
                raise TransformError(
                    f"Invalid parameter centre={centre!r} for transform 'lsc': valid: centre 'mean', 'median' or a "
                    f"quantile level in [0, 1]. Accepted parameters for 'lsc': {self._accepted()}."
                )
            params = {**params, "centre": "mean"}
            super().__init__(**params)
            self.params["centre"] = float(centre)
            return
        super().__init__(**params)

    def __call__(self, calibrated=None, *, rewards=None, ref_rewards=None, ref_mask=None) -> torch.Tensor:
        from .calibration import CalibrationError, reference_centre

        if rewards is None or ref_rewards is None:
            missing = " and ".join(n for n, v in (("rewards=", rewards), ("ref_rewards=", ref_rewards)) if v is None)
            raise TransformError(
                f"Transform 'lsc' (log σ(r − r_ref(x))) works on raw rewards, not on calibrated ones: call it with "
                f"the raw rewards (rewards=, shape (B,)) and the prompt's reference rewards (ref_rewards=, shape "
                f"(B, K), plus ref_mask= if padded). Missing: {missing}."
            )
        r = torch.as_tensor(rewards)
        try:
            centre = reference_centre(ref_rewards, ref_mask, self.params["centre"])
        except CalibrationError as error:
            raise TransformError(f"Transform 'lsc': {error}") from error
        dtype = torch.float64 if torch.float64 in (r.dtype, centre.dtype) else torch.float32
        centre = centre.to(device=r.device, dtype=dtype)
        if centre.shape != r.shape:
            raise TransformError(
                f"Transform 'lsc': {tuple(r.shape)} rewards but {tuple(centre.shape)} rows of reference rewards."
            )
        return torch.nn.functional.logsigmoid(r.to(dtype) - centre)

    def phi(self, c: np.ndarray) -> np.ndarray:
        raise TransformError(
            "Transform 'lsc' has no calibrated-space form Φ(c): log σ(r − r_ref(x)) depends on the raw reward scale of "
            "each prompt, not on the calibrated reward alone, so the calibrated-space theory (KL / win-rate "
            "prediction, kl_budget) does not apply. Use bon/won/identity/log/optimal for that, or set beta directly."
        )


def _missing_raw(name: str, formula: str, rewards: Any, ref_rewards: Any, need_refs: bool = True) -> TransformError:
    given = (("rewards=", rewards), ("ref_rewards=", ref_rewards)) if need_refs else (("rewards=", rewards),)
    missing = " and ".join(n for n, v in given if v is None)
    refs = (" and the prompt's reference rewards (ref_rewards=, shape (B, K), plus ref_mask= if padded)"
            if need_refs else "")
    return TransformError(
        f"Transform {name!r} ({formula}) works on raw rewards, not on calibrated ones: call it with the raw rewards "
        f"(rewards=, shape (B,)){refs}. Missing: {missing}."
    )


def _no_calibrated_form(name: str, formula: str) -> TransformError:
    return TransformError(
        f"Transform {name!r} has no calibrated-space form Φ(c): {formula} depends on the raw reward scale of each "
        "prompt, not on the calibrated reward alone, so the calibrated-space theory (KL / win-rate prediction, "
        "kl_budget) does not apply. `trl-infalign diagnose` predicts it from reference rewards instead; or set beta "
        "directly."
    )


@register_transform("raw")
class RawRewardTransform(Transform):
    r"""Φ = r: the raw reward itself (standard RLHF, no calibration) — the baseline CTRL is compared with.

    With one global β the optimum is π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β): in calibrated space that is the per-prompt
    transform Φ_x(c) = Q_x(c), prompt x's reference quantile function, so prompts whose reward model is sharper
    (larger reward scale) get more of the KL budget (notes §8).  Needs ``rewards=`` when called; `ref_rewards` is
    accepted and ignored.  No calibrated-space form (:meth:`phi` raises).
    """

    requires_raw_rewards = True

    def __call__(self, calibrated=None, *, rewards=None, ref_rewards=None, ref_mask=None) -> torch.Tensor:
        if rewards is None:
            raise _missing_raw("raw", "Φ = r", rewards, ref_rewards, need_refs=False)
        r = torch.as_tensor(rewards)
        return r.to(_float_dtype(r)).clone()

    def shaped(self, rewards: np.ndarray, ref_rewards: np.ndarray | None = None, ref_mask: np.ndarray | None = None
               ) -> np.ndarray:
        """Φ = r in float64 numpy (any shape; `ref_rewards` is ignored)."""
        return np.array(rewards, dtype=np.float64)

    def phi(self, c: np.ndarray) -> np.ndarray:
        raise _no_calibrated_form("raw", "the raw reward r")


@register_transform("par")
class PARTransform(Transform):
    r"""PAR, "Preference As Reward": u(x, y) = (1/K) Σ_k σ(r(x, y) − r_ref,k(x)), the mean over prompt x's K
    reference rewards of the sigmoid of the centred reward (Fu et al. 2025, "Reward Shaping to Mitigate Reward
    Hacking in RLHF", arXiv 2502.18770).

    Bounded in (0, 1), steepest near the reference rewards, so it saturates once a response beats every reference
    (which is what mitigates reward hacking).  It is a smoothed calibrated reward: σ(r − r_k) replaces the step
    1[r > r_k] of c.  Works on the *raw* reward, so it still depends on each prompt's reward scale: it needs
    ``rewards=`` and ``ref_rewards=`` (and ``ref_mask=`` if padded) when called, and has no calibrated-space form
    (:meth:`phi` raises).
    """

    requires_raw_rewards = True

    def __call__(self, calibrated=None, *, rewards=None, ref_rewards=None, ref_mask=None) -> torch.Tensor:
        from .calibration import CalibrationError, _valid_references

        if rewards is None or ref_rewards is None:
            raise _missing_raw("par", "mean_k σ(r − r_ref,k)", rewards, ref_rewards)
        r = torch.as_tensor(rewards)
        try:
            values, mask, count = _valid_references(ref_rewards, ref_mask)
        except CalibrationError as error:
            raise TransformError(f"Transform 'par': {error}") from error
        if values.shape[0] != r.shape[0] or r.ndim != 1:
            raise TransformError(
                f"Transform 'par': {tuple(r.shape)} rewards but {values.shape[0]} rows of reference rewards (need "
                "rewards of shape (B,) and ref_rewards of shape (B, K))."
            )
        dtype = torch.float64 if torch.float64 in (r.dtype, values.dtype) else torch.float32
        values = values.to(device=r.device, dtype=dtype)
        s = torch.sigmoid(r.to(dtype)[:, None] - values)
        if mask is not None:
            s = s * mask.to(device=r.device, dtype=dtype)
        return s.sum(dim=1) / count.to(device=r.device, dtype=dtype)

    def shaped(self, rewards: np.ndarray, ref_rewards: np.ndarray, ref_mask: np.ndarray | None = None,
               chunk_elements: int = 1 << 22) -> np.ndarray:
        """PAR in float64 numpy for M rewards per prompt: `rewards` (B, M), `ref_rewards` (B, K) with optional bool
        `ref_mask` → (B, M).  O(B·M·K), processed in row chunks of about `chunk_elements` pairs."""
        r = np.asarray(rewards, dtype=np.float64)
        refs = np.asarray(ref_rewards, dtype=np.float64)
        squeeze = r.ndim == 1
        r = r[:, None] if squeeze else r
        mask = np.ones(refs.shape, dtype=bool) if ref_mask is None else np.asarray(ref_mask, dtype=bool)
        weights = mask / np.maximum(mask.sum(axis=1, keepdims=True), 1)
        out = np.empty(r.shape, dtype=np.float64)
        rows = max(1, int(chunk_elements) // max(r.shape[1] * refs.shape[1], 1))
        for start in range(0, r.shape[0], rows):
            stop = start + rows
            d = r[start:stop, :, None] - np.where(mask[start:stop], refs[start:stop], 0.0)[:, None, :]
            sig = 0.5 * (1.0 + np.tanh(0.5 * d))  # σ(d), stable for any |d|
            out[start:stop] = np.einsum("bmk,bk->bm", sig, weights[start:stop])
        return out[:, 0] if squeeze else out

    def phi(self, c: np.ndarray) -> np.ndarray:
        raise _no_calibrated_form("par", "mean_k σ(r − r_ref,k)")


class TabulatedTransform(Transform):
    r"""Φ given by a table: linear interpolation of `values` on the increasing `grid` (constant beyond the ends,
    like `numpy.interp`).  Torch side: vectorised `searchsorted`; numpy side: `np.interp`."""

    def __init__(self, grid, values, name: str = "tabulated", params: dict | None = None):
        grid = np.asarray(grid, dtype=np.float64)
        values = np.asarray(values, dtype=np.float64)
        if grid.ndim != 1 or grid.shape != values.shape or grid.size < 2:
            raise TransformError("TabulatedTransform: grid and values must be 1-D arrays of the same length >= 2.")
        if not (np.all(np.isfinite(grid)) and np.all(np.isfinite(values))):
            raise TransformError("TabulatedTransform: grid and values must be finite.")
        if np.any(np.diff(grid) <= 0):
            raise TransformError("TabulatedTransform: grid must be strictly increasing.")
        self.name = name
        self.params = dict(params or {})
        self._set_table(grid, values)

    def _set_table(self, grid: np.ndarray, values: np.ndarray) -> None:
        self.grid, self.values = grid, values
        self._torch_tables: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype):
        key = (str(device), dtype)
        if key not in self._torch_tables:
            grid = torch.as_tensor(self.grid, dtype=torch.float64, device=device)
            values = torch.as_tensor(self.values, dtype=torch.float64, device=device)
            slopes = torch.diff(values) / torch.diff(grid)
            self._torch_tables[key] = (grid.to(dtype), values.to(dtype), slopes.to(dtype))
        return self._torch_tables[key]

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        grid, values, slopes = self._table(c.device, c.dtype)
        x = torch.clamp(c, min=grid[0], max=grid[-1])  # NaN stays NaN
        idx = torch.searchsorted(grid, x.contiguous(), right=True) - 1
        idx = idx.clamp_(0, grid.numel() - 2)
        out = values[idx] + slopes[idx] * (x - grid[idx])
        return out

    def phi(self, c: np.ndarray) -> np.ndarray:
        c = np.asarray(c, dtype=np.float64)
        out = np.interp(c, self.grid, self.values)
        return np.where(np.isnan(c), np.nan, out)

    @property
    def spec(self) -> str:
        if self.name == "tabulated" and not self.params:
            return f"tabulated[{self.grid.size} points]"
        return super().spec

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TabulatedTransform) or type(other) is not type(self):
            return False
        if self.params or other.params:
            return self.name == other.name and self.params == other.params
        return np.array_equal(self.grid, other.grid) and np.array_equal(self.values, other.values)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.spec))

    def __repr__(self) -> str:
        if self.params:
            return super().__repr__()
        return f"TabulatedTransform({self.grid.size} points on [{self.grid[0]:g}, {self.grid[-1]:g}])"


@register_transform("optimal")
class OptimalTransform(TabulatedTransform):
    r"""Φ*(c) = β·log g*(c): the exactly optimal transform for an inference procedure at KL coefficient β.

    g* maximises (inference win rate − β·KL) over all calibrated-space densities (InfAlign, arXiv 2412.19792, §3;
    notes §2); it is computed by :func:`trl_infalign.optimal.solve_optimal` (lazily, on first use, then cached in
    this instance) and interpolated linearly.  Parameters: `procedure`, any procedure spec (default bon; see
    :mod:`trl_infalign.procedures`: "standard", "bon", "won", a mixture "mixture:0.5*standard+0.5*bon:n=16", or an
    :class:`~trl_infalign.procedures.InferenceProcedure`), `n` ≥ 1 (default 4: the N of a bare "bon" / "won"),
    `beta` > 0 (default 0.1) — use the same β as the trainer's KL coefficient.  For plain sampling Φ* is the
    identity.  Spec: ``"optimal:procedure=bon,n=4,beta=0.1"``, ``"optimal:procedure=mixture:0.5*standard+0.5*bon:n=4,beta=0.1"``.
    """

    parameters = {
        "procedure": TransformParam(str, "bon", valid="a procedure spec: standard, bon, won, mixture:w*spec+..."),
        "n": TransformParam(int, 4, check=lambda v: v >= 1, valid="an integer >= 1"),
        "beta": TransformParam(float, 0.1, check=lambda v: v > 0, valid="a finite number > 0"),
    }

    def __init__(self, **params: Any):
        from .procedures import InferenceProcedure, ProcedureError, get_procedure

        raw = params.pop("procedure", "bon")
        Transform.__init__(self, **params)
        try:
            if isinstance(raw, InferenceProcedure) or ":" in str(raw):
                procedure = get_procedure(raw)
                if "n" in params and "n" in procedure.params and procedure.params["n"] != self.params["n"]:
                    raise ProcedureError(f"procedure {procedure.spec!r} has n={procedure.n}, but n={self.params['n']}.")
            else:
                procedure = get_procedure(str(raw), self.params["n"])  # n is the N of a bare "bon" / "won"
        except ValueError as error:
            raise TransformError(f"Invalid parameter procedure={raw!r} for transform 'optimal': {error}") from None
        self.procedure = procedure
        if procedure.short_name is not None:  # the round-trippable (procedure, n) form
            self.params = {"procedure": procedure.name, "n": procedure.params.get("n", self.params["n"]),
                           "beta": self.params["beta"]}
        else:
            self.params = {"procedure": procedure.spec.replace(",", ";"), "beta": self.params["beta"]}
        self.grid = self.values = None
        self._torch_tables = {}

    @classmethod
    def spec_for(cls, procedure, beta: float) -> str:
        """Canonical spec of the optimal transform of `procedure` at `beta` (β to 12 significant digits)."""
        return cls(procedure=procedure, beta=float(f"{float(beta):.12g}")).spec

    def _ensure_table(self) -> None:
        if self.grid is None:
            from .optimal import solve_optimal

            solution = solve_optimal(self.procedure, self.params["beta"])
            grid = np.asarray(solution.grid, dtype=np.float64)
            values = np.asarray(solution.transform_values(), dtype=np.float64)
            if grid.ndim != 1 or grid.shape != values.shape or grid.size < 2 or np.any(np.diff(grid) <= 0):
                raise TransformError(f"the optimal solver returned an invalid table for {self.spec!r}.")
            self._set_table(grid, values)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        self._ensure_table()
        return super().forward(c)

    def phi(self, c: np.ndarray) -> np.ndarray:
        self._ensure_table()
        return super().phi(c)

    @property
    def spec(self) -> str:
        return Transform.spec.fget(self)

    def __eq__(self, other: object) -> bool:
        return Transform.__eq__(self, other)

    def __hash__(self) -> int:
        return Transform.__hash__(self)

    def __repr__(self) -> str:
        return Transform.__repr__(self)
