"""What a process of each command pays before it does anything: the imports of its code path, against a bare
``import torch``, measured in fresh interpreters, interleaved round by round (this machine is noisy: read the
ratios, not the seconds).

    python bench/startup.py --rounds 5

Every rank of every training launch, every ``ldm-sample`` / ``ldm-eval`` / ``ldm-export`` call and every test
that runs a command pays these. ``import open_clip`` and ``import torchvision`` pull in torch._dynamo and model
registries; the paths below avoid both unless the job needs them (docs/benchmarks.md, "Process start-up").
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "import torch": "import torch",
    "ldm-sample (sample, pipeline, CLIP tokenizer)": (
        "import trainer.cli.sample, trainer.inference.pipeline; "
        "from trainer.models.text_encoders import _tokenizer; _tokenizer(77)"
    ),
    "ldm-eval (recon, adherence)": "import trainer.cli.eval, trainer.evaluate.adherence, trainer.evaluate.recon",
    "ldm-train (engine, data, CLIP tokenizer)": (
        "import trainer.train; from trainer.models.text_encoders import _tokenizer; _tokenizer(77)"
    ),
    "what we no longer import: open_clip": "import torch, open_clip",
    "what we no longer import: torchvision in ldm-sample": "import torch, torchvision.utils",
}


def seconds(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(args.rounds):
        for name, code in PATHS.items():
            times[name].append(seconds(code))
    base = statistics.median(times["import torch"])
    print(f"{'path':55s} {'median s':>9s} {'x import torch':>15s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:55s} {med:9.2f} {med / base:15.2f}")


if __name__ == "__main__":
    main()
