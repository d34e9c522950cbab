"""Plugin discovery through a real entry point: a distribution's metadata on sys.path."""

from __future__ import annotations

import re
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from atp_plugin import attribute, attribute_edges, cli, plugins
from atp_plugin.errors import UnsupportedModelError
from conftest import host_model, logit_diff_metric, make_pairs

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

BACKEND_PLUGIN = '''
from dataclasses import dataclass
from atp_plugin import hookimpl

@dataclass(frozen=True)
class SquaredAtP:
    """AtP scores squared: a toy backend that combines the engine's first-order estimates."""
    name: str = "atp-squared"

    def run(self, engine):
        sites = engine.sites()
        mean_abs, mean, _ = engine.first_order(qk=False, graddrop=False)
        return (engine.assemble({k: v ** 2 for k, v in mean_abs.items()}, sites),
                engine.assemble(mean, sites))

@hookimpl
def atp_register_backends(register):
    register(SquaredAtP())
'''


#: the edge-method example of docs/plugins.md, as written there
EDGE_PLUGIN = re.search(r"```python\n# toyedges_mod.py[^\n]*\n(.*?)```", GUIDE.read_text(), re.S).group(1)

HOST_PLUGIN = '''
from atp_plugin import hookimpl
from atp_plugin.attribution import host_for

class Bare:
    """A model object of some other tool holding a TransformerLens model."""
    def __init__(self, inner):
        self.inner = inner

class BareHost:
    """Answers every question through the inner model's host, but offers no structure(): nodes only."""
    name = "Bare"

    def __init__(self, model):
        self.model, self.inner = model, host_for(model.inner)

    @classmethod
    def accepts(cls, model):
        return isinstance(model, Bare)

    def __getattr__(self, name):
        if name == "structure":
            raise AttributeError(name)
        return getattr(self.inner, name)

@hookimpl
def atp_register_hosts(register):
    register(BareHost)
'''


def install_dist(root, dist: str, module: str, source: str) -> None:
    """Write ``module.py`` and a ``dist-0.1.dist-info`` declaring it under group atp_plugin."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[atp_plugin]\n{dist} = {module}\n")


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(plugins.ENV_VAR, raising=False)
    yield tmp_path
    monkeypatch.undo()
    plugins.registries(reload=True)


def test_entry_point_backend_is_found_and_runs(host, site_dir):
    install_dist(site_dir, "toyplug", "toyplug_mod", BACKEND_PLUGIN)
    regs = plugins.registries(reload=True)
    assert regs["backends"].owners["atp-squared"] == "toyplug"
    assert regs["backends"].owners["atp*"] == "atp_plugin.backends.builtin"
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(3, 5)
    metric = logit_diff_metric(3)
    squared = attribute(model, clean, corrupt, metric, nodes="attn_z", method="atp-squared")
    plain = attribute(model, clean, corrupt, metric, nodes="attn_z", method="atp")
    torch.testing.assert_close(squared.scores["attn_z"], plain.scores["attn_z"] ** 2, rtol=1e-12, atol=0)


def test_entry_point_edge_method_is_found_and_runs(host, site_dir):
    install_dist(site_dir, "toyedges", "toyedges_mod", EDGE_PLUGIN)
    regs = plugins.registries(reload=True)
    assert regs["edge_methods"].owners["eap-net"] == "toyedges"
    assert regs["edge_methods"].owners["atp"] == "atp_plugin.edges.methods"
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(3, 5)
    net = attribute_edges(model, clean, corrupt, logit_diff_metric(3), method="eap-net", per_position=True)
    eap = attribute_edges(model, clean, corrupt, logit_diff_metric(3), method="atp", per_position=True)
    assert net.method == "eap-net" and torch.equal(net.signed, eap.signed)
    assert torch.equal(net.scores, eap.signed.abs()) and not torch.equal(net.scores, eap.scores)
    assert (net.forward_passes, net.backward_passes) == (eap.forward_passes, eap.backward_passes)
    with pytest.raises(ValueError, match=r"unknown edge method 'eap'; known: atp, atp\+qk, ig, ap, eap-net"):
        attribute_edges(model, clean, corrupt, logit_diff_metric(3), method="eap")


def test_a_host_without_structure_serves_nodes_and_refuses_edges(host, site_dir):
    install_dist(site_dir, "barehost", "barehost_mod", HOST_PLUGIN)
    plugins.registries(reload=True)
    from barehost_mod import Bare
    model = host_model(host, n_layers=2)
    clean, corrupt = make_pairs(3, 5)
    metric = logit_diff_metric(3)
    nodes = attribute(Bare(model), clean, corrupt, metric, nodes="attn_z", method="atp").scores["attn_z"]
    assert torch.equal(nodes, attribute(model, clean, corrupt, metric, nodes="attn_z", method="atp").scores["attn_z"])
    with pytest.raises(UnsupportedModelError, match=r"^edge attribution needs the host's structure\(\) capability "
                                                    r".* the Bare host does not offer; attribute\(\) \(node "):
        attribute_edges(Bare(model), clean, corrupt, logit_diff_metric(3))


@pytest.mark.parametrize("selection, loaded", [("", False), ("someother", False), ("toyplug", True),
                                               ("someother, toyplug", True)])
def test_environment_variable_restricts_external_plugins(site_dir, monkeypatch, selection, loaded):
    install_dist(site_dir, "toyplug", "toyplug_mod", BACKEND_PLUGIN)
    monkeypatch.setenv(plugins.ENV_VAR, selection)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = plugins.registries(reload=True)["backends"].items
    assert [str(w.message) for w in caught if "not installed" in str(w.message)] == (
        ["ATP_PLUGINS names plugin(s) ['someother'] that are not installed; installed entry points of group "
         "'atp_plugin': toyplug"] if "someother" in selection else [])
    assert ("atp-squared" in backends) is loaded
    assert "atp*" in backends  # built-ins always load


def test_unknown_hook_is_an_error_naming_the_plugin(site_dir):
    install_dist(site_dir, "badplug", "badplug_mod", '''
        from atp_plugin import hookimpl

        @hookimpl
        def atp_register_widgets(register):
            pass
    ''')
    with pytest.raises(plugins.PluginError, match=r"'badplug'.*atp_register_widgets|atp_register_widgets.*'badplug'"):
        plugins.registries(reload=True)


def test_duplicate_name_is_an_error_naming_both_plugins(site_dir):
    install_dist(site_dir, "dupplug", "dupplug_mod", '''
        from atp_plugin import hookimpl
        from atp_plugin.backends.builtin import FirstOrder

        @hookimpl
        def atp_register_backends(register):
            register(FirstOrder("atp", qk=False, graddrop=False))
    ''')
    with pytest.raises(plugins.PluginError, match=r"'dupplug'.*'atp'.*'atp_plugin.backends.builtin'"):
        plugins.registries(reload=True)


def test_unknown_method_lists_the_registered_ones(host):
    model = host_model(host, n_layers=1)
    clean, corrupt = make_pairs(2, 4)
    with pytest.raises(ValueError, match=r"unknown method 'atp\+\+'.*atp\*.*atp\+gd"):
        attribute(model, clean, corrupt, logit_diff_metric(2), method="atp++")


def test_a_plugin_that_fails_to_import_is_an_error_naming_it(site_dir, capsys):
    """A broken installed plugin: PluginError naming it and how to leave it out; ``atp`` prints that
    in one line with exit code 2 instead of a traceback; ATP_PLUGINS without it runs again."""
    install_dist(site_dir, "brokenplug", "brokenplug_mod", "import a_module_that_is_not_there\n")
    with pytest.raises(plugins.PluginError, match=r"plugin 'brokenplug' \(brokenplug_mod\) failed to import "
                                                  r"\(ModuleNotFoundError: .*a_module_that_is_not_there.*ATP_PLUGINS="):
        plugins.registries(reload=True)
    assert cli.main(["demo", "--pairs", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("atp demo: error: plugin 'brokenplug'") and len(err.strip().splitlines()) == 1


def test_a_plugin_named_in_the_environment_but_not_installed_is_a_warning(site_dir, monkeypatch):
    install_dist(site_dir, "toyplug", "toyplug_mod", BACKEND_PLUGIN)
    monkeypatch.setenv(plugins.ENV_VAR, "toyplug,typoplug")
    with pytest.warns(UserWarning, match=r"ATP_PLUGINS names plugin\(s\) \['typoplug'\] that are not installed; "
                                         r"installed entry points of group 'atp_plugin': .*toyplug"):
        backends = plugins.registries(reload=True)["backends"].items
    assert "atp-squared" in backends
