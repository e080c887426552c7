"""Critical points of the feature metrics over the FT starting prediction q0.

Appendix D.2 (Lemmas 2, 3; Eq. 34-37; Table 9), with one correction.

Write r = q0 - Y, c = P r (P = K0^{-1} at t -> infinity; see
:func:`theory.linear_model.kernel_response` for finite t) and s = ||v0||^2,
G = X X^T. The closed form (Eq. 31) moves B by the rank-one
B_t - B0 = -v0 (X^T c)^T, hence, exactly::

    tr(B0^T B_t) = ||B0||^2 - q0^T C1 r                        (Eq. 34)
    tr(B_t^T B_t) = ||B0||^2 - 2 q0^T C1 r + r^T C2 r           (Eq. 35)
    ||B_t - B0||_F^2 = r^T C2 r                                 (Eq. 37)

with C1 = P and C2 = P K~ P, where K~ = (grad_B q0)(grad_B q0)^T = s X X^T is
the **backbone** block of K0. The paper writes K~ = X B0^T B0 X^T, the head
block (grad_v q0)(grad_v q0)^T; the expansion of b_t^T b_t does not give that
block, and numbers through :func:`~theory.linear_model.closed_form` agree
with the backbone block only (tests/test_critical_points.py).

Consequences of the correction (t -> infinity):

* K~ = K0 - X B0^T B0 X^T <= K0, so C2 <= C1: along q0 = aY,
  a1 = Y^T C1 Y >= a2 = Y^T C2 Y >= 0 and alpha = (a1 - a2)/(2 a1 - a2)
  lies in [0, 1/2]; the Hessian 2 C2 - 4 C1 is negative definite, so
  q_star of Lemma 3 is always the unique maximum (the paper: "usually").
* The limits swap relative to the paper: ||B0||^2 >> ||v0||^2 (K~ << K0)
  gives alpha -> 1/2, and ||v0||^2 >> ||B0||^2 (K~ ~ K0) gives alpha -> 0.

Eq. 25 bounds the feature metrics by traces; Eq. 26-27 write them as
M tr(.), which holds only for isotropic inputs (E x x^T proportional to I).
On the training inputs themselves, the same
algebra with the weight G gives, along q0 = aY (:func:`alpha_features`)::

    E z_t^T z_0 = const - a (a - 1) b1 / N          -> maximum at a = 1/2
    E ||z_t||^2 = const + [-2 a (a - 1) b1 + (a - 1)^2 b2] / N
    E ||z_t - z_0||^2 = (a - 1)^2 b2 / N            -> minimum at a = 1
    b1 = Y^T P G Y,   b2 = s Y^T P G^2 P Y

so the feature-norm maximum sits at (b1 - b2)/(2 b1 - b2), not at alpha.

All of the above describes the linearised model. Real GD approaches its
parameters and distance as the scale grows, but not its dot/norm maxima: their change is
second order in the targets, and so is what the linearisation drops. See
:func:`gd_correction` and :func:`gd_peaks`, checked against ``train_gd``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from theory.linear_model import _problem, kernel_response, ntk

__all__ = [
    "Phase",
    "c_matrices",
    "q_star",
    "ray_coefficients",
    "alpha",
    "alpha_features",
    "gd_correction",
    "gd_peaks",
    "phase_table",
    "format_phase_table",
]

_BLOCKS = ("backbone", "head")


def _response(X, B0, v0, steps, lr, flow_time):
    K = ntk(X, B0, v0)
    return K, kernel_response(K, steps=steps, lr=lr, flow_time=flow_time)


def c_matrices(X, B0, v0, *, block: str = "backbone", steps=None, lr=None,
               flow_time=None):
    """(C1, C2), each (N, N): C1 = P, C2 = P K~ P (Lemma 3).

    ``block="backbone"`` (default, what the algebra gives) uses
    K~ = ||v0||^2 X X^T; ``block="head"`` uses the paper's X B0^T B0 X^T,
    for comparison only. P = K0^{-1} unless a time is given.
    """
    if block not in _BLOCKS:
        raise ValueError(f"block must be one of {_BLOCKS}; got {block!r}")
    X, B0, v0, _ = _problem(X, B0, v0)
    _, P = _response(X, B0, v0, steps, lr, flow_time)
    Kt = ntk(X, B0, v0, block=block)
    return P, P @ Kt @ P


def q_star(X, B0, v0, Y, *, block: str = "backbone", steps=None, lr=None,
           flow_time=None) -> np.ndarray:
    """Critical point of tr(B_t^T B_t) over q0 (Lemma 3), shape (N,).

    q* = (I + (C2 - 2 C1)^{-1} C1) Y = (C2 - 2 C1)^{-1} (C2 - C1) Y. With the
    backbone block it is the unique maximum. Assumes K0 does not depend on
    q0, i.e. ||v0|| is held fixed while q0 varies.
    """
    X, B0, v0, Y = _problem(X, B0, v0, Y)
    C1, C2 = c_matrices(X, B0, v0, block=block, steps=steps, lr=lr,
                        flow_time=flow_time)
    H = C2 - 2 * C1
    try:
        return Y + np.linalg.solve(H, C1 @ Y)
    except np.linalg.LinAlgError:
        raise ValueError("C2 - 2 C1 is singular: tr(B_t^T B_t) has no unique "
                         "critical point") from None


def ray_coefficients(X, B0, v0, Y, *, metric: str = "trace",
                     block: str = "backbone", steps=None, lr=None,
                     flow_time=None) -> tuple[float, float]:
    """(a1, a2) of the norm quadratic along the ray q0 = aY.

    ``metric="trace"``: tr(B_t^T B_t) = const - 2a(a-1) a1 + (a-1)^2 a2 with
    a1 = Y^T C1 Y, a2 = Y^T C2 Y (``block`` picks K~, as in
    :func:`c_matrices`). ``metric="features"``: N E||z_t||^2 over the rows
    of X, with a1 = Y^T P G Y, a2 = ||v0||^2 Y^T P G^2 P Y, G = X X^T.
    """
    if metric not in ("trace", "features"):
        raise ValueError(f"metric must be 'trace' or 'features'; "
                         f"got {metric!r}")
    X, B0, v0, Y = _problem(X, B0, v0, Y)
    if metric == "trace":
        C1, C2 = c_matrices(X, B0, v0, block=block, steps=steps, lr=lr,
                            flow_time=flow_time)
        return float(Y @ C1 @ Y), float(Y @ C2 @ Y)
    _, P = _response(X, B0, v0, steps, lr, flow_time)
    G = X @ X.T
    PY = P @ Y
    GPY = G @ PY
    return float(PY @ G @ Y), float((v0 @ v0) * (GPY @ GPY))


def _vertex(a1: float, a2: float) -> float:
    curvature = 2 * a1 - a2          # -1/2 of the second derivative in a
    if not abs(curvature) > 1e-14 * (abs(a1) + abs(a2)):
        raise ValueError("the quadratic along q0 = aY is flat (2 a1 = a2): "
                         "no critical point")
    return (a1 - a2) / curvature


def alpha(X, B0, v0, Y, *, block: str = "backbone", steps=None, lr=None,
          flow_time=None) -> float:
    """Lemma 3 along the ray: q0 = alpha Y maximises tr(B_t^T B_t).

    alpha = (a1 - a2) / (2 a1 - a2) with a1 = Y^T C1 Y, a2 = Y^T C2 Y; in
    [0, 1/2] for the (correct) backbone block. ``block="head"`` reproduces the
    paper's formula, which the closed form does not follow.
    """
    return _vertex(*ray_coefficients(X, B0, v0, Y, metric="trace",
                                     block=block, steps=steps, lr=lr,
                                     flow_time=flow_time))


def alpha_features(X, B0, v0, Y, *, steps=None, lr=None,
                   flow_time=None) -> float:
    """q0 = alpha_f Y is the critical point of E||z_t||^2 on the rows of X.

    alpha_f = (b1 - b2)/(2 b1 - b2) (module docstring); a maximum when
    2 b1 > b2. Equals :func:`alpha` only when X^T X is proportional to I on
    the span that matters; in general the two differ.
    """
    return _vertex(*ray_coefficients(X, B0, v0, Y, metric="features",
                                     steps=steps, lr=lr,
                                     flow_time=flow_time))


def _weight(X, metric):
    if metric not in ("trace", "features"):
        raise ValueError(f"metric must be 'trace' or 'features'; "
                         f"got {metric!r}")
    return np.eye(X.shape[0]) if metric == "trace" else X @ X.T


def gd_correction(X, B0, v0, Y, *, metric: str = "trace", lr=None) -> float:
    """Second-order coefficient m of real (not linearised) GD along q0 = aY.

    The linearisation drops the head's own movement v1 = -B0 X^T R_s
    (R_s = sum of residuals so far) feeding back into the backbone update
    dB = -v r^T X. That term, B0 X^T M X with M = sum_{j<k} lr^2 r_j r_k^T,
    is of the same order as the closed form's change of E z_t^T z_0 at every
    parameter scale, so the real GD curves are, to leading order in the lazy
    limit::

        dot  - dot0  = -a (a - 1) a1 + (a - 1)^2 m
        norm - norm0 = 2 (dot - dot0) + (a - 1)^2 a2
        dist         = (a - 1)^2 a2

    with (a1, a2) from :func:`ray_coefficients` and m = tr(H M_Y W): H is the
    head block of K0, M_Y is M for residuals starting at Y, W = I
    (``metric="trace"``) or G = X X^T (``"features"``). In the eigenbasis
    (lam, r) of K0 and Y, with rho = 1 - lr lam::

        M_ij = lr r_i r_j / lam_i (1/(lr lam_j) - 1/(1 - rho_i rho_j))    GD
        M_ij = r_i r_j / (lam_j (lam_i + lam_j))           lr -> 0: gradient flow

    Gradient flow with the trace weight gives 2m = a1 - a2 exactly, i.e.
    tr(B_t^T B_t) - |B0|^2 = a1 (1 - a^2), the conservation law Eq. 28
    (|v_t|^2 - |B_t|_F^2 is constant). ``lr=None`` means gradient flow;
    otherwise lr is the absolute GD step (as in ``train_gd``), converged.
    """
    X, B0, v0, Y = _problem(X, B0, v0, Y)
    W = _weight(X, metric)
    K = ntk(X, B0, v0)
    lam, Q = np.linalg.eigh(K)
    if lam[0] <= 0:
        raise ValueError("K0 is singular")
    r = Q.T @ Y
    if lr is None:
        Mt = np.outer(r, r) / (lam[None, :] * (lam[:, None] + lam[None, :]))
    else:
        if not (np.isfinite(lr) and 0 < lr * lam[-1] < 2):
            raise ValueError(f"lr must satisfy 0 < lr * lambda_max(K0) < 2; "
                             f"got lr={lr}, lambda_max={lam[-1]:.4g}")
        rho = 1.0 - lr * lam
        Mt = (lr * np.outer(r, r) / lam[:, None]
              * (1.0 / (lr * lam[None, :]) - 1.0 / (1.0 - np.outer(rho, rho))))
    M = Q @ Mt @ Q.T
    H = ntk(X, B0, v0, block="head")
    return float(np.trace(H @ M @ W))


def gd_peaks(X, B0, v0, Y, *, metric: str = "trace",
             lr=None) -> tuple[float, float]:
    """(a_dot, a_norm): maxima of the dot product and of the norm along
    q0 = aY for real, converged GD, to leading order in the lazy limit.

    a_dot = (a1 - 2m)/(2 a1 - 2m), a_norm = (a1 - 2m - a2)/(2 a1 - 2m - a2)
    (:func:`gd_correction`); m = 0 gives the closed form's 1/2 and alpha.
    Under gradient flow with the trace weight, a_dot = a2/(a1 + a2) and
    a_norm = 0: the norm then grows all the way to q0 = 0. (a2/(a1 + a2) is
    algebraically the paper's Lemma 3 formula with the head block, since
    Y^T K0^-1 H K0^-1 Y = a1 - a2.)
    """
    a1, a2 = ray_coefficients(X, B0, v0, Y, metric=metric)
    m = gd_correction(X, B0, v0, Y, metric=metric, lr=lr)
    # _vertex(A, B) = (A - B)/(2A - B): the dot curve is (a1, 2m), the
    # norm curve (a1, a2 + 2m) in that form.
    return _vertex(a1, 2 * m), _vertex(a1, a2 + 2 * m)


class Phase(NamedTuple):
    """One row of Table 9: q0 moves from ``start`` Y to ``end`` Y."""

    start: float
    end: float
    label: str
    directions: dict  # metric name -> predicted direction as q0 moves


#: Column order of Table 9.
METRICS = ("aie", "dist_sq", "dot", "norm_sq", "cos")


def phase_table(alpha_value: float) -> tuple[Phase, ...]:
    """Predicted direction of each metric as q0 goes Y -> Y/2 -> aY -> 0.

    Table 9, with ``alpha_value`` in [0, 1/2] (the norm maximum; from
    :func:`alpha` or :func:`alpha_features`). "↑"/"↓" are derived (AIE,
    distance, dot, norm). The cosine is not derived: the entries are the
    paper's claims ("?" = not predicted, "↓↓" = falls fast), which
    :mod:`theory.prop2` checks numerically.
    """
    if not 0.0 <= alpha_value <= 0.5:
        raise ValueError(f"alpha_value must lie in [0, 1/2] (the norm "
                         f"maximum comes after Y/2); got {alpha_value}")
    rows = (
        (1.0, 0.5, "Y -> Y/2", ("↑", "↑", "↑", "↑", "?")),
        (0.5, alpha_value, "Y/2 -> aY", ("↑", "↑", "↓", "↑", "↓↓")),
        (alpha_value, 0.0, "aY -> 0", ("↑", "↑", "↓", "↓", "?")),
    )
    return tuple(Phase(s, e, lab, dict(zip(METRICS, dirs)))
                 for s, e, lab, dirs in rows)


def format_phase_table(phases, observed=None) -> str:
    """Markdown table of :func:`phase_table`; ``observed`` adds columns.

    ``observed``: optional list (one per phase) of dicts metric -> direction,
    shown as "predicted / observed".
    """
    head = ("| q0 | " + " | ".join(METRICS) + " |\n|---|"
            + "---|" * len(METRICS) + "\n")
    lines = []
    for i, ph in enumerate(phases):
        span = f"{ph.label} (a: {ph.start:.3f} -> {ph.end:.3f})"
        cells = []
        for m in METRICS:
            cell = ph.directions[m]
            if observed is not None:
                cell += " / " + observed[i].get(m, "")
            cells.append(cell)
        lines.append(f"| {span} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
