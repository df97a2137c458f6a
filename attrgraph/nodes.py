"""Typed node identity for attribution graphs, its canonical string form, labels and grid rows.

Canonical ids (docs/attribution-graphs.md §8), one per node kind:

| kind    | string form              | example                                      |
|---------|--------------------------|----------------------------------------------|
| `comp`  | `comp/{module}/{c}@{t}`  | `comp/model.layers.3.self_attn.o_proj/281@2` |
| `emb`   | `emb@{t}`                | `emb@0`                                      |
| `logit` | `logit/{token_id}@{t}`   | `logit/1234@5`                               |
| `delta` | `delta/{module}@{t}`     | `delta/transformer.h.1.mlp.c_fc@3`           |

`NodeId.parse(str(n)) == n` holds for every valid node. Module paths may contain dots but never
'/' or '@', which is what makes the string form unambiguous. Integers are written in decimal
without leading zeros, and `parse` rejects leading zeros so that the inverse is exact.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from decomposer.architectures import matrix_role
from decomposer.errors import VpdError

NodeKind = Literal["comp", "emb", "logit", "delta"]
# The node kinds, in the order a graph's node table holds them: embeddings, subcomponents, deltas, logits.
# `EdgeTable.kind` and the full-graph artifact store indices into this tuple.
KINDS: tuple[str, ...] = ("emb", "comp", "delta", "logit")

_INT = r"(0|[1-9][0-9]*)"
_MODULE = r"([^/@]+)"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "comp": re.compile(rf"comp/{_MODULE}/{_INT}@{_INT}"),
    "emb": re.compile(rf"emb@{_INT}"),
    "logit": re.compile(rf"logit/{_INT}@{_INT}"),
    "delta": re.compile(rf"delta/{_MODULE}@{_INT}"),
}
_FORMS = "comp/{module}/{c}@{t}, emb@{t}, logit/{token_id}@{t} or delta/{module}@{t}"


def _check_int(name: str, value: object, kind: str) -> None:
    # bool is an int subclass; True as a position is always a bug upstream.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise VpdError(f"`{name}` of a {kind} node must be an int >= 0; got {value!r}.")


@dataclass(frozen=True, order=True)
class NodeId:
    """One node of an attribution graph.

    Ordering compares `(kind, pos, module, index)`; within one kind the same fields are set, so any
    list of valid nodes sorts without comparing None to a value.

    Attributes:
        kind: "comp" (a subcomponent), "emb" (an embedding), "logit" or "delta" (a weight delta).
        pos: The token position t, >= 0.
        module: The HF module path for comp and delta nodes; None otherwise.
        index: The subcomponent index c for comp nodes, the token id for logit nodes; None otherwise.

    Raises:
        VpdError: If the fields do not form a valid node of `kind` (see the constructors).
    """

    kind: NodeKind
    pos: int
    module: str | None = None
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise VpdError(f"`kind` must be one of {', '.join(KINDS)}; got {self.kind!r}.")
        _check_int("pos", self.pos, self.kind)
        if self.kind in ("comp", "delta"):
            if not isinstance(self.module, str) or not self.module or "/" in self.module or "@" in self.module:
                raise VpdError(
                    f"`module` of a {self.kind} node must be a non-empty module path without '/' or '@'; "
                    f"got {self.module!r}."
                )
        elif self.module is not None:
            raise VpdError(f"`module` must be None for a {self.kind} node; got {self.module!r}.")
        if self.kind in ("comp", "logit"):
            _check_int("index", self.index, self.kind)
        elif self.index is not None:
            raise VpdError(f"`index` must be None for a {self.kind} node; got {self.index!r}.")

    @classmethod
    def comp(cls, module: str, c: int, t: int) -> NodeId:
        """Subcomponent `c` of the matrix at `module`, at position `t`."""
        return cls("comp", t, module, c)

    @classmethod
    def emb(cls, t: int) -> NodeId:
        """The embedding at position `t`."""
        return cls("emb", t)

    @classmethod
    def logit(cls, token_id: int, t: int) -> NodeId:
        """The logit of `token_id` at position `t`."""
        return cls("logit", t, None, token_id)

    @classmethod
    def delta(cls, module: str, t: int) -> NodeId:
        """The weight delta of the matrix at `module`, at position `t`."""
        return cls("delta", t, module)

    def __str__(self) -> str:
        if self.kind == "comp":
            return f"comp/{self.module}/{self.index}@{self.pos}"
        if self.kind == "emb":
            return f"emb@{self.pos}"
        if self.kind == "logit":
            return f"logit/{self.index}@{self.pos}"
        return f"delta/{self.module}@{self.pos}"

    @classmethod
    def parse(cls, s: str) -> NodeId:
        """Read a canonical id; the exact inverse of `str`.

        Args:
            s: A string such as `comp/model.layers.3.self_attn.o_proj/281@2`.

        Returns:
            The node that `s` names.

        Raises:
            VpdError: If `s` is not in one of the four canonical forms.
        """
        if isinstance(s, str):
            kind = s.split("/", 1)[0].split("@", 1)[0]
            pattern = _PATTERNS.get(kind)
            match = pattern.fullmatch(s) if pattern is not None else None
            if match is not None:
                groups = match.groups()
                if kind == "comp":
                    return cls.comp(groups[0], int(groups[1]), int(groups[2]))
                if kind == "emb":
                    return cls.emb(int(groups[0]))
                if kind == "logit":
                    return cls.logit(int(groups[0]), int(groups[1]))
                return cls.delta(groups[0], int(groups[1]))
        raise VpdError(f"Node id {s!r} is not a canonical id; expected one of {_FORMS}.")


def module_short_name(module: str) -> tuple[int, str, str]:
    """Map an HF module path to (block, "attn" | "mlp", short name), through the architecture registry.

    Short names are the matrix roles q, k, v, qkv, o, gate, up, gate_up and down, e.g.
    `model.layers.3.self_attn.q_proj` → (3, "attn", "q"), `transformer.h.1.mlp.c_fc` → (1, "mlp", "up") and
    `gpt_neox.layers.0.attention.query_key_value` → (0, "attn", "qkv").

    Raises:
        VpdError: If `module` is not an attention or MLP matrix of a supported family.
    """
    return matrix_role(module)


def short_label(node: NodeId) -> str:
    """The display label of `node`, in the paper's short form for subcomponents.

    - comp: its `ComponentKey`, `{block}.{sublayer}.{short}:{c}@{t}`, e.g. `3.attn.o:281@2` (the paper writes
      `3.attn.o:2:281`; one form for labels and input keeps a label usable as `vpd ablate --nodes`);
    - delta: `{block}.{sublayer}.{short}:delta@{t}`, e.g. `3.attn.o:delta@2`;
    - emb: `emb:{t}`, e.g. `emb:0`;
    - logit: `logit:{token_id}@{t}`, e.g. `logit:1234@5`.

    `sublayer` is attn or mlp and `short` one of q, k, v, qkv, o, gate, up, gate_up, down.

    Raises:
        VpdError: If a comp or delta node's module is not recognised by `module_short_name`.
    """
    if node.kind == "emb":
        return f"emb:{node.pos}"
    if node.kind == "logit":
        return f"logit:{node.index}@{node.pos}"
    assert node.module is not None, f"{node.kind} node without a module: {node!r}"
    matrix = ".".join(map(str, module_short_name(node.module)))
    if node.kind == "comp":
        assert node.index is not None, f"comp node without an index: {node!r}"
        return str(ComponentKey(matrix, node.index, node.pos))
    return f"{matrix}:delta@{node.pos}"


# Rendering grid rows within one block, bottom to top. Short names in one tuple share a row: the
# q, k, v (or fused qkv) reads happen in parallel, as do gate and up.
ROW_ORDER: tuple[tuple[str, ...], ...] = (("q", "k", "v", "qkv"), ("o",), ("gate", "up", "gate_up"), ("down",))
ROWS_PER_BLOCK = len(ROW_ORDER)
_ROW_OF_SHORT = {short: i for i, shorts in enumerate(ROW_ORDER) for short in shorts}
# The same order one matrix a row (the explorer's matrix rows): q, k, v, qkv, o, gate, up, gate_up, down.
SUBLAYER_ORDER = {short: i for i, short in enumerate(short for shorts in ROW_ORDER for short in shorts)}
# The part of the block each matrix belongs to: the first two rows are attention, the last two the MLP.
SUBLAYER_PART = {short: "attn" if _ROW_OF_SHORT[short] < 2 else "mlp" for short in SUBLAYER_ORDER}


def node_row(node: NodeId, *, n_blocks: int | None = None) -> int:
    """The row of `node` on the rendering grid (row 0 at the bottom).

    Row 0 holds the embeddings. Block b occupies rows 1 + 4b … 4 + 4b in `ROW_ORDER`:
    q/k/v/qkv, then o, then gate/up, then down. A delta node sits on the row of its matrix. Logits
    sit on the top row, 1 + 4·n_blocks, which is why they need `n_blocks`.

    Args:
        node: The node to place.
        n_blocks: Number of transformer blocks; required for logit nodes only.

    Raises:
        VpdError: If `node` is a logit and `n_blocks` is missing or negative, or if a comp or delta
            node's module is not recognised by `module_short_name`.
    """
    if node.kind == "emb":
        return 0
    if node.kind == "logit":
        if not isinstance(n_blocks, int) or isinstance(n_blocks, bool) or n_blocks < 0:
            raise VpdError(
                f"`n_blocks` must be an int >= 0 to place logit node {node}; got {n_blocks!r}. "
                "Pass the model's number of blocks."
            )
        return 1 + ROWS_PER_BLOCK * n_blocks
    assert node.module is not None, f"{node.kind} node without a module: {node!r}"
    block, _, short = module_short_name(node.module)
    return 1 + ROWS_PER_BLOCK * block + _ROW_OF_SHORT[short]


_KEY = re.compile(rf"(?P<matrix>[^/@:\s]+):(?P<c>{_INT})(?:@(?P<t>{_INT}))?")
# The display form of earlier releases, position before index: `2.mlp.down:3:17` (t = 3, c = 17).
_OLD_LABEL_FORM = re.compile(r"(?P<matrix>[^/@:\s]+):(?P<t>[0-9]+):(?P<c>[0-9]+)")
_KEY_FORMS = "block.part.matrix:c or block.part.matrix:c@t, e.g. 2.mlp.down:17 or 2.mlp.down:17@3"


@dataclass(frozen=True, order=True)
class ComponentKey:
    """A subcomponent, at every position or at one: `{block}.{part}.{matrix}:{c}` or `{block}.{part}.{matrix}:{c}@{t}`.

    The one string form of a subcomponent: harvest statistics, label files, `vpd ablate --nodes`,
    `vpd edit --component` and graph labels all use it, and `ComponentKey.parse(str(k)) == k`.

    Attributes:
        matrix: The short matrix name (`2.mlp.down`, see `module_short_name`); for a module outside the
            architecture registry, or when given so, its module path.
        index: The subcomponent index c, >= 0.
        pos: The token position t, or None for every position.
    """

    matrix: str
    index: int
    pos: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.matrix, str) or not re.fullmatch(r"[^/@:\s]+", self.matrix):
            raise VpdError(
                f"`matrix` of a component key must be a name without '/', '@', ':' or spaces; got {self.matrix!r}."
            )
        for name, value in (("index", self.index), ("pos", self.pos)):
            if (value is not None or name == "index") and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise VpdError(f"`{name}` of a component key must be an int >= 0; got {value!r}.")

    @classmethod
    def of(cls, module: str, c: int, pos: int | None = None) -> ComponentKey:
        """The key of subcomponent `c` of the matrix at `module` (its short name when the registry knows it)."""
        try:
            matrix = ".".join(map(str, module_short_name(module)))
        except VpdError:
            matrix = module
        return cls(matrix, c, pos)

    def __str__(self) -> str:
        return f"{self.matrix}:{self.index}" + ("" if self.pos is None else f"@{self.pos}")

    @classmethod
    def parse(cls, s: str, *, subject: str | None = None) -> ComponentKey:
        """Read a key; the exact inverse of `str`.

        Args:
            s: The key, e.g. `2.mlp.down:17` or `2.mlp.down:17@3`.
            subject: How error messages name the input (default: Component key '...').

        Raises:
            VpdError: `s` is not a key, naming the form to use (the old `block.part.matrix:t:c` form included).
        """
        subject = subject or f"Component key {s!r}"
        text = s.strip() if isinstance(s, str) else ""
        match = _KEY.fullmatch(text)
        if match is not None:
            return cls(match["matrix"], int(match["c"]), None if match["t"] is None else int(match["t"]))
        old = _OLD_LABEL_FORM.fullmatch(text)
        if old is not None:
            raise VpdError(
                f"{subject} puts the position before the index, a form no longer read; "
                f"write {old['matrix']}:{int(old['c'])}@{int(old['t'])} (index c, then @position t)."
            )
        raise VpdError(f"{subject} is not a subcomponent key; write {_KEY_FORMS}.")

    def resolve(self, Cs: Mapping[str, int], *, subject: str | None = None) -> str:
        """The module path this key names among the decomposed matrices `Cs` (path → C, e.g. `d.Cs`).

        Raises:
            VpdError: The key names no decomposed matrix, or its index is ≥ C.
        """
        subject = subject or f"Component key {str(self)!r}"
        by_short = {ComponentKey.of(path, 0).matrix: path for path in Cs}
        path = self.matrix if self.matrix in Cs else by_short.get(self.matrix)
        if path is None:
            near = difflib.get_close_matches(self.matrix, list(by_short), n=5, cutoff=0.0)
            raise VpdError(f"{subject} names no decomposed matrix; use one of {', '.join(near)} with `:c`.")
        if self.index >= Cs[path]:
            raise VpdError(
                f"{subject} has index {self.index}, but {ComponentKey.of(path, 0).matrix} has C={Cs[path]}; "
                f"use an index in 0..{Cs[path] - 1}."
            )
        return path


def resolve_component(Cs: Mapping[str, int], key: str, *, argument: str = "component") -> tuple[str, int]:
    """(module path, c) of a key without a position, such as `2.mlp.down:17` or `model.layers.2.mlp.down_proj:17`.

    Args:
        Cs: The decomposed matrices, path → C (`d.Cs`).
        key: The key to resolve.
        argument: The argument name used in error messages.

    Raises:
        VpdError: The key is malformed or has a position, names no decomposed matrix, or c ≥ C.
    """
    subject = f"`{argument}` {key!r}"
    parsed = ComponentKey.parse(key, subject=subject)
    if parsed.pos is not None:
        raise VpdError(
            f"{subject} names one position, but `{argument}` acts at every one; write {parsed.matrix}:{parsed.index}."
        )
    return parsed.resolve(Cs, subject=subject), parsed.index
