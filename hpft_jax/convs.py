"""How training computes convolutions: XLA's convolution or GEMM gradients.

XLA:CPU runs the backward convolutions of a training step slowly (the
weight-gradient conv of ResNet18's first stage about 20x its forward pass)
and another 6-28x slower inside a loop (jax-ml/jax#12868); see
benchmarks/RESULTS.md. :func:`conv_patches` keeps XLA's forward convolution
(fast on CPU, and bit-identical forward values) and computes the gradients
as GEMMs in a custom VJP: the kernel's as patches^T @ g, where the patches
(N H' W', k_h k_w C) are shifted slices of the padded input, concatenated;
the input's as the forward convolution of g with the flipped kernel (stride
1) or as g @ kernel^T folded back with pads (strided). The parameters are
the same arrays (HWIO kernels), so both implementations train the same
model to float tolerance.

:func:`use` switches every plain ``flax.linen.Conv`` call of an ``apply`` to
it (a method interceptor), without changing the model or its parameter
tree; the eNTK code (theory/) still sees plain ``nn.Conv`` modules. The
switch is :attr:`hpft_jax.config.ModelConfig.conv` (``--conv``), carried by
``Classifier.conv`` into :func:`hpft_jax.steps.make_train_step` and
``make_hp_step``: ``auto`` (default) picks "patches" on the CPU backend and
XLA's convolution elsewhere; ``lax`` / ``patches`` force one.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax import lax

from theory.ntk_factors import conv_pads, patches_2d

IMPLS = ("auto", "lax", "patches")


def resolve(impl: str, backend: str | None = None) -> str:
    """'lax' or 'patches' for ``impl`` in :data:`IMPLS`; auto: patches on CPU."""
    if impl not in IMPLS:
        raise ValueError(f"conv must be one of {', '.join(IMPLS)}; got {impl!r}")
    if impl != "auto":
        return impl
    return "patches" if (backend or jax.default_backend()) == "cpu" else "lax"


def for_ntk(impl: str, backend: str | None = None):
    """The ``conv=`` argument of :func:`theory.ntk.empirical_ntk_fn` and
    ``make_drift_fn`` for ``impl``: :func:`conv_stride1_patches` where it
    resolves to patches, None (the module's own convolution) otherwise."""
    return conv_stride1_patches if resolve(impl, backend) == "patches" else None


def conv_stride1_patches(lhs, rhs, window_strides, padding, *args, **kwargs):
    """:func:`conv_patches` for stride-1 convolutions, XLA's otherwise.

    For the eNTK's backward passes (input gradients only) on CPU: through
    ResNet18 (15 of 20 convs stride 1) they ran 2.8x faster than with XLA's
    gradients; on strided convs the GEMM-and-pads input gradient was slower
    and held the 9x patches (small CNN traces 9.2 s / 3.0 GB vs 8.1 s /
    1.8 GB), so those keep XLA's (benchmarks/RESULTS.md, issue 15)."""
    fn = conv_patches if tuple(window_strides) == (1, 1) else lax.conv_general_dilated
    return fn(lhs, rhs, window_strides, padding, *args, **kwargs)


def _nhwc(dimension_numbers, ndim: int) -> bool:
    if ndim != 4:
        return False
    if dimension_numbers is None:
        return False  # lax's default is NCHW / OIHW
    dn = lax.conv_dimension_numbers((1,) * 4, (1,) * 4, dimension_numbers)
    return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
        (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _patches_matmul(x, w, strides, padding, dil, precision):
    """The convolution as shifted slices of the padded input @ the kernel."""
    kh, kw, c, o = w.shape
    patches = patches_2d(x, (kh, kw), strides, padding, dil)
    return lax.dot_general(patches, w.reshape(kh * kw * c, o), (((3,), (0,)), ((), ())),
                           precision=precision)


def _xla(x, w, strides, padding, dil, precision):
    return lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dil,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, dil, precision):
    """Forward: XLA's convolution (fast on CPU). Gradients: GEMMs (:func:`_conv_bwd`)."""
    return _xla(x, w, strides, padding, dil, precision)


def _conv_fwd(x, w, strides, padding, dil, precision):
    return _xla(x, w, strides, padding, dil, precision), (x, w)


def _conv_bwd(strides, padding, dil, precision, res, g):
    """d/dw: patches(x)^T @ g, one GEMM. d/dx: for stride 1 and no dilation, the
    forward convolution of g with the flipped, transposed kernel; otherwise the
    transpose of the patches GEMM (a GEMM, then pads)."""
    x, w = res
    _, vjp_w = jax.vjp(lambda w_: _patches_matmul(x, w_, strides, padding, dil, precision), w)
    (dw,) = vjp_w(g)
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    if strides == (1, 1) and dil == (1, 1) and max(pt, pb) < kh and max(pl, pr) < kw:
        wt = jnp.flip(w, (0, 1)).swapaxes(2, 3)
        pad = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
        dx = _xla(g, wt, (1, 1), pad, (1, 1), precision)
    else:
        _, vjp_x = jax.vjp(lambda x_: _patches_matmul(x_, w, strides, padding, dil, precision), x)
        (dx,) = vjp_x(g)
    return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_patches(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                 rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                 batch_group_count: int = 1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels, with GEMM gradients.

    lhs: (N, H, W, C), rhs: (k_h, k_w, C, O) -> (N, H', W', O). The forward
    pass is XLA's convolution; the kernel's gradient is one GEMM of the
    patches (N H' W', k_h k_w C) with the output's gradient, and the input's
    gradient a forward convolution (stride 1) or a GEMM plus pads (strided).
    Strides, explicit or 'SAME'/'VALID' padding and kernel dilation are
    supported; anything else (input dilation, groups, other layouts, another
    output dtype) calls ``lax.conv_general_dilated`` with the same arguments.
    """
    lhs_dilation = tuple(lhs_dilation or (1, 1))
    rhs_dilation = tuple(rhs_dilation or (1, 1))
    if (not _nhwc(dimension_numbers, lhs.ndim) or feature_group_count != 1
            or batch_group_count != 1 or lhs_dilation != (1, 1)
            or preferred_element_type is not None):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    kh, kw = rhs.shape[:2]
    strides = tuple(window_strides)
    window = ((kh - 1) * rhs_dilation[0] + 1, (kw - 1) * rhs_dilation[1] + 1)
    return _conv(lhs, rhs, strides, conv_pads(padding, lhs.shape, window, strides), rhs_dilation,
                 precision)


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if (type(m) is nn.Conv and context.method_name == "__call__"
            and m.conv_general_dilated is None and m.conv_general_dilated_cls is None
            and "kernel" in m.variables.get("params", {})):
        fast = m.clone(parent=None, conv_general_dilated=conv_patches)
        return fast.apply({"params": m.variables["params"]}, *args, **kwargs)
    return next_fun(*args, **kwargs)


@contextlib.contextmanager
def use(impl: str):
    """Within the block, plain ``nn.Conv`` calls compute with ``impl``
    ('lax': unchanged; 'patches': :func:`conv_patches`; 'auto': resolved)."""
    if resolve(impl) == "lax":
        yield
        return
    with nn.intercept_methods(_interceptor):
        yield


def wrap(impl: str):
    """Decorator: ``fn`` runs under :func:`use` ``(impl)`` (resolved when traced)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with use(impl):
                return fn(*args, **kwargs)

        return wrapped

    return deco
