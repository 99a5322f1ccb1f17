"""Evaluation: perplexity (``perplexity.py``), lm-eval tasks (``harness.py``), result files (``report.py``)."""
