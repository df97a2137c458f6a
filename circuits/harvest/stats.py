"""What a harvest pass found, per subcomponent: the result type of `circuits.harvest.harvest` and its queries.

Formulas are in the `circuits.harvest.collect` docstring (docs/attribution-graphs.md §10); this module only reads
counts.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from attrgraph.labels import component_key, summary_label
from decomposer.errors import VpdError


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
        self,
        flat: int,
        *,
        list_size: int = 10,
        n_examples: int = 3,
        min_count: int = 2,
        min_share: float = 0.01,
        text: bool = False,
    ) -> dict[str, Any]:
        """A JSON-ready summary of one subcomponent: rates, ranked token lists, partners, examples, label.

        Lists: `input` (by recall), `input_pmi` (by PMI among tokens with at least `min_count` firings),
        `input_precision` (by precision, P(fires | token), among tokens with at least `min_count` firings
        that make up at least `min_share` of them, so that one-off rare tokens do not top it),
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
        sel = ((inp.count >= min_count) & (inp.recall >= min_share)).nonzero().flatten()
        out["input_precision"] = self._token_list(inp, sel[_top(inp.precision[sel], list_size, True)])
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
