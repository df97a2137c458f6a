"""The toy targets (TMS with hidden layers, residual MLP), the scoring of `vpd toy`, and the toy recipes.

TMS 5-2 (tests/test_vpd_tms.py) and TMS 5-2-id (here) run in the suite with their shipped recipes. The long
runs (TMS 40-10 and 40-10-id, the residual MLPs) take 1-20 minutes each on one CPU core. They are marked
`slow` and run only when VPD_LONG_TOYS=1 is set, e.g.

    VPD_LONG_TOYS=1 OMP_NUM_THREADS=1 python -m pytest tests/test_vpd_toys.py -m slow -k tms_40-10

Their last results, over three seeds each, are in docs/toys.md. One more slow test runs TMS 40-10 seed 2 with and
without the revival of dead W_in subcomponents, which its recipe relies on.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from circuits.cli import main
from decomposer.errors import VpdError
from decomposer.vpd.config import ReviveConfig
from decomposer.vpd.toy_run import load_toy_config, run_toy
from decomposer.vpd.toy_score import Pieces, ground_truth, input_span, match_pieces, read_downstream
from decomposer.vpd.toys import TMS, ResidMLP, resid_mlp_labels, sparse_feature_batches, train_resid_mlp, train_tms

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "toys"
SHORT_OF_THE_PAPER = pytest.mark.xfail(
    reason="the CPU-length multi-layer recipe recovers only part of the features (docs/toys.md)", strict=False
)
LONG_TOYS = (
    "tms_40-10",
    pytest.param(
        "tms_40-10-id",
        marks=pytest.mark.xfail(
            reason="every W_in and W_out feature is recovered, but the CI-masked model keeps about 31% of the "
            "all-off MSE, above the 20% bound, and the identity's alive subcomponents sum to it only within about "
            "20% (docs/toys.md)",
            strict=False,
        ),
    ),
    pytest.param(
        "resid_mlp1",
        marks=pytest.mark.xfail(
            reason="every mlp_in feature is recovered, but the CI-masked model keeps 26% of the all-off MSE, above "
            "the 20% bound: mlp_out is split sparsely and is not faithful at masks = CI (docs/toys.md)",
            strict=False,
        ),
    ),
    pytest.param("resid_mlp2", marks=SHORT_OF_THE_PAPER),
    pytest.param("resid_mlp3", marks=SHORT_OF_THE_PAPER),
)
LONG_NAMES = ("tms_40-10", "tms_40-10-id", "resid_mlp1", "resid_mlp2", "resid_mlp3")


def test_every_shipped_toy_config_loads():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert set(LONG_NAMES) | {"tms_5-2", "tms_5-2-id"} == set(names)
    for name in names:
        config = load_toy_config(CONFIGS / f"{name}.yaml")
        assert len(config.seeds) >= 3 and config.decompose.loss.output_loss == "mse"


def test_tms_hidden_layer_is_fixed_identity_or_orthogonal():
    tms = train_tms(5, 2, steps=20, batch=64, hidden_layers=1, hidden_init="identity", seed=0)
    assert torch.equal(tms.hidden[0].weight, torch.eye(2))  # training leaves it alone
    x = torch.rand(4, 5)
    assert torch.allclose(tms(x), torch.relu(tms.W_out(tms.W_in(x))))
    random = TMS(5, 3, hidden_layers=2, hidden_init="random")
    for layer in random.hidden:
        assert torch.allclose(layer.weight @ layer.weight.T, torch.eye(3), atol=1e-5)
    assert not torch.equal(random.hidden[0].weight, random.hidden[1].weight)


def test_resid_mlp_learns_x_plus_relu_x():
    model = ResidMLP(20, 64, 12, 2, seed=3)
    assert torch.allclose(model.W_E.norm(dim=1), torch.ones(20))
    x = sparse_feature_batches(20, 512, 0.05, seed=9, low=-1.0)(0)
    assert float(x.min()) < -0.5 and float(x.max()) > 0.5  # values in (-1, 1)
    with torch.no_grad():
        before = float((model(x) - resid_mlp_labels(x)).pow(2).mean())
    trained = train_resid_mlp(20, 64, 12, 2, p_active=0.05, steps=300, batch=256, lr=3e-3, seed=3)
    assert torch.equal(trained.W_E, model.W_E)  # the embedding is fixed by the seed and not trained
    after = float((trained(x) - resid_mlp_labels(x)).pow(2).mean())
    assert after < 0.5 * before, (before, after)


def test_ground_truth_pieces_of_each_matrix():
    tms = TMS(5, 2, hidden_layers=1)
    eye = torch.eye(5)
    w_in = ground_truth(tms, "W_in", {})
    assert torch.equal(w_in.reads, eye) and torch.equal(w_in.writes, tms.W_in.weight.T.detach())
    w_out = ground_truth(tms, "W_out", {})
    assert torch.equal(w_out.reads, tms.W_out.weight.detach()) and torch.equal(w_out.writes, eye)
    assert ground_truth(tms, "hidden.0", {"hidden.0": torch.randn(10, 2)}) == Pieces("dense", None, None, 2)

    resid = ResidMLP(6, 16, 4, 1, seed=0)
    mlp_in = ground_truth(resid, "layers.0.mlp_in", {})
    assert torch.allclose(mlp_in.writes, resid.W_E @ resid.layers[0].mlp_in.weight.T.detach())
    # mlp_out is dense; its rank counts only the neurons that ever switch on (here 3 of 4: neuron 2 never does).
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.5], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    assert ground_truth(resid, "layers.0.mlp_out", {"layers.0.mlp_out": hidden}) == Pieces("dense", None, None, 3)


def test_dense_check_compares_only_the_directions_read_downstream():
    resid = ResidMLP(6, 16, 4, 2, seed=0)
    last, first = read_downstream(resid, "layers.1.mlp_out"), read_downstream(resid, "layers.0.mlp_out")
    assert last.shape == (6, 16) and first.shape == (10, 16)  # W_E; W_E and the next block's mlp_in rows
    assert torch.allclose(last @ last.T, torch.eye(6), atol=1e-5)
    unread = torch.randn(16)
    unread -= first.T @ (first @ unread)  # a residual direction nothing after layer 0 reads
    assert float((first @ unread).norm()) < 1e-5 and float((last @ resid.W_E[0]).norm()) > 0.99
    assert read_downstream(TMS(5, 2, hidden_layers=1), "hidden.0") is None


def test_match_pieces_scores_reads_only_on_the_input_span():
    reads, writes = torch.eye(4)[:2], torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pieces = Pieces("features", reads, writes, 2)
    # Both subcomponents read their feature plus a large part along e_3, a direction no input reaches.
    V = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [3.0, -3.0]])  # (d_in, C)
    U = writes.clone()
    alive = torch.ones(2, dtype=torch.bool)
    assert match_pieces(V, U, pieces, alive) == [None, None]
    assert match_pieces(V, U, pieces, alive, span=input_span(torch.eye(4)[:3])) == [0, 1]


def test_match_pieces_needs_both_directions_distinct_and_alive():
    generator = torch.Generator().manual_seed(0)
    reads, writes = torch.randn(3, 8, generator=generator), torch.randn(3, 6, generator=generator)
    pieces = Pieces("features", reads, writes, 3)
    # Subcomponents: 0-2 are the pieces (scaled, one sign-flipped), 3 reads like piece 0 but writes elsewhere,
    # 4 duplicates piece 1, 5 is piece 2 but dead.
    V = torch.stack([2 * reads[0], reads[1], -reads[2], reads[0], reads[1], reads[2]], dim=1)  # (d_in, C)
    U = torch.stack([writes[0], 3 * writes[1], writes[2], torch.randn(6, generator=generator), writes[1], writes[2]])
    alive = torch.tensor([True, True, True, True, True, False])
    assert match_pieces(V, U, pieces, alive) == [0, 1, 2]
    alive[2] = False  # piece 2's only live copy dies: not recovered, even though 5 matches it
    assert match_pieces(V, U, pieces, alive) == [0, 1, None]
    V[:, 0], V[:, 3] = 0.0, reads[1] + reads[0]  # piece 0 now has no good subcomponent
    found = match_pieces(V, U, pieces, torch.ones(6, dtype=torch.bool))
    assert found[0] is None and found[1] in (1, 4) and found[2] in (2, 5)


def test_vpd_toy_runs_end_to_end_and_writes_its_files(tmp_path, capsys):
    """The command's wiring on a few steps of the 5-2 recipe (the recipe itself is tested in test_vpd_tms.py)."""
    text = (CONFIGS / "tms_5-2.yaml").read_text()
    short = text.replace("train: {steps: 1000,", "train: {steps: 50,").replace("    steps: 1000\n", "    steps: 20\n")
    short = short.replace("faithfulness_warmup_steps: 200", "faithfulness_warmup_steps: 5")
    assert short.count("steps: 50") == 1 and "    steps: 20\n" in short
    config = tmp_path / "tiny.yaml"
    config.write_text(short)
    assert main(["toy", str(config), "--seeds", "3", "--out", str(tmp_path / "runs"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["toy"] == "tiny" and summary["seeds"] == [3]
    (result,) = summary["results"]
    assert result["format"] == "toy_result" and result["seed"] == 3
    assert set(result["matrices"]) == {"W_in", "W_out"} and result["matrices"]["W_in"]["pieces"] == 5
    folder = tmp_path / "runs" / "seed-3"
    assert json.loads((folder / "result.json").read_text()) == result
    assert (folder / "pieces.png").stat().st_size > 0 and (folder / "ci_vs_value.png").stat().st_size > 0
    assert main(["toy", str(config), "--seeds", "3", "--out", str(tmp_path / "runs")]) == 2  # never overwrites
    assert "already holds a decomposition" in capsys.readouterr().err


def test_vpd_toy_rejects_an_unknown_name(capsys):
    assert main(["toy", "no-such-toy"]) == 2
    err = capsys.readouterr().err
    assert "`name` 'no-such-toy' is not a toy config" in err and "tms_5-2" in err and "Traceback" not in err


def test_vpd_toy_reports_a_bad_config_in_one_sentence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("toy: {kind: tms, n_features: 0, n_hidden: 2}\ndecompose: {modules: [{pattern: W_in, C: 4}]}\n")
    assert main(["toy", str(bad)]) == 2
    assert "toy.tms.n_features" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: TMS(5, 2, hidden_layers=-1), "`hidden_layers` must be ≥ 0"),
        (lambda: TMS(5, 2, hidden_init="zeros"), "`hidden_init` one of identity, random"),
        (lambda: ResidMLP(10, 0, 4, 1), "`n_features`, `d_embed`, `d_mlp` and `n_layers` must be ≥ 1"),
        (lambda: sparse_feature_batches(5, 8, 0.1, seed=0, low=1.0), "`low` must be below 1"),
        (lambda: train_resid_mlp(steps=0), "`steps` must be ≥ 1"),
    ],
)
def test_bad_arguments_raise_one_sentence(call, message):
    with pytest.raises(VpdError, match=message):
        call()


@pytest.mark.slow
def test_tms_5_2_id_recovers_every_feature_and_the_identity_as_two_subcomponents(tmp_path):
    """The shipped tms_5-2-id recipe, seed 0, as `vpd toy` runs it (about a minute on one core)."""
    result = run_toy(load_toy_config(CONFIGS / "tms_5-2-id.yaml"), tmp_path, seed=0, plots=False)
    assert result["all_recovered"], result["matrices"]
    identity = result["matrices"]["hidden.0"]
    assert identity["alive"] == 2 and identity["relative_error_alive_sum"] < 0.1, identity
    assert result["dense_as_expected"]
    assert result["mse_ci"] < 0.3 * result["mse_zero"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VPD_LONG_TOYS") != "1", reason="minutes per toy; set VPD_LONG_TOYS=1")
@pytest.mark.parametrize("name", LONG_TOYS)
def test_long_toy_recovers_every_feature(name, tmp_path, capsys):
    assert main(["toy", name, "--seeds", "0", "--out", str(tmp_path), "--no-plots", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    (result,) = summary["results"]
    assert result["all_recovered"], result["matrices"]
    assert result["mse_ci"] < 0.2 * result["mse_zero"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("VPD_LONG_TOYS") != "1", reason="minutes per toy; set VPD_LONG_TOYS=1")
def test_revival_splits_the_merged_w_in_pair_of_tms_40_10(tmp_path):
    """Seed 2 of TMS 40-10 keeps a merged W_in pair without revival (38 / 40) and recovers all 40 with it."""
    config = load_toy_config(CONFIGS / "tms_40-10.yaml")
    without = config.model_copy(
        update={"decompose": config.decompose.model_copy(update={"revive": ReviveConfig(every=0)})}
    )
    revived = run_toy(config, tmp_path / "revived", 2, plots=False)["matrices"]["W_in"]
    merged = run_toy(without, tmp_path / "without", 2, plots=False)["matrices"]["W_in"]
    assert revived["recovered"] == revived["alive"] == 40, revived
    assert merged["recovered"] < 40 and merged["alive"] < 40, merged
