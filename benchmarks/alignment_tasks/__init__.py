"""The tasks of benchmarks/alignment_quality.py, one module each, and what they share.

- `common`: the methods, the run plan, training, the theory / `diagnose` predictions of each row;
- `bandit`, `hetero_bandit`, `lm`, `hetero_lm`: one task each (its `DEFAULTS` and its runner);
- `report`: curves, plots, tables, the acceptance checks.
"""
