"""Theory of head probing in the two-layer linear model (Appendix D).

Modules: :mod:`theory.linear_model` (kernel, closed form, GD runners),
:mod:`theory.critical_points` (Lemmas 2-3, Table 9, and real-GD
corrections), :mod:`theory.prop2` (``python -m theory.prop2``).
"""

from theory.critical_points import (
    alpha,
    alpha_features,
    c_matrices,
    format_phase_table,
    gd_correction,
    gd_peaks,
    phase_table,
    q_star,
    ray_coefficients,
)
from theory.linear_model import (
    FeatureMetrics,
    GDResult,
    IllConditionedKernelWarning,
    closed_form,
    feature_metrics,
    head_for_output,
    kernel_response,
    train_gd,
    train_head_gd,
    train_linearised_gd,
)
from theory.linear_model import ntk as linear_ntk
