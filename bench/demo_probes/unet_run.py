"""The demo's UNet stage and its accuracy curve, on a given autoencoder and its latents (issue 19's P17, P18).

    OMP_NUM_THREADS=1 PROBE_DATA=DIR python bench/demo_probes/unet_run.py NAME SEED AE_EXPORT LATENTS [overrides...]

Runs ``Demo.unet`` and ``Demo.evaluate`` themselves (the same steps, checkpoint spacing, sampler and guidance as
``make demo``) in /tmp/p/NAME, whose ``data``, ``autoencoder/export`` and ``latents`` are links to
``$PROBE_DATA/data``, AE_EXPORT and LATENTS. Hydra overrides go to the UNet run; env STEPS and GUIDANCE replace
the demo's, RANKS its training processes. LATENTS is made with the demo's precompute when it does not exist:
for an autoencoder other than the ``demo_f8`` preset, make it first with ``ldm-precompute`` and that
autoencoder's overrides.
"""

import json
import os
import sys
from pathlib import Path

from trainer.demo.run import Demo, DemoBudget

name, seed, ae, latents, *overrides = sys.argv[1:]
out = Path("/tmp/p") / name
(out / "autoencoder").mkdir(parents=True, exist_ok=True)
links = {
    "data": Path(os.environ.get("PROBE_DATA", "/tmp/d1")) / "data",
    "autoencoder/export": Path(ae),
    "latents": Path(latents),
}
for link, target in links.items():
    (out / link).unlink(missing_ok=True)
    (out / link).symlink_to(target.resolve(), target_is_directory=True)
budget = DemoBudget(extra_unet=[f"seed={seed}", "logger.progress=false", *overrides])
budget.unet_steps = int(os.environ.get("STEPS", budget.unet_steps))
budget.guidance = float(os.environ.get("GUIDANCE", budget.guidance))
budget.ranks = int(os.environ.get("RANKS", budget.ranks))
demo = Demo(out, budget)
if not (Path(latents) / "manifest.json").is_file():
    demo.precompute()
demo.unet()
curve = demo.evaluate()["curve"]
lines = [
    json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in c.items() if k != "per_prompt"})
    for c in curve
]
(out / "curve.jsonl").write_text("\n".join(lines) + "\n")
print(f"{name} seed={seed} ae={ae} {' '.join(overrides)}", *lines, sep="\n")
