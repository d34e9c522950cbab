#!/usr/bin/env bash
# Regenerate docs/report.png: `atp rank --report` on 8 held-out IOI pairs of the demo model,
# rendered by headless Chromium (Debian's `chromium`) at 1200 x 1600.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
python - "$work/pairs.jsonl" <<'PY'
import json, sys
from atp_plugin.demo_task import ioi_pairs
task = ioi_pairs(8, seed=0, split="test")
with open(sys.argv[1], "w") as f:
    for row in zip(task.clean, task.corrupt, task.answers, task.wrongs):
        f.write(json.dumps(dict(zip(("clean", "corrupt", "answer", "wrong"), row))) + "\n")
PY
atp rank --model demo --pairs "$work/pairs.jsonl" --nodes attn_z,attn_q,attn_k,mlp_neurons --method atp+qk \
    --verify 10 --report "$work/report.html" --quiet
chromium --headless --no-sandbox --disable-gpu --no-first-run --user-data-dir="$work/profile" \
    --window-size=1200,1600 --screenshot="$PWD/docs/report.png" "file://$work/report.html"
rm -rf "$work"
