"""The streamed state of a harvest pass: counts, co-firing, top examples and reservoirs, grown row by row.

Rows belong to subcomponents that have fired, in order of first firing; `finish` reorders them by flat index
and returns a `Harvest` (memory layout in the `circuits.harvest.collect` docstring).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from circuits.harvest.stats import Harvest

_COALESCE_EVERY = 1 << 22  # pending sparse (subcomponent, token) pairs before they are merged
_MIN_ROW_GROWTH = 64  # rows added at least when the per-row state grows (it grows by half otherwise)


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

    def __init__(
        self,
        C_total: int,
        V: int,
        *,
        tau: float,
        top_k: int,
        window: int,
        reservoir: int,
        per_batch: int,
        seed: int,
        device: torch.device,
    ) -> None:
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
