"""Component interpretation statistics in one streamed pass over held-out tokens (attribution-graphs.md §10).

Subcomponents carry a flat index: the C subcomponents of `module_paths[0]`, then those of
`module_paths[1]`, and so on. Over N tokens, with g the CI network's output on the clean target forward:

1. c fires at a token when g > τ_fire. F_c counts its firings; density = F_c / N; mean CI = Σ g / N.
2. Input tokens: n_cv counts firings whose current token is v, and T_v counts v. recall = n_cv / F_c,
   precision = n_cv / T_v, lift = precision / (F_c / N), PMI = log(n_cv N / (F_c T_v)).
3. Output tokens: the same formulas with n_cv = Σ over firing positions of p_target(next = v) and
   T_v = Σ over all positions of p_target(next = v).
4. Co-firing among alive subcomponents (F_c > 0): c_ij counts the tokens where both fire; precision
   c_ij/c_i, recall c_ij/c_j, Jaccard c_ij/(c_i + c_j − c_ij), PMI log(c_ij N/(c_i c_j)).
5. Top examples: the `top_k` highest-CI firings of each subcomponent [ours: ties go to the larger
   |a·‖u_c‖|, then to the earlier token], each with ±`window` tokens of CI and a·‖u_c‖ (a = v_cᵀ x).
6. Random examples: a per-subcomponent reservoir (Algorithm R) of capacity `reservoir`. Each batch
   offers at most `per_batch` of a subcomponent's firings, chosen uniformly (upstream's rule: one long
   document cannot fill a reservoir).

Memory [ours]. State that grows with the vocabulary or with C_total lives only in rows of
subcomponents that have fired, allocated on the first firing: output mass rows × vocab (float32),
co-firing rows × rows (int32), top examples rows × top_k × (2·window + 1), reservoir rows × reservoir.
Input-token counts are sparse (subcomponent, token) pairs. The tokens are kept (int32, N of them), so
example windows are cut from them afterwards rather than stored with every example.

Artifact: `<run>/harvest/` (written atomically) holds `harvest.safetensors` (every count tensor) and
`harvest.json` (settings, throughput and a per-component summary of the alive subcomponents).
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attrgraph.labels import (
    HARVEST_DIR,
    HARVEST_FORMAT,
    HARVEST_FORMAT_VERSION,
    HARVEST_META,
    HARVEST_TENSORS,
    component_key,
    harvest_meta_path,
    read_harvest_meta,
    summary_label,
)
from decomposer.errors import ArtifactFormatError, VpdError
from decomposer.io import atomic_write_dir, atomic_write_text
from decomposer.vpd.run import Decomposition

logger = logging.getLogger(__name__)

PAD = -1  # token id of window positions outside the sequence
_COALESCE_EVERY = 1 << 22  # pending sparse (subcomponent, token) pairs before they are merged
_MIN_ROW_GROWTH = 64  # rows added at least when the per-row state grows (it grows by half otherwise)


# ---------------------------------------------------------------------------------------------------
# Results


class TokenStats(NamedTuple):
    """Token statistics of one subcomponent; every field has one entry per listed token."""

    token: Tensor  # token ids
    count: Tensor  # n_cv: firings on the token (input) or predicted mass at firings (output)
    recall: Tensor  # n_cv / F_c
    precision: Tensor  # n_cv / T_v
    lift: Tensor  # precision / (F_c / N)
    pmi: Tensor  # log(n_cv N / (F_c T_v))


class CoFiring(NamedTuple):
    """Co-firing of subcomponent i with each partner j (alive, not i, c_ij > 0), by flat index."""

    partner: Tensor
    count: Tensor  # c_ij
    precision: Tensor  # c_ij / c_i
    recall: Tensor  # c_ij / c_j
    jaccard: Tensor  # c_ij / (c_i + c_j − c_ij)
    pmi: Tensor  # log(c_ij N / (c_i c_j))


@dataclass(frozen=True)
class Example:
    """One firing with its window of tokens (cut at the sequence's ends).

    `ci_window` and `act_window` (per-token CI and a·‖u_c‖ over `tokens`) exist for top examples only.
    """

    loc: int  # global index of the firing token in the harvested stream
    center: int  # index of the firing token in `tokens`
    tokens: list[int]
    ci: float
    act: float
    ci_window: list[float] | None = None
    act_window: list[float] | None = None


def _ratio_stats(count: Tensor, total: Tensor, F: float, N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(recall, precision, lift, PMI) from n_cv, T_v, F_c and N, in float64."""
    count, total = count.double(), total.double()
    recall = count / F
    precision = count / total
    lift = precision / (F / N)
    pmi = torch.log(count * N / (F * total))
    return recall, precision, lift, pmi


@dataclass(frozen=True, eq=False)
class Harvest:
    """Everything one harvest pass counted. Tensors are on the CPU; `alive` orders every per-row tensor.

    Attributes:
        module_paths, Cs: The decomposed matrices in flat-index order and their C.
        tau_fire, window, top_k, reservoir, per_batch, seed: The settings of the pass.
        n_tokens: N, the number of harvested tokens.
        seconds: Wall time of the pass (`tokens_per_s` = N / seconds).
        vocab: Decoded token strings by id, or None when no tokenizer was given.
        firing_count: F_c per subcomponent (C_total,), int64. ci_sum: Σ g (C_total,), float64.
        u_norm: ‖u_c‖ (C_total,). input_total: T_v of input tokens (vocab,). output_total: T_v of
            predicted mass (vocab,), float64.
        input_comp, input_token, input_count: Sparse n_cv of input tokens, sorted by (subcomponent, token).
        alive: Flat indices with F_c > 0, ascending (n_alive,). output_mass: n_cv of predicted mass
            (n_alive, vocab). cofire: c_ij among alive subcomponents (n_alive, n_alive); the diagonal is F_c.
        top_loc: Token index of each top example (n_alive, top_k), −1 where empty; top_ci, top_act: its
            window (n_alive, top_k, 2·window + 1), zero outside the sequence.
        res_loc, res_ci, res_act: The reservoir (n_alive, reservoir), −1 / 0 where empty; res_offered:
            firings offered to it per row.
        tokens: The harvested tokens (N,), int32; seq_starts: where each sequence starts, then N.
    """

    module_paths: tuple[str, ...]
    Cs: tuple[int, ...]
    tau_fire: float
    window: int
    top_k: int
    reservoir: int
    per_batch: int
    seed: int
    n_tokens: int
    seconds: float
    vocab: tuple[str, ...] | None
    firing_count: Tensor
    ci_sum: Tensor
    u_norm: Tensor
    input_total: Tensor
    output_total: Tensor
    input_comp: Tensor
    input_token: Tensor
    input_count: Tensor
    alive: Tensor
    output_mass: Tensor
    cofire: Tensor
    top_loc: Tensor
    top_ci: Tensor
    top_act: Tensor
    res_loc: Tensor
    res_ci: Tensor
    res_act: Tensor
    res_offered: Tensor
    tokens: Tensor
    seq_starts: Tensor

    def __post_init__(self) -> None:
        row_of = torch.full((self.C_total,), -1, dtype=torch.long)
        row_of[self.alive] = torch.arange(len(self.alive))
        object.__setattr__(self, "_row_of", row_of)
        keys = [component_key(p, c) for p, C in zip(self.module_paths, self.Cs, strict=True) for c in range(C)]
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_flat_of", {k: i for i, k in enumerate(keys)})
        object.__setattr__(self, "_starts", self.seq_starts.tolist())
        object.__setattr__(self, "_density", self.firing_count.double() / self.n_tokens)
        object.__setattr__(self, "_mean_ci", self.ci_sum.double() / self.n_tokens)

    # -- identity ----------------------------------------------------------------------------------

    @property
    def C_total(self) -> int:
        return sum(self.Cs)

    @property
    def vocab_size(self) -> int:
        return len(self.input_total)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def density(self) -> Tensor:
        """F_c / N per subcomponent (C_total,), float64."""
        return self._density

    @property
    def mean_ci(self) -> Tensor:
        """Mean CI over all N tokens per subcomponent (C_total,), float64."""
        return self._mean_ci

    def key(self, flat: int) -> str:
        """The component key of a flat index, e.g. `1.attn.q:31`."""
        return self._keys[flat]

    def module_of(self, flat: int) -> tuple[str, int]:
        """(module path, subcomponent index c) of a flat index."""
        for path, C in zip(self.module_paths, self.Cs, strict=True):
            if flat < C:
                return path, flat
            flat -= C
        raise IndexError(f"flat index beyond C_total {self.C_total}")

    def flat_index(self, key: str) -> int:
        """The flat index of a component key such as `1.attn.q:31`.

        Raises:
            VpdError: No decomposed matrix has that key.
        """
        flat = self._flat_of.get(key.strip()) if isinstance(key, str) else None
        if flat is None:
            examples = ", ".join(self._keys[i] for i in self.alive[:3].tolist()) or self._keys[0]
            raise VpdError(
                f"Component key {key!r} names no subcomponent of this harvest; use `block.attn|mlp.matrix:c` "
                f"as in {examples}."
            )
        return flat

    def row(self, flat: int) -> int | None:
        """The row of an alive subcomponent in the per-row tensors; None if it never fired."""
        row = int(self._row_of[flat])
        return row if row >= 0 else None

    # -- statistics --------------------------------------------------------------------------------

    def input_stats(self, flat: int) -> TokenStats:
        """Input-token statistics for every token the subcomponent fired on, by token id."""
        lo, hi = torch.searchsorted(self.input_comp, torch.tensor([flat, flat + 1])).tolist()
        token, count = self.input_token[lo:hi], self.input_count[lo:hi]
        F = float(self.firing_count[flat])
        return TokenStats(token, count, *_ratio_stats(count, self.input_total[token], F, self.n_tokens))

    def output_stats(self, flat: int) -> TokenStats:
        """Output-token statistics over the whole vocabulary (empty for a dead subcomponent)."""
        row = self.row(flat)
        if row is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return TokenStats(torch.zeros(0, dtype=torch.long), *[empty] * 5)
        count = self.output_mass[row].double()
        F = float(self.firing_count[flat])
        token = torch.arange(self.vocab_size)
        return TokenStats(token, count, *_ratio_stats(count, self.output_total, F, self.n_tokens))

    def cofiring(self, flat: int) -> CoFiring:
        """Co-firing with every other alive subcomponent it shares a token with, by flat index."""
        row = self.row(flat)
        if row is None:
            empty = torch.zeros(0, dtype=torch.float64)
            return CoFiring(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), *[empty] * 4)
        c_ij = self.cofire[row].long()
        keep = c_ij > 0
        keep[row] = False
        c_ij = c_ij[keep]
        partner = self.alive[keep]
        c_i, c_j = float(self.firing_count[flat]), self.firing_count[partner].double()
        n = c_ij.double()
        return CoFiring(
            partner, c_ij, n / c_i, n / c_j, n / (c_i + c_j - n), torch.log(n * self.n_tokens / (c_i * c_j))
        )

    def _window_tokens(self, loc: int) -> tuple[int, int, list[int]]:
        """(start offset into a ±window array, center index, tokens) of the window around token `loc`."""
        seq = bisect.bisect_right(self._starts, loc) - 1
        start, end = self._starts[seq], self._starts[seq + 1]
        lo, hi = max(start, loc - self.window), min(end, loc + self.window + 1)
        return lo - (loc - self.window), loc - lo, self.tokens[lo:hi].tolist()

    def top_examples(self, flat: int, n: int | None = None) -> list[Example]:
        """The `n` (default all) highest-CI firings, best first, with per-token CI and a·‖u_c‖ over each window."""
        row = self.row(flat)
        if row is None:
            return []
        out = []
        ci_rows, act_rows = self.top_ci[row, :n].tolist(), self.top_act[row, :n].tolist()
        for slot, loc in enumerate(self.top_loc[row, :n].tolist()):
            if loc < 0:
                break
            offset, center, tokens = self._window_tokens(loc)
            ci = ci_rows[slot][offset : offset + len(tokens)]
            act = act_rows[slot][offset : offset + len(tokens)]
            out.append(Example(loc, center, tokens, ci[center], act[center], ci, act))
        return out

    def random_examples(self, flat: int, n: int | None = None) -> list[Example]:
        """The first `n` (default all) of the reservoir's firings, in slot order (CI and a·‖u_c‖ at the firing)."""
        row = self.row(flat)
        if row is None:
            return []
        out = []
        ci, act = self.res_ci[row, :n].tolist(), self.res_act[row, :n].tolist()
        for slot, loc in enumerate(self.res_loc[row, :n].tolist()):
            if loc < 0:
                break
            _, center, tokens = self._window_tokens(loc)
            out.append(Example(loc, center, tokens, ci[slot], act[slot]))
        return out

    def summary(
        self, flat: int, *, list_size: int = 10, n_examples: int = 3, min_count: int = 2, text: bool = False
    ) -> dict[str, Any]:
        """A JSON-ready summary of one subcomponent: rates, ranked token lists, partners, examples, label.

        Lists: `input` (by recall), `input_pmi` (by PMI among tokens with at least `min_count` firings),
        `output` (by PMI among tokens whose mean predicted probability at firings is at least 1/vocab),
        `output_bottom` (lowest PMI among tokens with mean predicted probability at least 1/vocab over all
        tokens), `cofiring` (by Jaccard). The probability floors [ours] keep tokens the model never
        predicts from topping a PMI list. `text=True` adds each example window's token strings.
        """
        V, N = self.vocab_size, self.n_tokens
        path, c = self.module_of(flat)
        out: dict[str, Any] = {
            "key": self.key(flat),
            "module": path,
            "index": c,
            "firing_count": int(self.firing_count[flat]),
            "density": float(self.density[flat]),
            "mean_ci": float(self.mean_ci[flat]),
            "u_norm": float(self.u_norm[flat]),
        }
        inp = self.input_stats(flat)
        out["input"] = self._token_list(inp, _top(inp.count, list_size, True))
        sel = (inp.count >= min_count).nonzero().flatten()
        out["input_pmi"] = self._token_list(inp, sel[_top(inp.pmi[sel], list_size, True)])
        outp = self.output_stats(flat)
        if len(outp.token):
            ok = (outp.count > 0) & (self.output_total > 0)
            sel = (ok & (outp.recall >= 1 / V)).nonzero().flatten()
            out["output"] = self._token_list(outp, sel[_top(outp.pmi[sel], list_size, True)])
            sel = (ok & (self.output_total / N >= 1 / V)).nonzero().flatten()
            out["output_bottom"] = self._token_list(outp, sel[_top(outp.pmi[sel], list_size, False)])
        else:
            out["output"], out["output_bottom"] = [], []
        co = self.cofiring(flat)
        best = _top(co.jaccard, list_size, True)
        out["cofiring"] = [
            {"key": self.key(partner), "count": count} | {name: _num(x) for name, x in zip(_RATES, rates, strict=True)}
            for partner, count, *rates in zip(*(t[best].tolist() for t in co), strict=True)
        ]
        out["top_examples"] = [self._example(e, text) for e in self.top_examples(flat, n_examples)]
        out["random_examples"] = [self._example(e, text) for e in self.random_examples(flat, n_examples)]
        out["label"] = summary_label(out)
        return out

    def _token_list(self, stats: TokenStats, idx: Tensor) -> list[dict[str, Any]]:
        rows = []
        integer = not stats.count.is_floating_point()
        for token, count, *rates in zip(*(t[idx].tolist() for t in stats), strict=True):
            row = {"id": token, "token": self.vocab[token] if self.vocab and token < len(self.vocab) else None}
            row["count"] = count if integer else _num(count)
            row |= {name: _num(x) for name, x in zip(TokenStats._fields[2:], rates, strict=True)}
            rows.append(row)
        return rows

    def _example(self, e: Example, text: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"loc": e.loc, "center": e.center, "tokens": e.tokens, "ci": _num(e.ci)}
        out["act"] = _num(e.act)
        if e.ci_window is not None:
            out["ci_window"] = [round(x, 4) for x in e.ci_window]
            out["act_window"] = [round(x, 4) for x in e.act_window or []]
        if text:
            out["text"] = [self.token_text(t) for t in e.tokens]
        return out

    def token_text(self, token: int) -> str:
        """The decoded string of a token id, or `#id` without a vocabulary."""
        return self.vocab[token] if self.vocab and 0 <= token < len(self.vocab) else f"#{token}"


_RATES = CoFiring._fields[2:]


def _num(x: float, digits: int = 6) -> float:
    """`x` to `digits` significant digits, which keeps the JSON small."""
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def _top(values: Tensor, k: int, descending: bool) -> Tensor:
    """Indices of the `k` best values, best first; ties keep index (token or flat index) order."""
    candidates = torch.arange(len(values))
    if 0 < k and 4 * k < len(values):  # a full sort of a vocabulary-sized list is the slow part of a summary
        kth = torch.topk(values, k, largest=descending).values[-1]
        candidates = (values >= kth if descending else values <= kth).nonzero().flatten()
    return candidates[torch.sort(values[candidates], descending=descending, stable=True).indices][:k]


# ---------------------------------------------------------------------------------------------------
# The streamed pass


def _lexsort(keys: Sequence[Tensor], descending: Sequence[bool]) -> Tensor:
    """Indices that sort by keys[0], then keys[1], …; stable sorts from the last key to the first."""
    order = torch.arange(len(keys[0]), device=keys[0].device)
    for key, desc in reversed(list(zip(keys, descending, strict=True))):
        order = order[torch.sort(key[order], descending=desc, stable=True).indices]
    return order


def _group_rank(sorted_groups: Tensor) -> Tensor:
    """0, 1, 2, … within each run of equal values of an already grouped tensor."""
    _, counts = torch.unique_consecutive(sorted_groups, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(len(sorted_groups), device=sorted_groups.device) - torch.repeat_interleave(starts, counts)


def _at_most_per_group(groups: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices of a uniform random choice of at most `n` elements per group, and each one's draw order."""
    prio = torch.rand(len(groups), generator=generator, device=groups.device)
    order = _lexsort([groups, prio], [False, False])
    rank = _group_rank(groups[order])
    keep = rank < n
    return order[keep], rank[keep]


def _reservoir_offer(
    loc: Tensor, offered: Tensor, rows: Tensor, new_loc: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of Algorithm R for distinct `rows`, each offered one item; updates `loc` and `offered`.

    The i-th item offered to a row (0-based) takes slot i while the reservoir has room, else slot
    j ~ U{0, …, i}, kept only if j < capacity; so every offered item stays with probability
    capacity / (items offered).

    Returns:
        (rows, slots, positions in the input) of the items written, so the caller can store their values.
    """
    R = loc.shape[1]
    seen = offered[rows]
    u = torch.rand(len(rows), generator=generator, device=rows.device, dtype=torch.float64)
    slot = torch.where(seen < R, seen, torch.minimum((u * (seen + 1)).long(), seen))
    ok = (slot < R).nonzero().flatten()
    loc[rows[ok], slot[ok]] = new_loc[ok]
    offered[rows] += 1
    return rows[ok], slot[ok], ok


def _windows(values: Tensor, pos: Tensor, comp: Tensor, T: int, w: int) -> Tensor:
    """values[(b, t−w … t+w), c] for flat positions `pos` = b·T + t of a (B·T, C_total) tensor; 0 outside."""
    b, t = pos // T, pos % T
    tt = t[:, None] + torch.arange(-w, w + 1, device=pos.device)
    inside = (tt >= 0) & (tt < T)
    out = values[b[:, None] * T + tt.clamp(0, T - 1), comp[:, None]].float()
    return out.masked_fill(~inside, 0.0)


class _Accumulator:
    """The running state of a harvest pass, on one device; rows are allocated on first firing."""

    def __init__(self, C_total: int, V: int, *, tau: float, top_k: int, window: int, reservoir: int,
                 per_batch: int, seed: int, device: torch.device) -> None:  # fmt: skip
        self.C_total, self.V, self.tau, self.k, self.w = C_total, V, tau, top_k, window
        self.R, self.per_batch, self.device = reservoir, per_batch, device
        W = 2 * window + 1
        z = dict(device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.row_of = torch.full((C_total,), -1, dtype=torch.long, **z)
        self.row_flat = torch.zeros(0, dtype=torch.long, **z)
        self.n_rows = 0
        self.firing_count = torch.zeros(C_total, dtype=torch.long, **z)
        self.ci_sum = torch.zeros(C_total, dtype=torch.float64, **z)
        self.input_total = torch.zeros(V, dtype=torch.long, **z)
        self.output_total = torch.zeros(V, dtype=torch.float64, **z)
        self.in_keys = torch.zeros(0, dtype=torch.long, **z)
        self.in_counts = torch.zeros(0, dtype=torch.long, **z)
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.n_pending = 0
        # Per-row state, grown along dim 0 (co-firing along both dims) as subcomponents start firing.
        self.rowed = {
            "output_mass": torch.zeros(0, V, **z),
            "top_loc": torch.full((0, top_k), -1, dtype=torch.long, **z),
            "top_ci": torch.zeros(0, top_k, W, **z),
            "top_act": torch.zeros(0, top_k, W, **z),
            "res_loc": torch.full((0, reservoir), -1, dtype=torch.long, **z),
            "res_ci": torch.zeros(0, reservoir, **z),
            "res_act": torch.zeros(0, reservoir, **z),
            "res_offered": torch.zeros(0, dtype=torch.long, **z),
        }
        self.cofire = torch.zeros(0, 0, dtype=torch.int32, **z)
        self.n_tokens = 0
        self.tokens: list[Tensor] = []
        self.seq_starts: list[int] = []

    def _rows_for(self, fired: Tensor) -> Tensor:
        """Rows of the subcomponents in `fired`, allocating (and growing the state) for new ones."""
        new = fired[self.row_of[fired] < 0]
        if len(new):
            self.row_of[new] = torch.arange(self.n_rows, self.n_rows + len(new), device=self.device)
            self.row_flat = torch.cat([self.row_flat, new])
            self.n_rows += len(new)
            cap = len(self.rowed["res_offered"])
            if self.n_rows > cap:
                cap = min(self.C_total, max(self.n_rows, cap + cap // 2 + _MIN_ROW_GROWTH))
                for name, t in self.rowed.items():
                    fill = -1 if name.endswith("_loc") else 0
                    grown = torch.full((cap, *t.shape[1:]), fill, dtype=t.dtype, device=self.device)
                    grown[: len(t)] = t
                    self.rowed[name] = grown
                grown = torch.zeros(cap, cap, dtype=torch.int32, device=self.device)
                grown[: len(self.cofire), : len(self.cofire)] = self.cofire
                self.cofire = grown
        return self.row_of[fired]

    def update(self, tokens: Tensor, g: Tensor, act: Tensor, probs: Tensor) -> None:
        """Count one batch: tokens (B, T), g and a·‖u‖ (B, T, C_total), next-token probabilities (B, T, V)."""
        B, T = tokens.shape
        base = self.n_tokens
        flat_tokens = tokens.reshape(-1)
        g, act, probs = g.reshape(B * T, -1), act.reshape(B * T, -1), probs.reshape(B * T, -1)
        fire = g > self.tau  # (B·T, C_total)
        self.firing_count += fire.sum(0)
        self.ci_sum += g.sum(0, dtype=torch.float64)
        self.input_total += torch.bincount(flat_tokens, minlength=self.V)
        self.output_total += probs.sum(0, dtype=torch.float64)
        pos, comp = fire.nonzero(as_tuple=True)
        if len(pos):
            self._add_input_pairs(comp * self.V + flat_tokens[pos])
            fired = torch.unique(comp)
            rows = self._rows_for(fired)
            self._add_row_products(fire[:, fired].to(probs.dtype), rows, probs)
            entry_rows = self.row_of[comp]
            self._update_top(pos, comp, entry_rows, g, act, T, base)
            self._update_reservoir(pos, comp, entry_rows, g, act, base)
        self.seq_starts.extend(range(base, base + B * T, T))
        self.tokens.append(flat_tokens.to(torch.int32).cpu())
        self.n_tokens += B * T

    def _add_row_products(self, F: Tensor, rows: Tensor, probs: Tensor) -> None:
        """Output mass += Fᵀ p and co-firing += Fᵀ F for the firing indicator F (B·T, rows fired)."""
        # Dense GEMMs beat sparse kernels at these densities. The products are integers below 2^24, so
        # exact in float32. When most rows fired, one contiguous block update is cheaper than a scatter.
        n = self.n_rows
        if 2 * len(rows) >= n:
            full = torch.zeros(F.shape[0], n, dtype=F.dtype, device=F.device)
            full[:, rows] = F
            self.rowed["output_mass"][:n] += full.T @ probs
            self.cofire[:n, :n] += (full.T @ full).to(torch.int32)
        else:
            self.rowed["output_mass"].index_add_(0, rows, F.T @ probs)
            self.cofire[rows[:, None], rows[None, :]] += (F.T @ F).to(torch.int32)

    def _add_input_pairs(self, keys: Tensor) -> None:
        u, c = torch.unique(keys, return_counts=True)
        self.pending.append((u, c))
        self.n_pending += len(u)
        if self.n_pending > _COALESCE_EVERY:
            self._coalesce()

    def _coalesce(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.in_keys, *(u for u, _ in self.pending)])
        counts = torch.cat([self.in_counts, *(c for _, c in self.pending)])
        self.in_keys, inverse = torch.unique(keys, return_inverse=True)
        self.in_counts = torch.zeros(len(self.in_keys), dtype=torch.long, device=self.device)
        self.in_counts.scatter_add_(0, inverse, counts)
        self.pending, self.n_pending = [], 0

    def _update_top(self, pos: Tensor, comp: Tensor, rows: Tensor, g: Tensor, act: Tensor, T: int, base: int) -> None:
        k, w, s = self.k, self.w, self.rowed
        ci, a = g[pos, comp].float(), act[pos, comp].float()
        # A firing that does not beat a full row's k-th best, (CI, |a·‖u‖|), can never enter: drop it early.
        full = s["top_loc"][rows, k - 1] >= 0
        kth_ci = torch.where(full, s["top_ci"][rows, k - 1, w], float("-inf"))
        kth_abs = s["top_act"][rows, k - 1, w].abs()
        cand = ((ci > kth_ci) | ((ci == kth_ci) & (a.abs() > kth_abs))).nonzero().flatten()
        if not len(cand):
            return
        pos, comp, rows, ci, a = pos[cand], comp[cand], rows[cand], ci[cand], a[cand]
        aff = torch.unique(rows)
        old_i, old_slot = (s["top_loc"][aff] >= 0).nonzero(as_tuple=True)
        old_rows = aff[old_i]
        n_old = len(old_rows)
        all_rows = torch.cat([old_rows, rows])
        all_ci = torch.cat([s["top_ci"][old_rows, old_slot, w], ci])
        all_abs = torch.cat([s["top_act"][old_rows, old_slot, w].abs(), a.abs()])
        all_loc = torch.cat([s["top_loc"][old_rows, old_slot], base + pos])
        order = _lexsort([all_rows, all_ci, all_abs, all_loc], [False, True, True, False])
        rank = _group_rank(all_rows[order])
        keep = rank < k
        sel, slot = order[keep], rank[keep]
        at = torch.searchsorted(aff, all_rows[sel])  # position of each kept entry's row within `aff`
        new = {
            name: torch.full_like(s[name][aff], -1 if name == "top_loc" else 0)
            for name in ("top_loc", "top_ci", "top_act")
        }
        was_old = sel < n_old
        o, at_o, slot_o = sel[was_old], at[was_old], slot[was_old]
        for name in new:
            new[name][at_o, slot_o] = s[name][old_rows[o], old_slot[o]]
        n, at_n, slot_n = sel[~was_old] - n_old, at[~was_old], slot[~was_old]
        new["top_loc"][at_n, slot_n] = base + pos[n]
        new["top_ci"][at_n, slot_n] = _windows(g, pos[n], comp[n], T, w)
        new["top_act"][at_n, slot_n] = _windows(act, pos[n], comp[n], T, w)
        for name, value in new.items():
            s[name][aff] = value

    def _update_reservoir(self, pos: Tensor, comp: Tensor, rows: Tensor, g: Tensor, act: Tensor, base: int) -> None:
        s = self.rowed
        chosen, draw = _at_most_per_group(comp, self.per_batch, self.generator)
        for j in range(self.per_batch):
            idx = chosen[draw == j]  # one firing per subcomponent, so the rows below are distinct
            if not len(idx):
                break
            r, slot, ok = _reservoir_offer(s["res_loc"], s["res_offered"], rows[idx], base + pos[idx], self.generator)
            s["res_ci"][r, slot] = g[pos[idx[ok]], comp[idx[ok]]].float()
            s["res_act"][r, slot] = act[pos[idx[ok]], comp[idx[ok]]].float()

    def finish(self, **fields_: Any) -> Harvest:
        """The counts as a `Harvest` on the CPU, rows ordered by flat index."""
        self._coalesce()
        n = self.n_rows
        perm = torch.argsort(self.row_flat)
        cpu = {name: t[:n][perm].cpu() for name, t in self.rowed.items()}
        # Keep only the example slots some row filled: most reservoirs of a short pass stay nearly empty.
        for prefix in ("top", "res"):
            used = int((cpu[f"{prefix}_loc"] >= 0).sum(1).max()) if n else 0
            for name in (f"{prefix}_loc", f"{prefix}_ci", f"{prefix}_act"):
                cpu[name] = cpu[name][:, :used].contiguous()
        cofire = self.cofire[:n, :n][perm][:, perm].cpu()
        return Harvest(
            **fields_,
            n_tokens=self.n_tokens,
            firing_count=self.firing_count.cpu(),
            ci_sum=self.ci_sum.cpu(),
            input_total=self.input_total.cpu(),
            output_total=self.output_total.cpu(),
            input_comp=(self.in_keys // self.V).cpu(),
            input_token=(self.in_keys % self.V).cpu(),
            input_count=self.in_counts.cpu(),
            alive=self.row_flat[perm].cpu(),
            cofire=cofire,
            tokens=torch.cat(self.tokens),
            seq_starts=torch.tensor([*self.seq_starts, self.n_tokens], dtype=torch.long),
            **cpu,
        )


def _check_settings(tau_fire: float, top_k: int, window: int, reservoir: int, per_batch: int) -> None:
    if not (isinstance(tau_fire, int | float) and 0 <= tau_fire < 1):
        raise VpdError(f"`tau_fire` must be in [0, 1); got {tau_fire!r}. Pass a CI threshold such as 0.1.")
    for name, value, low in (("top_k", top_k, 1), ("window", window, 0), ("reservoir", reservoir, 1),
                             ("per_batch", per_batch, 1)):  # fmt: skip
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise VpdError(f"`{name}` must be an int >= {low}; got {value!r}.")


def _vocab_strings(tokenizer: Any, V: int) -> tuple[str, ...]:
    n = len(tokenizer)
    return tuple(tokenizer.decode([i]) if i < n else f"<{i}>" for i in range(V))


@torch.no_grad()
def harvest(
    d: Decomposition,
    token_batches: Iterable[Tensor],
    *,
    tokenizer: Any = None,
    tau_fire: float = 0.1,
    top_k: int = 20,
    window: int = 20,
    reservoir: int = 1000,
    per_batch: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> Harvest:
    """Count component statistics over `token_batches` in one pass, on the decomposition's device.

    Args:
        d: The decomposition; its CI network gives g on the clean target forward.
        token_batches: (batch, seq) integer token tensors; each row is one sequence.
        tokenizer: Decodes token ids into the strings shown in summaries, cards and labels (optional).
        tau_fire: A subcomponent fires where g > tau_fire.
        top_k: Top examples kept per subcomponent.
        window: Tokens kept either side of an example's firing token.
        reservoir: Capacity of each subcomponent's uniform reservoir of firings.
        per_batch: Firings of one subcomponent offered to its reservoir per batch, at most.
        seed: Seeds the reservoir's random choices.
        progress: Show a tqdm bar.

    Returns:
        The counts, on the CPU, with the pass's wall time (`tokens_per_s`).

    Raises:
        VpdError: A setting is out of range, a batch is not a 2-D integer tensor of valid ids, or there
            are no tokens.
    """
    from tqdm.auto import tqdm

    _check_settings(tau_fire, top_k, window, reservoir, per_batch)
    device, paths = d.model_device, list(d.module_paths)
    V = d.model.target.get_output_embeddings().weight.shape[0]
    u_norm = torch.cat([d.model.components(p).U.detach().norm(dim=1) for p in paths])
    acc = _Accumulator(sum(d.Cs.values()), V, tau=tau_fire, top_k=top_k, window=window, reservoir=reservoir,
                       per_batch=per_batch, seed=seed, device=device)  # fmt: skip
    total = len(token_batches) if hasattr(token_batches, "__len__") else None
    bar = tqdm(token_batches, total=total, desc="harvest", unit="batch", disable=not progress)
    start = time.perf_counter()
    for i, batch in enumerate(bar):
        if not isinstance(batch, Tensor) or batch.ndim != 2 or batch.is_floating_point() or batch.numel() == 0:
            got = tuple(batch.shape) if isinstance(batch, Tensor) else type(batch).__name__
            raise VpdError(f"`token_batches[{i}]` must be a non-empty (batch, seq) integer tensor; got {got}.")
        if int(batch.min()) < 0 or int(batch.max()) >= V:
            raise VpdError(f"`token_batches[{i}]` holds token ids outside [0, {V}); tokenize with the run's tokenizer.")
        tokens = batch.to(device=device, dtype=torch.long)
        out, xs = d.model.forward_with_inputs(tokens)
        g, _ = d.causal_importance(xs)
        g_all = torch.cat([g[p] for p in paths], dim=-1)
        acts = torch.cat([d.model.components(p).component_acts(xs[p]) for p in paths], dim=-1) * u_norm
        acc.update(tokens, g_all, acts, torch.softmax(out.logits.float(), dim=-1))
        bar.set_postfix(tok_s=f"{acc.n_tokens / max(time.perf_counter() - start, 1e-9):,.0f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if acc.n_tokens == 0:
        raise VpdError("`token_batches` is empty; pass at least one (batch, seq) tensor of token ids.")
    logger.info("harvest: %d tokens in %.1f s (%.0f tokens/s), %d alive", acc.n_tokens, seconds,
                acc.n_tokens / seconds, acc.n_rows)  # fmt: skip
    return acc.finish(
        module_paths=tuple(paths),
        Cs=tuple(d.Cs[p] for p in paths),
        tau_fire=float(tau_fire),
        window=window,
        top_k=top_k,
        reservoir=reservoir,
        per_batch=per_batch,
        seed=seed,
        seconds=seconds,
        vocab=_vocab_strings(tokenizer, V) if tokenizer is not None else None,
        u_norm=u_norm.float().cpu(),
    )


# ---------------------------------------------------------------------------------------------------
# Artifact

_SETTINGS = ("tau_fire", "window", "top_k", "reservoir", "per_batch", "seed", "n_tokens", "seconds")
_TENSORS = tuple(f.name for f in fields(Harvest) if f.type == "Tensor")


def _upper(n: int) -> Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu()


def save_harvest(
    h: Harvest, run_dir: str | Path, *, list_size: int = 10, n_examples: int = 3, progress: bool = False
) -> Path:
    """Write `<run_dir>/harvest/` atomically: `harvest.safetensors` and `harvest.json`; return the folder.

    Args:
        h: The harvest.
        run_dir: The run folder (or any writable folder) that receives `harvest/`.
        list_size: Tokens (and co-firing partners) per ranked list in the JSON summaries.
        n_examples: Top and random examples per subcomponent in the JSON summaries (all are in the tensors).
        progress: Show a tqdm bar over the summaries.
    """
    from tqdm.auto import tqdm

    alive = tqdm(h.alive.tolist(), desc="summaries", unit="component", disable=not progress)
    meta = {
        "format": HARVEST_FORMAT,
        "format_version": HARVEST_FORMAT_VERSION,
        **{name: getattr(h, name) for name in _SETTINGS},
        "tokens_per_s": h.tokens_per_s,
        "n_sequences": len(h.seq_starts) - 1,
        "modules": [{"path": p, "C": C} for p, C in zip(h.module_paths, h.Cs, strict=True)],
        "C_total": h.C_total,
        "alive": len(h.alive),
        "summary_settings": {"list_size": list_size, "n_examples": n_examples},
        "vocab": list(h.vocab) if h.vocab is not None else None,
        "components": {h.key(flat): h.summary(flat, list_size=list_size, n_examples=n_examples) for flat in alive},
    }

    def fill(tmp: Path) -> None:
        tensors = {name: getattr(h, name).contiguous() for name in _TENSORS}
        # Co-firing is symmetric: store its upper triangle (diagonal included), row-major.
        tensors["cofire"] = h.cofire[_upper(len(h.alive))]
        assert h.n_tokens < 2**31, f"{h.n_tokens} tokens overflow the int32 token index"
        for name in ("top_loc", "res_loc"):
            tensors[name] = tensors[name].to(torch.int32)
        save_file(
            tensors,
            tmp / HARVEST_TENSORS,
            metadata={"format": HARVEST_FORMAT, "format_version": str(HARVEST_FORMAT_VERSION)},
        )
        # Compact separators: with indentation the per-component windows would triple the file.
        atomic_write_text(tmp / HARVEST_META, json.dumps(meta, separators=(",", ":")) + "\n")

    return atomic_write_dir(Path(run_dir) / HARVEST_DIR, fill)


def load_harvest(path: str | Path) -> Harvest:
    """Read a harvest from a run folder (holding `harvest/`) or from the harvest folder itself.

    Raises:
        VpdError: There is no harvest there (run `vpd harvest` first).
        ArtifactFormatError: Its format version is one this release cannot read.
    """
    meta_path = harvest_meta_path(path)
    if meta_path is None:
        raise VpdError(f"No harvest in {str(path)!r}; run `vpd harvest --run RUN` first (or pass `--harvest DIR`).")
    meta = read_harvest_meta(meta_path)
    tensor_path = meta_path.parent / HARVEST_TENSORS
    if not tensor_path.is_file():
        raise ArtifactFormatError(f"{meta_path.parent} lacks {HARVEST_TENSORS}; run `vpd harvest` again.")
    tensors = load_file(tensor_path)
    missing = [name for name in _TENSORS if name not in tensors]
    if missing:
        raise ArtifactFormatError(f"{tensor_path} lacks tensors {', '.join(missing[:5])}; run `vpd harvest` again.")
    n_alive = len(tensors["alive"])
    cofire = torch.zeros(n_alive, n_alive, dtype=tensors["cofire"].dtype)
    upper = _upper(n_alive)
    cofire[upper] = tensors["cofire"]
    tensors["cofire"] = torch.where(upper, cofire, cofire.T)
    for name in ("top_loc", "res_loc"):
        tensors[name] = tensors[name].long()
    return Harvest(
        module_paths=tuple(m["path"] for m in meta["modules"]),
        Cs=tuple(int(m["C"]) for m in meta["modules"]),
        vocab=tuple(meta["vocab"]) if meta.get("vocab") is not None else None,
        **{name: meta[name] for name in _SETTINGS},
        **{name: tensors[name] for name in _TENSORS},
    )
