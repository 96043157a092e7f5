"""Probe data for bench/demo_probes/ae_run.sh: the demo's data stage into $PROBE_DATA (default /tmp/d1)."""

import os
from pathlib import Path

from trainer.demo.run import Demo, DemoBudget

demo = Demo(Path(os.environ.get("PROBE_DATA", "/tmp/d1")), DemoBudget())
print(demo.stage("data", demo.data))
