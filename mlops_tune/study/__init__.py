"""The tuning loop's coordinator: one Optuna study of mutations of the base model, gated by accuracy.

:class:`Study` checks everything first (nothing is written for a bad config); its
:meth:`Study.run` opens or resumes the study (``records``), enqueues trial 0 and the probe
(``start``), runs the study's workers (``mlops_tune.workers``) until the gate is met or the
budget is spent, and finishes with the test-split evaluation of the best model, the study's
artifacts and the promotion (``finish``). Several workers may run the same study (see
``claims``): each trial holds a budget ticket, and a trial that did not train gives it back.
"""

from __future__ import annotations

from mlops_tune.study.coordinator import Study

__all__ = ["Study"]
