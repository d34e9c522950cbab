"""Figures leave matplotlib alone: importing the library and drawing every kind of figure it draws
(heatmaps, the report's figures, cost-of-verification curves) neither selects nor switches
matplotlib's backend, nor imports pyplot; the PNGs are still written."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import matplotlib
    matplotlib.use("svg")  # the user's choice, not the default: the library must keep it

    import numpy as np
    import pandas as pd
    import torch
    from pathlib import Path

    import atp_plugin
    from atp_plugin import attribute, cli, metrics, plots, report
    from atp_plugin.demo_task import ioi_pairs, load_demo_model
    from atp_plugin.evaluate import Evaluation

    assert matplotlib.get_backend() == "svg", ("after import", matplotlib.get_backend())
    out = Path(sys.argv[1])
    model, task = load_demo_model(), ioi_pairs(2, seed=0, split="test")
    metric = metrics.logit_diff(metrics.token_ids(model, task.answers), metrics.token_ids(model, task.wrongs))
    result = attribute(model, task.clean, task.corrupt, metric, nodes=["attn_z"], method="atp")
    written = [plots.layer_heatmap(result, "attn_z", out / "heads.png"),
               plots.heatmap(torch.rand(3, 5), out / "grid.png", xlabel="x", ylabel="y", title="t"),
               report.write_report(result, out / "report.html", prompts=1).with_name("report_attn_z.png")]
    curves = pd.DataFrame({"atp": [3.0, 5.0], "oracle": [1.0, 2.0]}, index=pd.Index([1, 2], name="x"))
    evaluation = Evaluation(curves, {"atp": 2.0}, curves, result, 1, 8, 2)
    written.append(evaluation.plot(out / "curves.png"))
    for path in written:
        assert path.read_bytes()[:8] == b"\\x89PNG\\r\\n\\x1a\\n", path
    assert matplotlib.get_backend() == "svg", ("after plotting", matplotlib.get_backend())
    assert "matplotlib.pyplot" not in sys.modules
    print("ok")
""")


def test_importing_and_plotting_keep_matplotlibs_backend(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
