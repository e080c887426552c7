"""Cost model for the per-layer eNTK methods: FLOPs and bytes from shapes.

A rule-covered layer (Dense or Conv) that one sample uses at P positions,
with K = fan-in (+1 for the bias) and c_out outputs, contributes to the
eNTK of h outputs over n × n sample pairs in one of two exact forms of (*)
(see :mod:`theory.ntk_factors`):

* ``"gram"``: stored factors A (P, K) and G (h, P, c_out); each pair forms
  the patch Gram M = A_i A_jᵀ (P, P) and contracts it with the cotangents.
* ``"jac"``: the per-sample Jacobian of this layer, J = Aᵀ G (h, K·c_out),
  formed once per sample; each pair is one J_i J_jᵀ (or ⟨J_i, J_j⟩ for a
  trace).

Multiply-adds, for n² pairs (``trace`` drops the h² terms to h):

  gram, full:  n²(P²K + P²·h·c_out + P·h²·c_out)     (P = 1: n²·h²·c_out)
  gram, trace: n²(P²K + P²·h·c_out)                   (P = 1: n²·h·(K+c_out))
  jac,  full:  n·P·K·h·c_out + n²·h²·K·c_out
  jac,  trace: n·P·K·h·c_out + n²·h·K·c_out

Stored bytes per sample and output unit: gram P·c_out (+ P·K per sample for
A), jac K·c_out. The full-mode formulas are the ones the library always
used, so Dense/MLP plans are unchanged. Trace mode picks the fewest
multiply-adds; its memory is bounded separately (:mod:`theory.ntk_budget`
chunks the outputs so traces never hold more factor bytes than full mode).

The third method, NTK-vector products (``"vjp_jvp"``), is model-wide: it
costs n·h backward passes plus n·h JVPs over n samples and stores nothing
per layer; :func:`model_costs` prices it beside the structured plan.
"""

from __future__ import annotations

FORMS = ("gram", "jac")


def layer_flops(P: int, K: int, cout: int, h: int, n: int, *, trace: bool) -> dict:
    """Multiply-adds of each exact form for one layer over n × n pairs."""
    if P == 1:
        gram = n * n * h * (K + cout) if trace else n * n * h * h * cout
    else:
        pair = P * P * K + P * P * h * cout + (0 if trace else P * h * h * cout)
        gram = n * n * pair
    jac = n * P * K * h * cout + n * n * (h if trace else h * h) * K * cout
    return {"gram": gram, "jac": jac}


def layer_bytes(P: int, K: int, cout: int, h: int, itemsize: int = 4) -> dict:
    """Stored factor bytes per sample of each form, for all h outputs."""
    gram = (h * P * cout + (P * K if P > 1 or K > 1 else K)) * itemsize
    return {"gram": gram, "jac": h * K * cout * itemsize}


def choose_form(P: int, K: int, cout: int, h: int, n: int, *, trace: bool = False) -> str:
    """The exact form with fewer multiply-adds (ties: "gram")."""
    fl = layer_flops(P, K, cout, h, n, trace=trace)
    return "gram" if fl["gram"] <= fl["jac"] else "jac"


def model_costs(layers, fallback_width: int, h: int, n: int, *, trace: bool,
                backward_macs: int | None = None) -> dict:
    """Totals for a plan: structured multiply-adds and bytes vs NTK-vector products.

    ``layers``: iterable of (P, K, c_out, form); ``fallback_width``: columns
    of the explicit Jacobian of leaves without a rule; ``backward_macs``:
    multiply-adds of one backward pass (the layers' own MACs if None).
    """
    layers = list(layers)
    fwd = sum(P * (K - 1 if K > 1 else K) * c for P, K, c, _ in layers)
    bwd = fwd if backward_macs is None else backward_macs
    contract = sum(layer_flops(P, K, c, h, n, trace=trace)[form] for P, K, c, form in layers)
    contract += n * n * (h if trace else h * h) * fallback_width
    per_sample = sum(layer_bytes(P, K, c, h)[form] for P, K, c, form in layers)
    per_sample += h * fallback_width * 4
    factor_macs = n * h * bwd
    ntvp = n * h * bwd + n * h * n * 2 * bwd   # per (j, d): one VJP + one JVP over n
    return {"structured_macs": factor_macs + contract, "factor_macs": factor_macs,
            "contract_macs": contract, "factor_bytes_per_sample": per_sample,
            "vjp_jvp_macs": ntvp}
