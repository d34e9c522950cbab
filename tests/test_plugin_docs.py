"""The plugin guides' code runs as written and computes what the guides say.

- ``docs/plugins.md``: its ``my_atp_plugin.py`` blocks and its ``pyproject.toml`` are pip-installed
  into a temporary directory (so the plugin is found through its entry point, as after ``pip
  install``), its usage block is executed and must print the output shown on the page. Then, in
  float64, against AtP and exact patching computed here with TransformerLens's own autograd and
  hooks: ``atp-net`` scores |mean over pairs of Iatp| (signed: the mean), and equals the built-in
  ``atp``'s signed values exactly; ``atp-then-ap`` holds the exact mean |I| and mean I of ``atp``'s
  top k nodes and ``atp``'s numbers elsewhere, and counts N (k + 4) forward passes; the ``Wrapped``
  host registers after the built-ins and gives the bare model's numbers, QK fix and GradDrop included.
- ``README.md``, "Writing a plugin": its module, declared through its entry point with the example
  package ``examples/atp_directions`` importable, registers its node type, usable by name.
- ``docs/custom_adapters.md``: its blocks run in order, and its core ``ResidualDirections`` with its
  ``first_axes`` gives the numbers of the example package's adapter.

The guides' code builds HookedTransformers, so it runs where TransformerLens 3 is installed; the
README's plugin runs on a HookedTransformer there and on a TransformerBridge under either.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import torch

from atp_plugin import attribute, plugins
from conftest import clean_gradients, host_model, logit_diff_metric, make_pairs, needs_hooked_for

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
ADAPTERS = ROOT / "docs" / "custom_adapters.md"
PACKAGE = ROOT / "examples" / "atp_directions"
MODULE = "my_atp_plugin"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(text: str) -> list[tuple[str, str]]:
    """The fenced code blocks of a markdown text: (language, code), in order."""
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(text)]


def section(text: str, heading: str) -> str:
    """The markdown of one ``## heading`` section."""
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


@contextlib.contextmanager
def plugin_on_path(site: Path, *modules: str) -> Iterator[None]:
    """``site`` first on sys.path with the plugin registries reloaded; everything undone after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(plugins.ENV_VAR, raising=False)
        mp.syspath_prepend(str(site))
        for name in modules:
            sys.modules.pop(name, None)
        plugins.registries(reload=True)
        try:
            yield
        finally:
            for name in modules:
                sys.modules.pop(name, None)
    importlib.invalidate_caches()
    plugins.registries(reload=True)


needs_guide_model = needs_hooked_for("the guide's code builds a HookedTransformer, as written")


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """The guide's plugin, pip-installed from its blocks, and the namespace and output of its usage block."""
    code = blocks(GUIDE.read_text())
    module = "\n\n".join(src for lang, src in code if lang == "python" and src.startswith(f"# {MODULE}.py"))
    # blocks headed "# <module>.py" are modules; the edge method's (toyedges_mod.py) is tests/test_plugins.py's
    usage = [src for lang, src in code if lang == "python" and not re.match(r"# \w+\.py", src)]
    (pyproject,) = [src for lang, src in code if lang == "toml"]
    (shown,) = [src for lang, src in code if lang == ""]
    assert module and len(usage) == 1, "the guide should hold the plugin module's blocks and one usage block"
    source = tmp_path_factory.mktemp("plugin")
    (source / f"{MODULE}.py").write_text(module)
    (source / "pyproject.toml").write_text(pyproject)
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(source)], check=True)
    with plugin_on_path(site, MODULE):
        namespace: dict = {}
        out = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")  # HookedTransformer's deprecation notice
            exec(compile(usage[0], str(GUIDE), "exec"), namespace)
        yield namespace, out.getvalue(), shown


def hand_atp(model, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> torch.Tensor:
    """Per-pair AtP of every head output, (z(noise) - z(clean)) . dL/dz on the clean run:
    ``[pairs, layer, pos, head]``."""
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    acts = clean_gradients(model, clean, metric, hooks)  # hook -> (z, dL/dz)
    _, cache = model.run_with_cache(corrupt, names_filter=lambda name: name in hooks)
    return torch.stack([((cache[h] - z) * grad).sum(-1) for h, (z, grad) in acts.items()], 1).detach()


def hand_patch(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, layer: int, pos: int, head: int
               ) -> torch.Tensor:
    """Per-pair exact effect of patching one head output at one position: ``[pairs]``."""
    hook = f"blocks.{layer}.attn.hook_z"
    idx = torch.arange(len(clean))
    _, cache = model.run_with_cache(corrupt, names_filter=hook)

    def patch(z, hook):
        z = z.clone()
        z[:, pos, head] = cache[hook.name][:, pos, head]
        return z

    with torch.no_grad():
        return metric(model.run_with_hooks(clean, fwd_hooks=[(hook, patch)]), idx) - metric(model(clean), idx)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = float(expected.abs().max())
    assert scale > 1e-6, f"{what}: the expected values are (nearly) all zero, the comparison would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * scale, msg=lambda m: f"{what}: {m}")


@needs_guide_model
def test_guide_prints_what_it_shows(guide) -> None:
    _, printed, shown = guide
    assert printed == shown


@needs_guide_model
def test_net_atp_is_abs_of_mean_atp(guide) -> None:
    ns, _, _ = guide
    per_pair = hand_atp(ns["model"], ns["clean"], ns["corrupt"], ns["metric"])  # [pairs, layer, pos, head]
    net, atp = ns["net"], ns["atp"]
    close(net.signed["attn_z"], per_pair.mean(0), "atp-net signed = mean Iatp")
    close(net.scores["attn_z"], per_pair.mean(0).abs(), "atp-net score = |mean Iatp|")
    close(atp.scores["attn_z"], per_pair.abs().mean(0), "atp score = mean |Iatp|")
    assert torch.equal(net.signed["attn_z"], atp.signed["attn_z"])
    assert torch.equal(net.scores["attn_z"], atp.signed["attn_z"].abs())
    # the guide's point: on its pairs some estimates cancel between pairs, so the two rankings differ
    assert float((atp.scores["attn_z"] - net.scores["attn_z"]).max()) > 0.1


@needs_guide_model
def test_atp_then_ap_patches_the_top_k_exactly(guide) -> None:
    ns, _, _ = guide
    model, clean, corrupt, metric, checked = ns["model"], ns["clean"], ns["corrupt"], ns["metric"], ns["checked"]
    per_pair = hand_atp(model, clean, corrupt, metric)
    expected_scores, expected_signed = per_pair.abs().mean(0), per_pair.mean(0)  # [layer, pos, head]
    k = 3
    top = expected_scores.reshape(-1).topk(k).indices
    for layer, pos, head in zip(*torch.unravel_index(top, expected_scores.shape)):
        effect = hand_patch(model, clean, corrupt, metric, int(layer), int(pos), int(head))  # [pairs]
        expected_scores[layer, pos, head] = effect.abs().mean()
        expected_signed[layer, pos, head] = effect.mean()
    close(checked.scores["attn_z"], expected_scores, "atp-then-ap scores")
    close(checked.signed["attn_z"], expected_signed, "atp-then-ap signed")
    n = len(clean)
    assert checked.engine.forward_passes == n * (2 + 2 + k)  # AtP's two runs; noise, clean, k patched copies
    assert checked.engine.backward_passes == n


@needs_guide_model
def test_wrapped_host_gives_the_bare_models_numbers(guide) -> None:
    ns, _, _ = guide
    model, clean, corrupt, metric = ns["model"], ns["clean"], ns["corrupt"], ns["metric"]
    assert list(plugins.hosts()) == ["HookedTransformer", "TransformerBridge", "Wrapped"]
    assert plugins.registries()["backends"].owners["atp-net"] == "my_plugin"
    wrapped_model = ns["Wrapped"](model)
    nodes = ["attn_q", "attn_k", "attn_z", "mlp_neurons"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # atp*'s few-layers warning
        wrapped = attribute(wrapped_model, clean, corrupt, metric, nodes=nodes, method="atp*")
        bare = attribute(model, clean, corrupt, metric, nodes=nodes, method="atp*")
    assert wrapped.engine.host.name == "Wrapped"
    for key in bare.scores:
        torch.testing.assert_close(wrapped.scores[key], bare.scores[key], rtol=0, atol=0)
    effects = wrapped.verify(3)["effect"].to_numpy()
    assert (effects == bare.verify(3)["effect"].to_numpy()).all()
    assert not model.training


def test_readme_plugin_snippet_registers_its_node_type(host, tmp_path) -> None:
    code = blocks(section((ROOT / "README.md").read_text(), "Writing a plugin"))
    toml = next(src for lang, src in code if lang == "toml")
    module = next(src for lang, src in code if lang == "python")
    entry, target = re.search(r'^(\w+) = "(\w+)"$', toml, re.M).groups()
    (tmp_path / f"{target}.py").write_text(module)
    info = tmp_path / "readme_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: readme-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[atp_plugin]\n{entry} = {target}\n")
    name = re.search(r'name="(\w+)"', module).group(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(PACKAGE))  # the example package, importable from its source
        with plugin_on_path(tmp_path, target, "atp_directions"):
            assert plugins.registries()["adapters"].owners[name] == entry
            clean, corrupt = make_pairs(3, 5)
            result = attribute(host_model(host, n_layers=2), clean, corrupt, logit_diff_metric(3), nodes=name,
                               method="atp")
            assert result.dims[name] == ("layer", "pos", "direction")
            assert result.scores[name].shape == (2, 5, 8)
            assert float(result.scores[name].abs().max()) > 0


@needs_guide_model
def test_custom_adapter_guide_runs_and_matches_the_example_package(monkeypatch: pytest.MonkeyPatch) -> None:
    ns: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and few-layers notices
        for lang, src in blocks(ADAPTERS.read_text()):
            if lang == "python":
                exec(compile(src, str(ADAPTERS), "exec"), ns)
    assert set(ns["result"].scores) == {"sae:blocks.1.hook_resid_pre", "sae:blocks.1.hook_resid_pre.error",
                                        "sae:blocks.0.hook_attn_out", "sae:blocks.0.hook_attn_out.error"}
    monkeypatch.syspath_prepend(str(PACKAGE))
    monkeypatch.delitem(sys.modules, "atp_directions", raising=False)
    package = importlib.import_module("atp_directions")
    try:
        runs = {}
        for which, (cls, axes) in {"guide": (ns["ResidualDirections"], ns["first_axes"]),
                                   "package": (package.ResidualDirections, package.first_axes)}.items():
            runs[which] = attribute(ns["model"], ns["clean"], ns["corrupt"], ns["metric"], method="atp",
                                    nodes=[cls(axes, name="resid_axes")]).signed["resid_axes"]
    finally:
        sys.modules.pop("atp_directions", None)
    assert runs["guide"].shape == (2, 6, 4)
    close(runs["guide"], runs["package"], "the guide's adapter vs the example package's")
