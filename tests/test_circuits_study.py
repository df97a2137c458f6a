"""Scripted studies: the prompts format, the study table, its CSV, and `vpd study`."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from attrgraph.nodes import NodeId, module_short_name
from circuits.cli import main
from circuits.study import COLUMNS, load_study, parse_prompts, run_study, save_study, study_prompt
from decomposer.errors import VpdError
from tests.conftest import STUDY_FAST as FAST
from tests.conftest import STUDY_MODULES as MODULES
from tests.conftest import STUDY_VOCAB as VOCAB
from tests.conftest import STUDY_WORDS as WORDS
from tests.conftest import float64_decomposition, tiny_llama, word_tokenizer


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    return float64_decomposition(tiny_llama(vocab=VOCAB), MODULES), word_tokenizer()


PROMPTS_FILE = """\
# Minimal pairs first.
# pair
the princess lost\t her
the prince lost\t his

the king said that
"""


def test_parse_prompts_format():
    spec = parse_prompts(PROMPTS_FILE)
    assert spec.prompts == ["the princess lost", "the prince lost", "the king said that"]
    assert spec.targets == [" her", " his", None] and spec.pairs == [(0, 1)]
    spec = parse_prompts("a b  \t NA\n# pair\nx\n\n# a comment\ny\nz\n")
    assert spec.prompts == ["a b", "x", "y", "z"] and spec.targets == [" NA", None, None, None]
    assert spec.pairs == [(1, 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no prompts"),
        ("# only a comment\n\n", "holds no prompts"),
        ("a\tb\tc\n", "more than one tab"),
        ("a\t\n", "no target after it"),
        ("\tb\n", "empty prompt"),
        ("# pair\na\n", "ends inside a `# pair`"),
        ("# pair\na\n# pair\nb\nc\n", "before the previous one has two prompts"),
    ],
)
def test_parse_prompts_errors(text, message):
    with pytest.raises(VpdError, match=message):
        parse_prompts(text)


def _keys(G) -> set[str]:
    """Component keys straight from the node ids, independent of `circuits.study.component_keys`."""
    out = set()
    for n in G:
        node = NodeId.parse(n)
        if node.kind == "comp":
            block, part, short = module_short_name(node.module)
            out.add(f"{block}.{part}.{short}:{node.index}")
    return out


def test_study_table(setup, tmp_path):
    d, tok = setup
    spec = parse_prompts(PROMPTS_FILE)
    table = run_study(d, tok, spec.prompts, targets=spec.targets, pairs=spec.pairs, out=tmp_path, **FAST)
    assert tuple(table.columns) == COLUMNS
    assert len(table) == 3 * 3
    assert list(table["graph_type"]) == ["ci", "adversarial", "network"] * 3
    assert list(table["prompt"]) == [p for p in spec.prompts for _ in range(3)]
    assert list(table["target"])[:6] == ["her"] * 3 + ["his"] * 3 and (table["target_pos"][:6] == 2).all()
    assert list(table["pair_id"]) == [0] * 6 + [pd.NA] * 3
    assert table["shared_nodes"][6:].isna().all()
    for column in ("p_target", "p_ci", "p_stochastic", "p_adversarial"):
        assert ((table[column] > 0) & (table[column] <= 1)).all(), column
    assert (table["n_nodes_pruned"] <= table["n_nodes"]).all() and (table["seconds"] > 0).all()

    # P(target) is the target model's own probability of y* at t*.
    ids = torch.tensor([[WORDS.index(w) for w in "the princess lost".split()]])
    with torch.no_grad():
        p_her = d.model.target(ids).logits[0, -1].softmax(-1)[WORDS.index("her")]
    assert table["p_target"][0] == pytest.approx(float(p_her), rel=1e-9)

    # The network graph holds every subcomponent with CI > 0 on the prompt.
    g = d.network_ci(ids)
    assert table["n_nodes"][2] == sum(int((v > 0).sum()) for v in g.values())

    # shared_nodes is the overlap of the two graphs' component keys, per graph type; rebuild them.
    kw = {"settings": FAST["settings"]}
    for row, graph_type in [(0, "ci"), (2, "network")]:  # the adversarial rows go the same way
        a = study_prompt(d, tok, spec.prompts[0], graph_type, target=" her", **kw)
        b = study_prompt(d, tok, spec.prompts[1], graph_type, target=" his", **kw)
        shared = len(_keys(a.graph) & _keys(b.graph))
        assert table["shared_nodes"][row] == table["shared_nodes"][3 + row] == shared
        assert table["n_nodes"][row] == sum(1 for _, k in a.graph.nodes(data="kind") if k == "comp")
        assert table["n_edges"][row] == a.graph.number_of_edges()
        assert table["n_edges_pruned"][row] == a.pruned.number_of_edges()
        assert table["n_nodes_pruned"][row] == sum(1 for _, k in a.pruned.nodes(data="kind") if k == "comp")
        assert table["p_ci"][row] == pytest.approx(a.report["ci"], rel=1e-12)
    # The optimised CI-only graph is smaller than the network's (a nontrivial shared count needs both).
    assert table["n_nodes"][0] < table["n_nodes"][2]

    # The CSV round-trips with its dtypes, and the chart is a PNG.
    back = load_study(tmp_path / "study.csv")
    pd.testing.assert_frame_equal(back, table, check_exact=True)
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"
    # A target that pandas would read as NaN stays text.
    odd = table.assign(target=" NA")
    save_study(odd, tmp_path / "odd")
    assert list(load_study(tmp_path / "odd" / "study.csv")["target"]) == [" NA"] * 9


def test_study_checks_inputs_before_work(setup):
    d, tok = setup
    with pytest.raises(VpdError, match=r"Target 'her crown' of prompt 2 .* is 2 tokens"):
        run_study(d, tok, ["the king", "the princess lost"], targets=[None, "her crown"], **FAST)
    with pytest.raises(VpdError, match="unknown type 'attribution'"):
        run_study(d, tok, ["the king"], graph_types=["ci", "attribution"], **FAST)
    with pytest.raises(VpdError, match="Prompt 2 is 40 tokens, longer than the model's context of 32"):
        run_study(d, tok, ["the king", "the " * 40], **FAST)
    with pytest.raises(VpdError, match="one pair at most"):
        run_study(d, tok, ["a", "b", "c"], pairs=[(0, 1), (1, 2)], **FAST)
    with pytest.raises(VpdError, match=r"`pairs\[0\]`"):
        run_study(d, tok, ["a", "b"], pairs=[(0, 5)], **FAST)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A saved run whose target and tokenizer are a tiny float32 Llama and the word tokenizer."""
    from decomposer.vpd.config import DecomposeConfig
    from decomposer.vpd.run import Decomposition, save_state

    root = tmp_path_factory.mktemp("study-run")
    torch.manual_seed(0)
    target = tiny_llama(vocab=VOCAB).eval()
    target.save_pretrained(root / "model")
    word_tokenizer().save_pretrained(root / "model")
    config = DecomposeConfig.model_validate(
        {"target": str(root / "model"), "modules": MODULES, "ci": {"kind": "mlp", "hidden": 4}}
    )
    d = Decomposition.create(config, target)
    save_state(root / "run", d, step=0, target_name=str(root / "model"), train_state={})
    return root


def test_study_cli(run_dir, tmp_path, capsys):
    prompts = tmp_path / "PROMPTS.txt"
    prompts.write_text("# pair\nthe princess lost\t her\nthe prince lost\n")
    args = ["study", str(prompts), "--run", str(run_dir / "run"), "--out", str(tmp_path / "out"), "--steps", "2"]
    assert main([*args, "--graph-types", "ci", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["prompt"], r["graph_type"], r["pair_id"]) for r in out["rows"]] == [
        ("the princess lost", "ci", 0),
        ("the prince lost", "ci", 0),
    ]
    assert set(out["rows"][0]) == set(COLUMNS) and out["rows"][0]["target"] == "her"
    table = load_study(out["csv"])
    assert list(table["shared_nodes"]) == [r["shared_nodes"] for r in out["rows"]]
    assert (tmp_path / "out" / "study.png").is_file()


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "does not exist"),
        ("", [], "holds no prompts"),
        ("the princess lost\ther crown\n", [], "is 2 tokens, not one"),
        ("the king\n", ["--graph-types", "ci,attribution"], "unknown type 'attribution'"),
        ("the king\n", ["--steps", "0"], "`--steps` must be at least 1"),
    ],
)
def test_study_cli_bad_input(run_dir, tmp_path, capsys, content, extra, message):
    prompts = tmp_path / "PROMPTS.txt"
    if content is not None:
        prompts.write_text(content)
    args = ["study", str(prompts), "--run", str(run_dir / "run"), "--out", str(tmp_path / "out"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
