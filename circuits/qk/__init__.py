"""The static q/k analysis of a decomposition: which query and key subcomponents interact, at which offsets.

- `static`: densities, static interaction strengths with RoPE at each offset, head norms, the previous-token
  pair and what ablating its query does to attention (the per-prompt split is `attrgraph.qk`);
- `plots`: the PNG figures of those results.
"""

from circuits.qk.plots import plot_attention_ablation, plot_offset_attention, plot_static_strength
from circuits.qk.static import (
    AblationEffect,
    FiringStats,
    PreviousTokenPair,
    StaticStrength,
    ablation_attention_effect,
    activation_signs,
    densities,
    find_previous_token_pair,
    firing_stats,
    head_norms,
    mean_attention_by_offset,
    near_always_on,
    qk_layers,
    static_strength,
    top_densities,
)

__all__ = [
    "AblationEffect",
    "FiringStats",
    "PreviousTokenPair",
    "StaticStrength",
    "ablation_attention_effect",
    "activation_signs",
    "densities",
    "find_previous_token_pair",
    "firing_stats",
    "head_norms",
    "mean_attention_by_offset",
    "near_always_on",
    "plot_attention_ablation",
    "plot_offset_attention",
    "plot_static_strength",
    "qk_layers",
    "static_strength",
    "top_densities",
]
