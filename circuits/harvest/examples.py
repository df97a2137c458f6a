"""The compact examples artifact (`attrgraph.examples`) cut from a full harvest, plus the logit lens of each write.

`examples_from_harvest(h, d)` keeps, per alive subcomponent, what a reader looks at: the top contexts (token
windows with CI per token), the ranked token lists, the co-firing partners, the whole words its firing token sits
in (read off the uniform reservoir of firings, so frequent words are not crowded out by the top-CI ones), and,
for matrices that write the residual stream (o and down), the tokens its output direction u_c promotes and
suppresses through the final norm's scale and the unembedding. The offline label comes from all of it
(`attrgraph.labels.card_label`).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from attrgraph.examples import ComponentExamples
from attrgraph.labels import card_label
from attrgraph.nodes import ComponentKey
from circuits.harvest.stats import Harvest
from decomposer.errors import VpdError

RESIDUAL_WRITERS = ("o", "down")  # matrix roles whose output is added to the residual stream
_WORD_SAMPLE = 200  # reservoir firings read per subcomponent for its words
_MAX_WORD = 24  # characters of a word kept


def _padded(rows: list[list[int]], width: int, dtype: torch.dtype) -> Tensor:
    out = torch.full((len(rows), width), -1, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=dtype)
    return out


def _scores(rows: list[list[float]], width: int) -> Tensor:
    out = torch.full((len(rows), width), float("nan"), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=torch.float32)
    return out.half()


def _positions(h: Harvest, loc: Tensor) -> Tensor:
    """The position of each token index inside its harvested sequence (−1 stays −1)."""
    starts = h.seq_starts.long()
    seq = (torch.searchsorted(starts, loc.clamp(min=0), right=True) - 1).clamp(min=0, max=len(starts) - 2)
    return torch.where(loc >= 0, loc - starts[seq], -1)


def _choose_contexts(h: Harvest, n_contexts: int, min_pos: int) -> tuple[Tensor, Tensor, Tensor]:
    """(token index, source, slot) of each row's contexts: top-CI firings first, then the reservoir's by CI.

    Harvested sequences are windows cut from running text, so a window's first tokens are read without the
    text before them: an unusual state in which many subcomponents fire at full CI, whatever the token. Such
    firings (position < `min_pos`) go last, so a reader sees contexts the model read as it reads text; they
    remain where a subcomponent has nothing else. Source 0 is a top example (its slot in `top_*`), 1 a
    reservoir firing (its slot in `res_*`).
    """
    n = len(h.alive)
    top_pos, res_pos = _positions(h, h.top_loc), _positions(h, h.res_loc)
    res_ci = torch.where(h.res_loc >= 0, h.res_ci.float(), -1.0)
    res_order = torch.sort(res_ci, dim=1, descending=True, stable=True).indices[:, : 4 * n_contexts]
    locs = torch.full((n, n_contexts), -1, dtype=torch.long)
    source = torch.zeros((n, n_contexts), dtype=torch.long)
    slots = torch.zeros((n, n_contexts), dtype=torch.long)
    top_loc, res_loc = h.top_loc.tolist(), h.res_loc.tolist()
    top_pos, res_pos, res_order = top_pos.tolist(), res_pos.tolist(), res_order.tolist()
    for row in range(n):
        candidates = [(top_pos[row][j] < min_pos, 0, j, loc) for j, loc in enumerate(top_loc[row]) if loc >= 0]
        seen = {c[3] for c in candidates}
        for j in res_order[row]:
            loc = res_loc[row][j]
            if loc >= 0 and loc not in seen:
                candidates.append((res_pos[row][j] < min_pos, 1, j, loc))
                seen.add(loc)
        candidates.sort(key=lambda c: c[0])  # stable: top examples keep their CI order, then the reservoir's
        for i, (_, src, slot, loc) in enumerate(candidates[:n_contexts]):
            locs[row, i], source[row, i], slots[row, i] = loc, src, slot
    return locs, source, slots


def _contexts(
    h: Harvest, n_contexts: int, window: int, id_dtype: torch.dtype, min_pos: int = 2
) -> tuple[Tensor, Tensor]:
    """(token ids, CI × 255 as uint8) of each alive row's contexts, the firing token at index `window`.

    A top example carries its CI at every token of the window; a reservoir firing only at the firing token.
    """
    loc, source, slot = _choose_contexts(h, n_contexts, min_pos)
    offsets = torch.arange(-window, window + 1)
    idx = loc[..., None] + offsets
    starts = h.seq_starts.long()
    seq = (torch.searchsorted(starts, loc.clamp(min=0), right=True) - 1).clamp(min=0, max=len(starts) - 2)
    lo, hi = starts[seq][..., None], starts[seq + 1][..., None]
    valid = (loc[..., None] >= 0) & (idx >= lo) & (idx < hi)
    tokens = torch.where(valid, h.tokens.long()[idx.clamp(0, h.n_tokens - 1)], -1).to(id_dtype)
    rows = torch.arange(len(h.alive))[:, None]
    top_ci = h.top_ci[rows, slot.clamp(max=h.top_ci.shape[1] - 1), h.window - window : h.window + window + 1].float()
    res_ci = torch.zeros_like(top_ci)
    res_ci[..., window] = h.res_ci[rows, slot.clamp(max=h.res_ci.shape[1] - 1)].float()
    ci = torch.where((source == 0)[..., None], top_ci, res_ci)
    ci = torch.where(valid, ci, 0.0).clamp(0, 1)
    return tokens, (ci * 255).round().to(torch.uint8)


def _word_bounds(h: Harvest) -> tuple[Tensor, Tensor]:
    """For every harvested position, where the whole word holding it starts and ends (exclusive)."""
    vocab = h.vocab or ()
    # A token opens a word when it starts with whitespace or is not a letter or digit, as byte-level BPE writes them.
    opens = torch.tensor([not s[:1].isalnum() for s in vocab] or [True], dtype=torch.bool)
    tokens = h.tokens.long()
    is_open = opens[tokens.clamp(max=len(opens) - 1)].clone()
    positions = torch.arange(h.n_tokens)
    is_open[h.seq_starts[:-1].long()] = True
    word_start = torch.cummax(torch.where(is_open, positions, 0), 0).values
    # The next opening position after each token, or its sequence's end.
    next_open = torch.full((h.n_tokens + 1,), h.n_tokens, dtype=torch.long)
    seq_end = h.seq_starts.long()[torch.searchsorted(h.seq_starts.long(), positions, right=True)]
    marks = torch.where(is_open, positions, h.n_tokens)
    shifted = torch.cat([marks[1:], torch.tensor([h.n_tokens])])
    next_open[:-1] = torch.flip(torch.cummin(torch.flip(shifted, [0]), 0).values, [0])
    return word_start, torch.minimum(next_open[:-1], seq_end)


def _words(h: Harvest, top: int = 5, min_share: float = 0.05) -> dict[str, list[list[Any]]]:
    """Key → [[word, share of sampled firings]] for the whole words the firing token sits in."""
    if not h.vocab:
        return {}
    start, end = (t.tolist() for t in _word_bounds(h))
    tokens = h.tokens.tolist()
    cache: dict[tuple[int, int], str] = {}
    out = {}
    locs = h.res_loc[:, :_WORD_SAMPLE].tolist()
    for row, flat in enumerate(h.alive.tolist()):
        counts: Counter[str] = Counter()
        sampled = [loc for loc in locs[row] if loc >= 0]
        for loc in sampled:
            span = (start[loc], end[loc])
            word = cache.get(span)
            if word is None:
                word = "".join(h.vocab[t] for t in tokens[span[0] : span[1]]).strip()[:_MAX_WORD]
                cache[span] = word
            if word:
                counts[word] += 1
        if sampled:
            shares = [(w, n / len(sampled)) for w, n in counts.most_common(top)]
            kept = [[w, round(share, 3)] for w, share in shares if share >= min_share]
            if kept:
                out[h.key(flat)] = kept
    return out


def _input_lists(h: Harvest, list_size: int, min_count: int = 2) -> tuple[list, list, list]:
    """Per alive row: the tokens it fires on, ranked by the harmonic mean of precision and recall.

    Precision alone ranks a token seen twice and fired on twice above the token that makes up most of the
    firings; recall alone ranks ' the' first everywhere. Their harmonic mean names what is both frequent among
    the firings and specific to them. Tokens with fewer than `min_count` firings are left out where others exist.
    """
    ids, precision, recall = [], [], []
    for flat in h.alive.tolist():
        s = h.input_stats(flat)
        sel = (s.count >= min_count).nonzero().flatten()
        if not len(sel):
            sel = torch.arange(len(s.token))
        p, r = s.precision[sel], s.recall[sel]
        order = torch.sort(2 * p * r / (p + r), descending=True, stable=True).indices[:list_size]
        sel = sel[order]
        ids.append(s.token[sel].tolist())
        precision.append(s.precision[sel].tolist())
        recall.append(s.recall[sel].tolist())
    return ids, precision, recall


def _output_lists(h: Harvest, list_size: int, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(top ids, top PMI, bottom ids, bottom PMI) of next-token PMI, as `Harvest.summary` ranks them."""
    V, N = h.vocab_size, h.n_tokens
    total = h.output_total.double()
    common = (total / N >= 1 / V) & (total > 0)
    tops, top_pmi, bottoms, bottom_pmi = [], [], [], []
    for lo in range(0, len(h.alive), chunk):
        mass = h.output_mass[lo : lo + chunk].double()
        F = h.firing_count[h.alive[lo : lo + chunk]].double()[:, None]
        pmi = torch.log(mass * N / (F * total))
        ok = (mass > 0) & (total > 0)
        k = min(list_size, V)
        # A next token counts when the model gives it at least 0.5% on average at the firings (or 1/V if larger):
        # below that, PMI ranks tokens the model barely predicts anywhere.
        top = torch.where(ok & (mass / F >= max(1 / V, 0.005)), pmi, -math.inf).topk(k, dim=1)
        bottom = torch.where(ok & common, pmi, math.inf).topk(k, dim=1, largest=False)
        tops.append(torch.where(torch.isfinite(top.values), top.indices, -1))
        top_pmi.append(top.values)
        bottoms.append(torch.where(torch.isfinite(bottom.values), bottom.indices, -1))
        bottom_pmi.append(bottom.values)
    cat = torch.cat
    return cat(tops), cat(top_pmi).float(), cat(bottoms), cat(bottom_pmi).float()


def _final_norm_scale(model: torch.nn.Module) -> Tensor | None:
    """The elementwise scale of the norm before the unembedding (the last norm outside the blocks), if any."""
    found = None
    for name, module in model.named_modules():
        if "norm" in type(module).__name__.lower() and not any(part.isdigit() for part in name.split(".")):
            found = getattr(module, "weight", None)
    return found.detach().float() if isinstance(found, Tensor) else None


@torch.no_grad()
def logit_lens(d: Any, list_size: int) -> dict[str, tuple[list, list, list, list]]:
    """Key → (promoted ids, logits, suppressed ids, logits) of each residual-writing subcomponent's u_c.

    The direction goes through the final norm's scale (its normalisation only rescales a single direction)
    and the unembedding; logits are centred over the vocabulary, so they read as relative promotion.
    """
    target = d.model.target
    W_U = target.get_output_embeddings().weight.detach().float().cpu()
    scale = _final_norm_scale(target)
    out = {}
    for path in d.module_paths:
        role = ComponentKey.of(path, 0).matrix.rsplit(".", 1)[-1]
        if role not in RESIDUAL_WRITERS:
            continue
        U = d.model.components(path).U.detach().float().cpu()  # (C, d_model)
        if scale is not None and scale.shape[0] == U.shape[1]:
            U = U * scale.cpu()
        logits = U @ W_U.T
        logits = logits - logits.mean(dim=1, keepdim=True)
        top = logits.topk(list_size, dim=1)
        bottom = logits.topk(list_size, dim=1, largest=False)
        for c in range(U.shape[0]):
            out[str(ComponentKey.of(path, c))] = (
                top.indices[c].tolist(),
                top.values[c].tolist(),
                bottom.indices[c].tolist(),
                bottom.values[c].tolist(),
            )
    return out


def _cofiring(h: Harvest, n_partners: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(partner rows, Jaccard) of each alive row's best co-firing partners; chunked so memory stays linear."""
    F = h.firing_count[h.alive].double()
    rows, jac = [], []
    for lo in range(0, len(h.alive), chunk):
        c = h.cofire[lo : lo + chunk].double()
        j = c / (F[lo : lo + chunk, None] + F[None, :] - c)
        j[torch.arange(len(c)), torch.arange(lo, lo + len(c))] = 0.0  # not its own partner
        j = torch.where(c > 0, j, 0.0)
        best = j.topk(min(n_partners, j.shape[1]), dim=1)
        rows.append(torch.where(best.values > 0, best.indices, -1).int())
        jac.append(best.values.float())
    return torch.cat(rows), torch.cat(jac).half()


def examples_from_harvest(
    h: Harvest,
    d: Any = None,
    *,
    n_contexts: int = 10,
    window: int = 10,
    list_size: int = 8,
    n_partners: int = 8,
    made: dict[str, Any] | None = None,
) -> ComponentExamples:
    """The examples artifact of a harvest; with the decomposition `d`, also the logit lens of each write.

    Args:
        h: The harvest (its vocabulary is needed for words and labels).
        d: The run's `Decomposition`, for the logit lens of o and down subcomponents (optional).
        n_contexts: Top contexts kept per subcomponent (at most the harvest's `top_k`).
        window: Tokens either side of the firing token (the harvest's window if that is smaller).
        list_size: Tokens per ranked list.
        n_partners: Co-firing partners kept.
        made: Extra fields recorded under `made` (e.g. the command that made it).
    """
    if h.vocab is None:
        raise VpdError("The harvest has no vocabulary; harvest with the run's tokenizer to write examples.")
    window = min(window, h.window)
    id_dtype = torch.int16 if h.vocab_size <= 2**15 else torch.int32
    keys = tuple(h.key(flat) for flat in h.alive.tolist())
    tokens, ci = _contexts(h, n_contexts, window, id_dtype)
    in_ids, in_precision, in_recall = _input_lists(h, list_size)
    out_ids, out_pmi, bottom_ids, bottom_pmi = _output_lists(h, list_size)
    lens = logit_lens(d, list_size) if d is not None else {}
    empty: tuple[list, list, list, list] = ([], [], [], [])
    lens_rows = [lens.get(k, empty) for k in keys]
    partners, jaccard = _cofiring(h, n_partners)
    tensors = {
        "density": h.density[h.alive].float(),
        "mean_ci": h.mean_ci[h.alive].float(),
        "firing_count": h.firing_count[h.alive].long(),
        "context_tokens": tokens,
        "context_ci": ci,
        "input_tokens": _padded(in_ids, list_size, id_dtype),
        "input_precision": _scores(in_precision, list_size),
        "input_recall": _scores(in_recall, list_size),
        "output_tokens": out_ids.to(id_dtype),
        "output_pmi": out_pmi.half(),
        "output_bottom_tokens": bottom_ids.to(id_dtype),
        "output_bottom_pmi": bottom_pmi.half(),
        "promote_tokens": _padded([r[0] for r in lens_rows], list_size, id_dtype),
        "promote_logit": _scores([r[1] for r in lens_rows], list_size),
        "suppress_tokens": _padded([r[2] for r in lens_rows], list_size, id_dtype),
        "suppress_logit": _scores([r[3] for r in lens_rows], list_size),
        "cofire_rows": partners,
        "cofire_jaccard": jaccard,
    }
    info = {
        "n_tokens": h.n_tokens,
        "n_sequences": len(h.seq_starts) - 1,
        "tau_fire": h.tau_fire,
        "C_total": h.C_total,
        "contexts": (
            f"{n_contexts} per subcomponent, ±{window} tokens: the top firings by CI (ties by |a·‖u_c‖|), then "
            "uniformly sampled firings by CI; firings at a harvested window's first two tokens last"
        ),
        "words": f"from up to {_WORD_SAMPLE} uniformly sampled firings",
        "logit_lens": bool(lens),
        **(made or {}),
    }
    ex = ComponentExamples(
        keys=keys, vocab=tuple(h.vocab), window=window, made=info, words=_words(h), labels={}, tensors=tensors
    )
    labels = {}
    for key in keys:
        card = ex.card(key, n_contexts=0)
        assert card is not None
        labels[key] = card_label(card)
    ex.labels.update(labels)
    return ex
