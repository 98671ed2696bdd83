"""Automatic mixed precision: per-layer settings chosen for a bit budget (``--target-bits``).

The maths lives apart from the orchestration: :mod:`.sensitivity` (calibration statistics and
each setting's predicted loss), :mod:`.allocate` (the multiple-choice knapsack),
:mod:`.candidates` (each method's settings and quantizers), :mod:`.choose` (the API).
"""

from .choose import Sensitivity, check_method, choose_mixed_precision, measure_sensitivity

__all__ = ["Sensitivity", "check_method", "choose_mixed_precision", "measure_sensitivity"]
