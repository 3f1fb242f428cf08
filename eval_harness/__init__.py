"""Evaluation harness: ``python -m eval_harness <command>``. Rollout, masking, scoring and metrics
come from :mod:`nla_space`; this package adds datasets, trainers, evals and reports."""
