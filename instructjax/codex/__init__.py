"""Codex: code corpus cleaning, the execution sandbox, pass@k and HumanEval evaluation.

The sandbox API lives in `instructjax.codex.sandbox` (Evaluator, SandboxConfig, Problem,
Result, LABELS, check_sandbox, SandboxUnavailableError).
"""
