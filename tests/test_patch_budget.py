"""Patched copies per forward pass sized from the prompt length and a byte budget (``max_memory=``
or a share of the free memory), with the same effects whatever the budget; on a HookedTransformer
(TransformerLens 3) and a TransformerBridge (both)."""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from atp_plugin import attribute
from atp_plugin.engine import memory
from conftest import HOSTS, host_model, logit_diff_metric, make_pairs

N, T = 4, 6


@contextmanager
def forward_sizes(model: torch.nn.Module) -> Iterator[list[int]]:
    """The number of prompts of every forward pass of the T-token pairs run inside the block (not
    the hook check a TransformerBridge's host runs once per new hook point, on a 4-token prompt)."""
    sizes: list[int] = []
    handle = model.embed.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]) if args[0].shape[-1] == T else None)
    try:
        yield sizes
    finally:
        handle.remove()


@pytest.fixture(scope="module", params=HOSTS)
def setup(request):
    model = host_model(request.param)
    clean, corrupt = make_pairs(N, T)
    return model, clean, corrupt, logit_diff_metric(N)


def test_a_small_budget_runs_fewer_copies_per_pass_with_the_same_effects(setup) -> None:
    model, clean, corrupt, metric = setup
    runs = {}
    for budget in (1, 1e12):
        result = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="atp",
                           max_memory=budget)
        with forward_sizes(model) as sizes:
            runs[budget] = result.verify(12), sizes
    (small, small_sizes), (large, large_sizes) = runs[1], runs[1e12]
    # one noise and one clean run of the N pairs, then 12 nodes x N pairs patched copies
    assert small_sizes == [N, N] + [1] * (12 * N)  # a budget below one copy still runs one at a time
    assert large_sizes == [N, N] + [12 * N]  # everything in one pass
    assert small["node"].tolist() == large["node"].tolist()
    for column in ("effect", "mean_abs_effect"):
        torch.testing.assert_close(torch.tensor(small[column].to_numpy()), torch.tensor(large[column].to_numpy()),
                                   rtol=0, atol=1e-12)
    assert small["effect"].abs().max() > 1e-3  # the comparison is not of zeros


def test_copies_per_pass_follow_the_prompt_length_and_the_budget(setup) -> None:
    model, clean, corrupt, metric = setup
    engine = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", max_memory=10**6).engine
    host = engine.host
    per_copy = memory.forward_bytes(host, T, held=1000)
    cfg = model.cfg
    expected = T * cfg.d_vocab + 2 * cfg.n_heads * T * T + 2 * T * cfg.d_mlp + 8 * T * cfg.d_model
    assert per_copy == 8 * expected + 1000  # float64 model
    assert memory.forward_bytes(host, 2 * T) > 2 * memory.forward_bytes(host, T)  # attention grows as T^2
    assert engine.copies_per_pass(held=1000) == 10**6 // per_copy
    engine.max_memory = 3.5 * per_copy
    assert engine.copies_per_pass(held=1000) == 3
    engine.max_memory = 10**15
    assert engine.copies_per_pass(held=1000) == memory.MAX_COPIES
    engine.patch_batch_size = 5  # a fixed count wins
    assert engine.copies_per_pass(held=1000) == 5


def test_patched_passes_hold_what_the_budget_allows(setup) -> None:
    """Sized from the budget: with room for 3 copies (the forward estimate plus each copy's corrupt
    values and masks), verification runs passes of at most 3 patched prompts."""
    model, clean, corrupt, metric = setup
    cfg = model.cfg
    held = (cfg.n_layers * T * cfg.n_heads * cfg.d_head) * 8 + cfg.n_layers * T * cfg.n_heads  # z values, masks
    per_copy = memory.forward_bytes(attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp").engine
                                    .host, T, held)
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp", max_memory=3.5 * per_copy)
    with forward_sizes(model) as sizes:
        result.verify(3)
    assert sizes == [N, N] + [3] * 4  # 3 nodes x 4 pairs, 3 copies per pass


@pytest.mark.parametrize("bad, error, match", [
    (0, ValueError, r"max_memory must be a positive number of bytes \(e\.g\. 8e9 for 8 GB\), got 0"),
    (-5.0, ValueError, r"positive number of bytes .*got -5\.0"),
    (math.nan, ValueError, r"positive number of bytes .*got nan"),
    (math.inf, ValueError, r"positive number of bytes .*got inf"),
    ("8GB", TypeError, r"max_memory must be a number of bytes \(e\.g\. 8e9 for 8 GB\), got '8GB' \(str\)"),
    (True, TypeError, r"max_memory must be a number of bytes .*got True \(bool\)"),
])
def test_a_bad_max_memory_is_an_error_before_any_run(setup, bad, error, match) -> None:
    model, clean, corrupt, metric = setup
    with forward_sizes(model) as sizes, pytest.raises(error, match=match):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="ap", max_memory=bad)
    assert sizes == []


def test_patch_batch_size_and_max_memory_together_are_an_error(setup) -> None:
    model, clean, corrupt, metric = setup
    with forward_sizes(model) as sizes, pytest.raises(ValueError, match="patch_batch_size .* or max_memory .*not both"):
        attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="ap", patch_batch_size=8, max_memory=1e9)
    assert sizes == []


def test_the_default_budget_is_a_share_of_the_free_memory(monkeypatch) -> None:
    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo on this system")
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert abs(memory.default_budget(torch.device("cpu")) - available // 4) < available // 40  # it moves a little

    def unreadable(*args, **kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(memory, "open", unreadable, raising=False)
    assert memory.default_budget(torch.device("cpu")) == memory.FALLBACK_BUDGET


def test_exhaustive_work_announces_its_size_and_time_and_shows_progress_off_a_terminal(setup, capsys) -> None:
    """ap over 2 layers x 6 positions x (4 heads + d_mlp neurons) nodes and 4 pairs (d_mlp 64:
    816 nodes; on the Bridge 128: 1,584): a first line with the patched prompts and forward passes,
    one with a time estimate after the first pass, and progress as plain lines although stderr
    (captured) is not a terminal."""
    model, clean, corrupt, metric = setup
    attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="ap", patch_batch_size=1000)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert model.cfg.d_mlp in (64, 128)
    prompts = 2 * 6 * (4 + model.cfg.d_mlp) * N  # 3,264 or 6,336
    passes = math.ceil(prompts / 1000)  # in ranges of lcm(1000, 4) = 1000 copies: 4 or 7
    assert lines[0] == (f"atp: exact patching: {prompts:,} patched prompts in {passes} forward passes of up to 1000, "
                        "plus a noise and a clean run of each of the 4 pairs")
    timing = [line for line in lines if line.startswith("atp: exact patching: the first pass took ")]
    assert len(timing) == 1 and timing[0].endswith(f"for the other {passes - 1}")
    assert "\r" not in err
    assert any(line.startswith("exact patching:") and f"{prompts}/{prompts}" in line for line in lines[2:])  # the last


def test_progress_lines_come_every_interval(setup, capsys, monkeypatch) -> None:
    from atp_plugin.engine import progress

    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line per update
    model, clean, corrupt, metric = setup
    attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="ap", patch_batch_size=1000)
    bars = [line for line in capsys.readouterr().err.splitlines() if line.startswith("exact patching:")]
    assert len(bars) >= 4 and bars[-1].split("|")[0].strip().endswith("100%")


def test_small_work_and_progress_false_print_nothing(setup, capsys) -> None:
    model, clean, corrupt, metric = setup
    result = attribute(model, clean, corrupt, metric, nodes=["attn_z", "mlp_neurons"], method="ap", progress=False)
    result.verify(5)
    assert capsys.readouterr().err == ""
    attribute(model, clean, corrupt, metric, nodes=["attn_z"], method="atp").verify(5)  # 20 patched prompts
    assert capsys.readouterr().err == ""


def test_evaluate_passes_the_budget_on(setup) -> None:
    from atp_plugin.evaluate import evaluate

    model, clean, corrupt, metric = setup
    with forward_sizes(model) as sizes, pytest.raises(ValueError, match="max_memory must be a positive number"):
        evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods="atp", top_x=2, max_memory=-1)
    assert sizes == []
    with forward_sizes(model) as sizes:
        evaluate(model, clean, corrupt, metric, nodes=["attn_z"], methods="atp", top_x=2, max_memory=1)
    # ap: every node (2 layers x 6 positions x 4 heads) one patched prompt per pass, and its shape probe
    assert max(sizes) == N and sizes.count(1) == 2 * 6 * 4 * N + 1
