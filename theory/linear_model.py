"""The overparameterised two-layer linear model of Sec. 3.1 and Appendix D.

Conventions (paper Eq. 1)::

    X (N, d)   inputs, one per row         B (h, d)  backbone, z = B x
    v (h,)     linear head, q = z^T v      Y (N,)    targets
    q = X B^T v (N,),   L(B, v) = 1/2 ||q - Y||^2,   full-batch GD with step lr

The loss has no 1/N (Eq. 1; Eq. 24 has one, which only rescales lr). All
linear algebra here is host numpy/scipy in float64 (N is small). The GD
runners are jitted ``lax.scan`` loops in JAX; they compute in the dtype they
are given, so call them under ``jax.enable_x64(True)`` to get float64 (the
tests and :mod:`theory.prop2` do).

The kernel (Eq. 30) splits into two blocks::

    K0 = X (B^T B + ||v||^2 I) X^T = X B^T B X^T  +  ||v||^2 X X^T
                                     (grad_v q)(grad_v q)^T   (grad_B q)(grad_B q)^T
                                     "head" block              "backbone" block

Row n of grad_B q is vec(v x_n^T), hence the backbone block ||v||^2 X X^T.
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

__all__ = [
    "IllConditionedKernelWarning",
    "FeatureMetrics",
    "GDResult",
    "ntk",
    "kernel_response",
    "closed_form",
    "feature_metrics",
    "head_for_output",
    "train_gd",
    "train_linearised_gd",
    "train_head_gd",
]

#: Above this condition number of K0, :func:`closed_form` warns.
COND_WARN = 1e8


class IllConditionedKernelWarning(UserWarning):
    """K0 is invertible but ill-conditioned; the closed form loses digits."""


class FeatureMetrics(NamedTuple):
    """Averages over inputs of the four feature-adaptation quantities (Sec. 4.2).

    Each field is a float, or an array of the batch shape of ``Bt``.
    """

    dist_sq: np.ndarray  # E ||z_t - z_0||^2
    norm_sq: np.ndarray  # E ||z_t||^2
    dot: np.ndarray      # E z_t^T z_0
    cos: np.ndarray      # E cos(z_t, z_0)


class GDResult(NamedTuple):
    """Final parameters of a GD run and the loss before each step."""

    B: jax.Array       # (h, d)
    v: jax.Array       # (h,)
    losses: jax.Array  # (steps,), L at the start of each step


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------

def _array(name: str, value, ndim: int) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _shape(a) -> tuple:
    return a if isinstance(a, tuple) else tuple(np.shape(a))


def _check_shapes(X, B, v=None, Y=None, *, b_name="B0", v_name="v0",
                  y_name="Y"):
    """Shape agreement of X (N, d), B (h, d), v (h,), Y (N,); takes arrays
    or shape tuples."""
    (N, d), Bs = _shape(X), _shape(B)
    if Bs[1] != d:
        raise ValueError(
            f"{b_name} must have shape (h, d={d}) to match X {(N, d)}; "
            f"got {Bs}")
    if v is not None and _shape(v) != (Bs[0],):
        raise ValueError(
            f"{v_name} must have shape (h,) = ({Bs[0]},) to match "
            f"{b_name} {Bs}; got {_shape(v)}")
    if Y is not None and _shape(Y) != (N,):
        raise ValueError(
            f"{y_name} must have shape (N,) = ({N},) to match X {(N, d)}; "
            f"got {_shape(Y)}")


def _problem(X, B0, v0, Y=None):
    """Validated float64 copies of (X, B0, v0, Y); Y may be None."""
    X = _array("X", X, 2)
    B0 = _array("B0", B0, 2)
    v0 = _array("v0", v0, 1)
    if Y is not None:
        Y = _array("Y", Y, 1)
    _check_shapes(X, B0, v0, Y)
    N, d = X.shape
    if N > d:
        raise ValueError(
            f"X has N={N} > d={d} rows: K0 = X(B0^T B0 + |v0|^2 I)X^T has "
            "rank <= d < N and is singular (the model is not "
            "overparameterised)")
    return X, B0, v0, Y


def _check_time(steps, lr, flow_time):
    if steps is not None and flow_time is not None:
        raise ValueError("give steps (discrete GD) or flow_time (gradient "
                         "flow), not both")
    if steps is not None:
        if lr is None:
            raise ValueError("steps needs lr (the GD step size)")
        if int(steps) != steps or steps < 0:
            raise ValueError(f"steps must be a non-negative integer; "
                             f"got {steps}")
    if lr is not None and not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be positive and finite; got {lr}")
    if flow_time is not None and not (np.isfinite(flow_time)
                                      and flow_time >= 0):
        raise ValueError(f"flow_time must be >= 0 and finite; "
                         f"got {flow_time}")


# --------------------------------------------------------------------------
# kernel and closed form
# --------------------------------------------------------------------------

def ntk(X, B, v, *, block: str = "full") -> np.ndarray:
    """Empirical NTK of q = X B^T v on the rows of X (Eq. 30), shape (N, N).

    ``block``: ``"full"`` gives K = X(B^T B + ||v||^2 I)X^T; ``"head"`` gives
    X B^T B X^T = (grad_v q)(grad_v q)^T; ``"backbone"`` gives
    ||v||^2 X X^T = (grad_B q)(grad_B q)^T. full = head + backbone.
    """
    if block not in ("full", "head", "backbone"):
        raise ValueError(f"block must be 'full', 'head' or 'backbone'; "
                         f"got {block!r}")
    X = _array("X", X, 2)
    B = _array("B", B, 2)
    v = _array("v", v, 1)
    _check_shapes(X, B, v, b_name="B", v_name="v")
    Z = X @ B.T
    head = Z @ Z.T
    backbone = (v @ v) * (X @ X.T)
    if block == "head":
        return head
    if block == "backbone":
        return backbone
    return head + backbone


def _check_invertible(K: np.ndarray, name: str = "K0") -> np.ndarray:
    """Eigenvalues of the symmetric K; raise if singular, warn if ill-posed."""
    lam = np.linalg.eigvalsh(K)
    lam_max = max(lam[-1], 0.0)
    if lam[0] <= lam_max * K.shape[0] * np.finfo(np.float64).eps:
        raise ValueError(
            f"{name} is singular (eigenvalues in [{lam[0]:.3g}, "
            f"{lam[-1]:.3g}]): X must have full row rank N <= d, and the "
            "kernel must be positive definite")
    cond = lam[-1] / lam[0]
    if cond > COND_WARN:
        warnings.warn(
            f"{name} is ill-conditioned (condition number {cond:.3g}); the "
            "closed form may lose about log10(cond) digits",
            IllConditionedKernelWarning, stacklevel=3)
    return lam


def kernel_response(K, *, steps=None, lr=None, flow_time=None) -> np.ndarray:
    """P (N, N) with theta_t = theta_0 - J0^T P (q0 - Y) (Eq. 29, Lee et al.).

    * no time given (t -> infinity): P = K^{-1}, by Cholesky;
    * ``steps`` of GD with step ``lr``: P = K^{-1} (I - (I - lr K)^steps);
    * gradient flow for ``flow_time`` (rate ``lr``, default 1):
      P = K^{-1} (I - exp(-lr K flow_time)).

    P is symmetric and commutes with K. Raises ValueError if K is singular;
    warns :class:`IllConditionedKernelWarning` when cond(K) > ``COND_WARN``.
    """
    K = _array("K", K, 2)
    if K.shape[0] != K.shape[1] or not np.allclose(
            K, K.T, rtol=0.0, atol=1e-12 * np.abs(K).max(initial=0.0)):
        raise ValueError(f"K must be a symmetric square matrix; got shape "
                         f"{K.shape}")
    K = 0.5 * (K + K.T)
    _check_time(steps, lr, flow_time)
    _check_invertible(K)
    n = K.shape[0]
    if steps is None and flow_time is None:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(K),
                                      np.eye(n))
    lam, Q = np.linalg.eigh(K)
    if flow_time is not None:
        rate = 1.0 if lr is None else lr
        done = -np.expm1(-rate * flow_time * lam)
    else:
        step = lr * lam
        if step[-1] >= 2.0:
            raise ValueError(
                f"lr={lr} diverges: lr * lambda_max(K0) = {step[-1]:.3g} >= 2")
        # 1 - (1 - step)^steps; log1p/expm1 keep digits when step is small.
        below = np.where(step < 1.0, step, 0.0)
        done = np.where(step < 1.0,
                        -np.expm1(steps * np.log1p(-below)),
                        1.0 - (1.0 - step) ** steps)
    return (Q * (done / lam)) @ Q.T


def closed_form(X, B0, v0, Y, *, steps=None, lr=None, flow_time=None):
    """Linearised (NTK-regime) FT solution (Eq. 29, 31): returns (B_t, v_t).

    B_t = B0 - v0 (X^T c)^T  (a rank-one change),  v_t = v0 - B0 X^T c,
    with c = P (q0 - Y), q0 = X B0^T v0 and P from :func:`kernel_response`
    (t -> infinity when neither ``steps`` nor ``flow_time`` is given).

    Shapes: X (N, d), B0 (h, d), v0 (h,), Y (N,) -> B_t (h, d), v_t (h,),
    float64 numpy. Raises ValueError for mismatched shapes, NaN/inf, N > d or
    a singular K0.
    """
    X, B0, v0, Y = _problem(X, B0, v0, Y)
    _check_time(steps, lr, flow_time)
    K = ntk(X, B0, v0)
    P = kernel_response(K, steps=steps, lr=lr, flow_time=flow_time)
    c = P @ (X @ (B0.T @ v0) - Y)
    u = X.T @ c                       # (d,)
    return B0 - np.outer(v0, u), v0 - B0 @ u


def feature_metrics(X, B0, Bt) -> FeatureMetrics:
    """The four averages over the rows x of ``X`` (Appendix D.1).

    z_0 = B0 x, z_t = Bt x; returns E||z_t - z_0||^2, E||z_t||^2,
    E z_t^T z_0 and E cos(z_t, z_0). X (N, d), B0 (h, d), Bt (..., h, d):
    leading batch axes of Bt (a sweep) give fields of that batch shape.
    """
    X = _array("X", X, 2)
    B0 = _array("B0", B0, 2)
    Bt = np.asarray(Bt, dtype=np.float64)
    if Bt.ndim < 2 or Bt.shape[-2:] != B0.shape:
        raise ValueError(f"Bt must have shape (..., h, d) = (..., "
                         f"{B0.shape[0]}, {B0.shape[1]}); got {Bt.shape}")
    if not np.all(np.isfinite(Bt)):
        raise ValueError("Bt contains NaN or inf")
    _check_shapes(X, B0)
    z0 = X @ B0.T                                  # (N, h)
    norm_0 = (z0 * z0).sum(-1)
    flat = Bt.reshape((-1,) + B0.shape)
    out = np.empty((4, flat.shape[0]))
    # Chunks of the batch keep the (chunk, N, h) features under ~32 MB.
    chunk = max(1, 4_000_000 // (X.shape[0] * B0.shape[0]))
    for i in range(0, flat.shape[0], chunk):
        zt = np.matmul(X, np.swapaxes(flat[i:i + chunk], -1, -2))  # BLAS
        dz = zt - z0   # direct form: |z_t|^2 - 2 z_t.z_0 + |z_0|^2 cancels
        dot = (zt * z0).sum(-1)
        norm_t = (zt * zt).sum(-1)
        out[:, i:i + chunk] = np.stack([
            (dz * dz).sum(-1).mean(-1), norm_t.mean(-1), dot.mean(-1),
            (dot / np.sqrt(norm_t * norm_0)).mean(-1)])
    out = out.reshape((4,) + Bt.shape[:-2])
    return FeatureMetrics(*(o if o.ndim else float(o) for o in out))


def head_for_output(X, B0, q0, *, norm, direction) -> np.ndarray:
    """A head v0 (h,) with X B0^T v0 = q0 and ||v0|| = ``norm``.

    v0 = pinv(X B0^T) q0 + n, where n is the component of ``direction`` (h,)
    in the null space of Z0 = X B0^T, rescaled so that ||v0|| = norm. Fixing
    the norm fixes K0 (it depends on v0 only through ||v0||^2), which makes a
    sweep of q0 a clean problem in q0 alone. Needs h > N (overparameterised
    head) and norm >= ||pinv(Z0) q0||.
    """
    X = _array("X", X, 2)
    B0 = _array("B0", B0, 2)
    q0 = _array("q0", q0, 1)
    direction = _array("direction", direction, 1)
    _check_shapes(X, B0, direction, q0, v_name="direction", y_name="q0")
    if not (np.isfinite(norm) and norm >= 0):
        raise ValueError(f"norm must be >= 0 and finite; got {norm}")
    Z0 = X @ B0.T
    p = np.linalg.lstsq(Z0, q0, rcond=None)[0]      # min-norm solution
    if not np.allclose(Z0 @ p, q0, rtol=1e-9, atol=1e-12 * np.abs(q0).max()):
        raise ValueError("q0 is not reachable: X B0^T must have full row "
                         "rank N")
    rest = norm**2 - p @ p
    if rest < -1e-12 * norm**2:
        raise ValueError(f"norm={norm} is below the minimum-norm head "
                         f"|pinv(X B0^T) q0| = {np.sqrt(p @ p):.6g}")
    rest = max(rest, 0.0)
    # Null-space component of `direction`, by projecting out the row space.
    Qr = np.linalg.qr(Z0.T)[0]                       # (h, N) row-space basis
    n = direction - Qr @ (Qr.T @ direction)
    n_norm = np.linalg.norm(n)
    if rest > 0 and n_norm <= 1e-10 * max(np.linalg.norm(direction), 1e-300):
        raise ValueError("direction has no component in the null space of "
                         "X B0^T (needs h > N and a generic direction)")
    return p + (np.sqrt(rest) / n_norm * n if rest > 0 else 0.0 * n)


# --------------------------------------------------------------------------
# gradient descent (jitted lax.scan)
# --------------------------------------------------------------------------

def _predict(params, X):
    B, v = params
    return X @ (B.T @ v)


def _loss(params, X, Y):
    r = _predict(params, X) - Y
    return 0.5 * jnp.vdot(r, r)


def _check_gd(X, B0, v0, Y, lr, steps):
    for name, a, nd in (("X", X, 2), ("B0", B0, 2), ("v0", v0, 1),
                        ("Y", Y, 1)):
        if jnp.ndim(a) != nd:
            raise ValueError(f"{name} must be {nd}-D; got shape "
                             f"{jnp.shape(a)}")
        if not isinstance(a, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(a))):
            raise ValueError(f"{name} contains NaN or inf")
    _check_shapes(*(tuple(jnp.shape(a)) for a in (X, B0, v0, Y)))
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer; got {steps}")
    if not isinstance(lr, jax.core.Tracer) and not (np.isfinite(lr)
                                                    and lr > 0):
        raise ValueError(f"lr must be positive and finite; got {lr}")


@functools.partial(jax.jit, static_argnames=("steps", "head_only"))
def _gd(X, B0, v0, Y, lr, *, steps, head_only):
    if head_only:     # gradient with respect to v alone; B0 is a constant
        def step(v, _):
            loss, gv = jax.value_and_grad(
                lambda v: _loss((B0, v), X, Y))(v)
            return v - lr * gv, loss

        v, losses = jax.lax.scan(step, v0, None, length=steps)
        return GDResult(B0, v, losses)

    def step(params, _):
        loss, (gB, gv) = jax.value_and_grad(_loss)(params, X, Y)
        B, v = params
        return (B - lr * gB, v - lr * gv), loss

    (B, v), losses = jax.lax.scan(step, (B0, v0), None, length=steps)
    return GDResult(B, v, losses)


@functools.partial(jax.jit, static_argnames=("steps",))
def _linearised_gd(X, B0, v0, Y, lr, *, steps):
    theta0 = (B0, v0)
    q0, jvp = jax.linearize(lambda p: _predict(p, X), theta0)
    vjp = jax.linear_transpose(jvp, theta0)

    def step(delta, _):
        r = q0 + jvp(delta) - Y
        (gB, gv), = vjp(r)
        dB, dv = delta
        return (dB - lr * gB, dv - lr * gv), 0.5 * jnp.vdot(r, r)

    zeros = (jnp.zeros_like(B0), jnp.zeros_like(v0))
    (dB, dv), losses = jax.lax.scan(step, zeros, None, length=steps)
    return GDResult(B0 + dB, v0 + dv, losses)


def train_gd(X, B0, v0, Y, *, lr, steps: int) -> GDResult:
    """``steps`` full-batch GD steps on the two-layer model, B and v together.

    X (N, d), B0 (h, d), v0 (h,), Y (N,) -> GDResult(B (h, d), v (h,),
    losses (steps,)). Jitted ``lax.scan``; float64 needs
    ``jax.enable_x64(True)`` around the call. Inputs are not donated: callers
    keep B0 to measure feature change. Works under ``jax.vmap``.
    """
    _check_gd(X, B0, v0, Y, lr, steps)
    return _gd(X, B0, v0, Y, lr, steps=int(steps), head_only=False)


def train_head_gd(X, B0, v0, Y, *, lr, steps: int) -> GDResult:
    """Head probing: ``steps`` GD steps on v with the backbone B0 frozen.

    Only the head's gradient moves anything; ``B`` in the result is ``B0``.
    Same shapes and dtype rules as :func:`train_gd`.
    """
    _check_gd(X, B0, v0, Y, lr, steps)
    return _gd(X, B0, v0, Y, lr, steps=int(steps), head_only=True)


def train_linearised_gd(X, B0, v0, Y, *, lr, steps: int) -> GDResult:
    """GD on the first-order Taylor model q0 + J0 (theta - theta0).

    J0 comes from ``jax.linearize`` at (B0, v0) and its transpose from
    ``jax.linear_transpose``, so this is an autodiff check of the numpy
    :func:`closed_form`. Same shapes and dtype rules as :func:`train_gd`;
    ``losses`` is the linearised loss.
    """
    _check_gd(X, B0, v0, Y, lr, steps)
    return _linearised_gd(X, B0, v0, Y, lr, steps=int(steps))
