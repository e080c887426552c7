"""Named starting configurations for ``hpft sweep --preset NAME`` (flags override).

* ``gcn``: the paper's graph setting (Table 1 last column, Fig. 4 fifth
  panel): OGB's 5-layer GCN (hidden 300, dropout 0.5, mean pooling),
  pretrained on ogbg-molpcba (Adam 1e-3, batch 32, 100 epochs as OGB's
  baseline), HP and FT on ogbg-moltox21's scaffold split with τ ∈
  {0, 1, 2, 4, ..., 128, 200}. The paper defers the remaining
  hyper-parameters to the authors' repository; HP lr 0.1 (SGD), FT lr 0.01
  (SGD + momentum, cosine), 100 FT epochs, patience 10 are our choices
  (docs/graphs.md). Data: ``dataset/ogbg_molpcba`` and
  ``dataset/ogbg_moltox21`` where OGB's tools put them.
"""

from __future__ import annotations

from hpft_jax import config as C

GCN = C.SweepConfig(
    name="gcn",
    data=C.DataConfig(source="ogb:dataset/ogbg_molpcba", downstream="ogb:dataset/ogbg_moltox21",
                      distort=False),
    model=C.ModelConfig(backbone="gcn", width=300, depth=5, head="linear"),
    pretrain=C.PretrainConfig(epochs=100, lr=1e-3, batch_size=32, optimizer="adam"),
    hp=C.HPConfig(taus=(0, 1, 2, 4, 8, 16, 32, 64, 128, 200), lr=0.1, batch_size=32),
    ft=C.FTConfig(epochs=100, lr=0.01, batch_size=32, patience=10),
)

PRESETS: dict[str, C.SweepConfig] = {"gcn": GCN}


def get(name: str | None) -> C.SweepConfig | None:
    """The preset ``name`` (None: no preset)."""
    if name is None:
        return None
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]
