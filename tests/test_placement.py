"""autotune placement: expert maps from recorded routing - valid for MoE(expert_map=...), even
slots a rank, the busiest rank's load down on skewed routing, replicas for the hottest experts;
the CLI and its errors."""

import itertools
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autotune import __main__ as cli
from autotune.placement import balanced_map, expert_load, imbalance, rank_loads
from ds_kernels.expert_parallel import placement
from numerics import SEEDS


@st.composite
def loads(draw):
    ranks = draw(st.sampled_from([1, 2, 3, 4, 8]))
    E = ranks * draw(st.integers(1, 4))
    redundant = draw(st.sampled_from([0, ranks, 2 * ranks]))
    redundant = redundant if redundant <= E * (ranks - 1) else 0
    g = torch.Generator().manual_seed(draw(SEEDS, label="seed"))
    # Zipf-like skew, as real routing has: a few hot experts, many cold (some unused).
    weights = 1.0 / torch.arange(1, E + 1).float() ** draw(st.sampled_from([0.0, 1.0, 2.0]))
    ids = torch.multinomial(weights[torch.randperm(E, generator=g)], 200 * E,
                            replacement=True, generator=g)
    return expert_load(ids.view(-1, 1), E), ranks, redundant


@settings(max_examples=60)
@given(problem=loads())
def test_maps_are_valid_and_even(problem):
    """What holds for any load: a map MoE(expert_map=...) accepts, the same slots a rank, every
    assignment counted once, each extra copy where the load per copy was highest. (How even
    the result is depends on the load; the examples below pin it down.)"""
    load, ranks, redundant = problem
    E = len(load)
    expert_map = balanced_map(load, ranks, redundant)
    assert placement(E, ranks, expert_map) == expert_map
    assert all(len(ids) == (E + redundant) // ranks for ids in expert_map)
    assert sum(rank_loads(load, expert_map)) == pytest.approx(sum(load))
    copies = [sum(e in ids for ids in expert_map) for e in range(E)]
    assert sum(copies) == E + redundant
    if redundant:  # no copy went to an expert lighter per copy than one left single
        replicated = [e for e in range(E) if copies[e] > 1]
        singles = [load[e] for e in range(E) if copies[e] == 1]
        assert min(load[e] / (copies[e] - 1) for e in replicated) >= max(singles, default=0)


def _even_splits(experts, ranks):
    """Every split of ``experts`` into ``ranks`` groups of equal size (small cases only)."""
    if ranks == 1:
        yield [experts]
        return
    size = len(experts) // ranks
    first, rest = experts[0], experts[1:]
    for others in itertools.combinations(rest, size - 1):
        remaining = [e for e in rest if e not in others]
        for split in _even_splits(remaining, ranks - 1):
            yield [[first, *others], *split]


def test_on_small_cases_the_busiest_rank_is_near_the_best_split():
    """Against every even split (no replicas, 8 experts on 2 or 4 ranks), for skewed loads."""
    g = torch.Generator().manual_seed(5)
    for ranks in (2, 4):
        for _ in range(20):
            load = (torch.rand(8, generator=g) ** 3 * 1000).long().tolist()
            best = min(max(sum(load[e] for e in ids) for ids in split)
                       for split in _even_splits(list(range(8)), ranks))
            got = max(rank_loads(load, balanced_map(load, ranks)))
            assert got <= 1.25 * best, (load, ranks)


def test_the_hottest_expert_gets_the_replicas_and_the_load_evens_out():
    load = [900, 100, 100, 100, 100, 100, 100, 100]  # expert 0: 9x any other
    contiguous = imbalance(rank_loads(load, placement(8, 4)))
    expert_map = balanced_map(load, 4, redundant=4)
    copies = [sum(e in ids for ids in expert_map) for e in range(8)]
    assert copies[0] == 4 and sum(copies) == 12
    assert contiguous == pytest.approx(1.0 / (1600 / 4) * 1000)
    # A copy of expert 0 (225) on each rank and the seven 100s in the eight slots left: the
    # best there is, 425 on the busiest rank over a mean of 400.
    assert imbalance(rank_loads(load, expert_map)) == pytest.approx(425 / 400)


def test_the_cli_writes_a_map_moe_accepts(tmp_path, capsys):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    skewed = torch.tensor([0.3] + [0.7 / 15] * 15)
    ids = torch.multinomial(skewed.expand(500, 16), 2, generator=g).int()  # [T, k=2]
    save_file({"topk_ids": ids, "model.layers.1.mlp.gate": ids[:100].clone()},
              tmp_path / "ids.safetensors")
    out = tmp_path / "map.json"
    cli.main(["placement", "--routing", str(tmp_path / "ids.safetensors"), "--experts", "16",
              "--ranks", "4", "--redundant", "4", "--out", str(out)])
    written = json.loads(out.read_text())
    assert placement(16, 4, written["expert_map"]) == written["expert_map"]
    report = capsys.readouterr().err
    before, after = (float(x) for x in
                     report.split("busiest rank / mean: ")[1].split(" with this map")[0]
                     .replace(" with E/W contiguous experts a rank,", "").split())
    assert after < before and after == pytest.approx(imbalance(written["rank_loads"]), abs=1e-3)
    cli.main(["placement", "--routing", str(tmp_path / "ids.safetensors"), "--layer",
              "model.layers.1.mlp.gate", "--experts", "16", "--ranks", "4"])
    assert "100 routed tokens" in capsys.readouterr().err


@pytest.mark.parametrize("argv, match", [
    (["--experts", "16", "--ranks", "4", "--redundant", "3"], "do not fill 4 ranks evenly"),
    (["--experts", "8", "--ranks", "4"], r"outside \[0, 8\)"),
    (["--experts", "16", "--ranks", "4", "--layer", "nope"], "has no 'nope'"),
])
def test_cli_errors_name_the_problem(tmp_path, argv, match):
    from safetensors.torch import save_file

    save_file({"topk_ids": torch.tensor([[0, 15]], dtype=torch.int32)}, tmp_path / "i.safetensors")
    with pytest.raises(SystemExit, match=match):
        cli.main(["placement", "--routing", str(tmp_path / "i.safetensors"), *argv])
