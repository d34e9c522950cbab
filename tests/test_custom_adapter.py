"""A node type defined outside the library (``examples/atp_directions``), used as an instance and
as an installed third-party plugin found by name through its entry point.

- AtP for the nodes equals the formula written out here, (c_j(noise) - c_j(clean)) <dL/dx, u_j>,
  with dL/dx from the model's own autograd; exact patching equals patching ``hook_resid_pre`` by
  hand (x + delta_c u_j), and moves only that component.
- ``pip install`` of the example package registers ``resid_axes``; ``registries(reload=True)``
  finds it, and it gives the numbers of an instance with the same directions.

On a HookedTransformer (TransformerLens 3) and a TransformerBridge (both).
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from atp_plugin import NodeAdapter, attribute, plugins
from conftest import clean_gradients, host_model, logit_diff_metric, make_pairs

PACKAGE = Path(__file__).resolve().parents[1] / "examples" / "atp_directions"
N, T = 3, 5


@pytest.fixture(scope="module")
def directions_module():
    """The example package's module, imported from its source."""
    sys.path.insert(0, str(PACKAGE))
    try:
        sys.modules.pop("atp_directions", None)
        yield importlib.import_module("atp_directions")
    finally:
        sys.path.remove(str(PACKAGE))
        sys.modules.pop("atp_directions", None)


def run(model, nodes, method: str):
    clean, corrupt = make_pairs(N, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return attribute(model, clean, corrupt, logit_diff_metric(N), nodes=nodes, method=method)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    assert scale > 1e-6, f"{what}: the expected values are (nearly) all zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10 * scale, msg=lambda m: f"{what}: {m}")


def test_instance_matches_hand_computed_atp_and_patching(host, directions_module) -> None:
    model = host_model(host, n_layers=2)
    torch.manual_seed(5)
    dirs = torch.randn(3, 32, dtype=torch.float64)             # not orthogonal, not unit
    adapter = directions_module.ResidualDirections(dirs)
    assert isinstance(adapter, NodeAdapter)
    u = dirs / dirs.norm(dim=-1, keepdim=True)                  # [k, d_model]
    clean, corrupt = make_pairs(N, T)
    metric = logit_diff_metric(N)
    idx = torch.arange(N)
    hooks = [f"blocks.{layer}.hook_resid_pre" for layer in range(2)]

    acts = clean_gradients(model, clean, metric, hooks)  # hook -> (value, gradient)
    _, cache = model.run_with_cache(corrupt, names_filter=lambda n: n in hooks)
    with torch.no_grad():
        dc = torch.stack([(cache[h] - acts[h][0]) @ u.T for h in hooks])                 # [layer, N, T, k]
        expected_atp = (dc * torch.stack([acts[h][1] @ u.T for h in hooks])).mean(1)     # [layer, T, k]

        base = metric(model(clean), idx)
        expected_ap = torch.zeros(2, T, 3, dtype=torch.float64)
        for layer, h in enumerate(hooks):
            for t in range(T):
                for j in range(3):
                    def move(x, hook, t=t, j=j, layer=layer):
                        x = x.clone()
                        x[:, t] += dc[layer, :, t, j, None] * u[j]
                        return x
                    patched = model.run_with_hooks(clean, fwd_hooks=[(h, move)])
                    expected_ap[layer, t, j] = (metric(patched, idx) - base).mean()

    atp, ap = run(model, [adapter], "atp"), run(model, [adapter], "ap")
    assert ap.dims["resid_directions"] == ("layer", "pos", "direction")
    close(atp.signed["resid_directions"], expected_atp, "atp of residual directions")
    close(ap.signed["resid_directions"], expected_ap, "exact patching of residual directions")

    # patching node j moves x along u_j only: component j takes its noise value, x - c_j u_j is untouched
    x, x_noise = acts[hooks[1]][0], cache[hooks[1]]
    mask = torch.zeros(N, T, 3, dtype=torch.bool)
    mask[:, 2, 1] = True
    out = adapter.patch(hooks[1], x, x_noise, {"": mask})
    close(out[:, 2] @ u[1], x_noise[:, 2] @ u[1], "patched component")
    close(out[:, 2] - (out[:, 2] @ u[1])[:, None] * u[1], x[:, 2] - (x[:, 2] @ u[1])[:, None] * u[1], "the rest")
    torch.testing.assert_close(out[:, [0, 1, 3, 4]], x[:, [0, 1, 3, 4]], rtol=0, atol=0)


def test_directions_of_the_wrong_width_are_a_clear_error(host, directions_module) -> None:
    with pytest.raises(ValueError, match=r"directions must be \[k, d_model=32\], got \(2, 16\)"):
        run(host_model(host, n_layers=2), [directions_module.ResidualDirections(torch.randn(2, 16))], "atp")


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The example package pip-installed into a temporary directory on sys.path."""
    source = tmp_path / "src"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True)
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    monkeypatch.syspath_prepend(str(target))
    sys.modules.pop("atp_directions", None)
    try:
        yield target
    finally:
        monkeypatch.undo()
        sys.modules.pop("atp_directions", None)
        importlib.invalidate_caches()
        plugins.registries(reload=True)


def test_installed_plugin_is_found_by_name(host, installed_plugin: Path, directions_module) -> None:
    registry = plugins.registries(reload=True)["adapters"]
    assert "resid_axes" in registry.items, "the installed plugin's adapter was not registered"
    assert registry.owners["resid_axes"] == "directions"  # the entry point's name
    registered = registry.items["resid_axes"]
    assert Path(sys.modules[type(registered).__module__].__file__).is_relative_to(installed_plugin)

    model = host_model(host, n_layers=2)
    by_name = run(model, "resid_axes", "atp")
    by_instance = run(model, [directions_module.ResidualDirections(torch.eye(32)[:4], name="resid_axes")], "atp")
    assert by_name.scores["resid_axes"].shape == (2, T, 4)
    close(by_name.signed["resid_axes"], by_instance.signed["resid_axes"], "plugin by name vs instance")
