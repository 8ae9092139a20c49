"""Measuring forgetting: perplexity, lm-eval-style multiple choice, continual-learning metrics and a report."""

from forgetkern.eval.metrics import average_accuracy, bwt, forgetting, mc_accuracy, perplexity, relative_drop
from forgetkern.eval.report import ForgettingReport, Run

__all__ = ["perplexity", "mc_accuracy", "relative_drop", "average_accuracy", "bwt", "forgetting",
           "ForgettingReport", "Run"]
