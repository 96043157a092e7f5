"""``ldm-demo``: the whole pipeline on CPU with generated data, end to end, in about 20 minutes.

    ldm-demo --out runs/demo                 # what `make demo` runs
    ldm-demo --out runs/demo --quick         # a 3-minute smoke run (tiny budgets; the report still gets written)

Every stage is the command a user runs by hand (printed before it runs), so the demo doubles as a tour:

    ldm-data synth / from-folder  ->  ldm-train (autoencoder)  ->  ldm-export  ->  ldm-eval recon
    ->  ldm-precompute  ->  ldm-train (UNet, from latents)  ->  ldm-sample + ldm-eval adherence per checkpoint
    ->  ldm-export  ->  report.md (+ sample grid, loss curves, accuracy against training time)

On a GPU box or a cluster the same stages run with other presets (docs/getting-started.md).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.synthetic import caption_for, combinations

from .data import write_held_out, write_photo_crops


@dataclass
class DemoBudget:
    """How much of everything the demo makes and trains (the defaults fit 20 minutes on 2 CPU cores)."""

    synth_images: int = 12000
    photo_crops: int = 6000
    # 1,400 + 2,300 steps: 18.1-18.6 min in all on this VM's AMD EPYC since P20 at its usual speed, 20.2-26.4
    # in its slow spells (steps up to 1.45x slower; ~33 on the Intel VM). P21 loads data in the training process.
    # With 1,900 UNet steps the demo's held-out shape read 87.5%: the time left goes to the UNet (P19).
    ae_steps: int = 1400
    unet_steps: int = 2300
    curve_points: int = 3  # checkpoints of the UNet run that get sampled and scored
    images_per_prompt: int = 4
    sample_steps: int = 50
    guidance: float = 5.0  # v-prediction at 2,300 steps: held-out shape 90/92% at 3, 98/92% at 5 (P17)
    workers: int = 2
    # training processes (torchrun, data parallel, the cores split between them); the batches below are global.
    # 2 ranks of one thread looked 1.13-1.16x faster in 100-step probes but ran the demo slower (a 50-s shm_comm
    # build, UNet 0.33 against 0.30 s a step): docs/benchmarks.md, issue 19
    ranks: int = 1
    ae_batch: int = 32
    unet_batch: int = 64
    extra_ae: list[str] = field(default_factory=list)  # Hydra overrides for the autoencoder run
    extra_unet: list[str] = field(default_factory=list)  # ... and for the UNet run


# 2 ranks: the smoke run (and its test) also walks the data-parallel path
QUICK = DemoBudget(
    synth_images=600, photo_crops=200, ae_steps=10, unet_steps=10, curve_points=2, images_per_prompt=1,
    sample_steps=10, ranks=2,
)  # fmt: skip


class Demo:
    """Runs the stages in order, timing each, into one run folder."""

    def __init__(self, out: Path, budget: DemoBudget):
        self.out, self.budget = out.resolve(), budget
        self.bin = Path(sys.executable).parent
        self.times: dict[str, float] = {}
        self.env = dict(os.environ)
        self.env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
        self.env.setdefault("WANDB_MODE", "offline")
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            self.env.pop(key, None)

    def sh(self, *cmd: str | Path, capture: bool = False, env: dict[str, str] | None = None) -> str:
        """Run one stage command (printed first); its output streams to the terminal unless captured."""
        args = [str(c) for c in cmd]
        shown = [Path(args[0]).name if args[0].startswith(str(self.bin)) else args[0], *args[1:]]
        shown = [f"{k}={v}" for k, v in (env or {}).items()] + shown
        print(f"\n$ {shlex.join(shown)}", flush=True)
        res = subprocess.run(
            args, env={**self.env, **(env or {})}, text=True, stdout=subprocess.PIPE if capture else None
        )
        if res.returncode != 0:
            raise SystemExit(f"ldm-demo: stage failed (exit {res.returncode}): {shlex.join(shown)}")
        return res.stdout or ""

    def tool(self, name: str) -> str:
        return str(self.bin / name)

    def train(self, batch: int, experiment: str, *overrides: str) -> None:
        """One training run on ``budget.ranks`` processes, ``batch`` samples a step over all of them."""
        n = self.budget.ranks
        if batch % n:
            raise SystemExit(f"ldm-demo: a global batch of {batch} does not split over {n} ranks")
        if n == 1:
            self.sh(
                sys.executable, "-m", "trainer.cli.train", experiment, f"data.batch_size={batch}", *overrides
            )
            return
        threads = str(max(1, (os.cpu_count() or 1) // n))
        self.sh(self.tool("torchrun"), "--standalone", f"--nproc_per_node={n}", "-m", "trainer.cli.train",
                experiment, f"data.batch_size={batch // n}", *overrides, env={"OMP_NUM_THREADS": threads})  # fmt: skip

    def stage(self, name: str, fn) -> object:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        result = fn()
        self.times[name] = time.perf_counter() - t0
        print(f"=== {name}: {self.times[name]:.0f} s ===", flush=True)
        return result

    # --- stages -------------------------------------------------------------------------------------------

    def data(self) -> dict:
        b, d = self.budget, self.out / "data"
        shard = str(max(100, b.synth_images // 12))
        synth = [self.tool("ldm-data"), "synth", "--size", "64", "--workers", str(b.workers)]
        self.sh(
            *synth, "--seed", "0", "--out", d / "train", "--num", str(b.synth_images), "--shard-size", shard
        )
        self.sh(*synth, "--seed", "0", "--out", d / "heldout", "--split", "heldout", "--num", "96",
                "--shard-size", "96")  # fmt: skip
        # The autoencoder's shapes: every combination, another seed. As in LDM (its autoencoder is trained on other
        # images than the text-image pairs), the held-out split is about captions, which an autoencoder never
        # reads; trained on the UNet's split only, it decoded the held-out bottom-right triangles as discs
        # (docs/benchmarks.md, issue 19, P15).
        self.sh(*synth, "--seed", "1", "--split", "all", "--out", d / "ae_shapes", "--num", str(b.synth_images),
                "--shard-size", shard)  # fmt: skip
        write_photo_crops(d / "photo_folder", b.photo_crops)
        self.sh(self.tool("ldm-data"), "from-folder", d / "photo_folder", "--out", d / "photos",
                "--shard-size", "500", "--workers", str(b.workers))  # fmt: skip
        # the loader shuffles within a shard: the autoencoder's two sources are mixed across shards first
        self.sh(self.tool("ldm-data"), "shuffle", d / "ae_shapes", d / "photos", "--out", d / "mixed",
                "--shard-size", "500")  # fmt: skip
        held = write_held_out(d / "heldout_photos")
        prompts = [caption_for(*c) for c in combinations("heldout")]
        (d / "heldout_prompts.txt").write_text("\n".join(prompts) + "\n")
        report = self.sh(self.tool("ldm-data"), "validate", d / "train", d / "ae_shapes", d / "photos", "--json",
                         capture=True)  # fmt: skip
        return {"validate": json.loads(report), "heldout_photos": [str(p) for p in held], "prompts": prompts}

    def autoencoder(self) -> dict:
        d, run = self.out / "data", self.out / "autoencoder"
        self.train(self.budget.ae_batch, "experiment=demo_autoencoder", f"run_dir={run}",
                   f"max_steps={self.budget.ae_steps}", f"data.urls={d / 'mixed'}", *self.budget.extra_ae)  # fmt: skip
        self.sh(self.tool("ldm-export"), run / "checkpoints", "--out", run / "export")
        photos = sorted(str(p) for p in (d / "heldout_photos").glob("*.png"))
        at256 = self.sh(
            self.tool("ldm-eval"), "recon", run / "export", *photos, "--size", "256", capture=True
        )
        from .report import reconstruction_adherence

        ceiling = reconstruction_adherence(run / "export", d / "heldout")
        print(f"adherence scorer on reconstructions of the held-out ground truth: {ceiling}")
        return {
            "photos_256": json.loads(at256),
            "heldout_recon_adherence": ceiling,
        }

    def precompute(self) -> None:
        d = self.out / "data"
        self.sh(sys.executable, "-m", "trainer.cli.precompute", f"data.urls={d / 'train'}", "data.resolution=64",
                "data.num_workers=1", "autoencoder=demo_f8", f"weights.autoencoder={self.out / 'autoencoder/export'}",
                f"out={self.out / 'latents'}", "batch_size=64")  # fmt: skip

    def unet(self) -> None:
        b, run = self.budget, self.out / "unet"
        every = max(1, -(-b.unet_steps // b.curve_points))  # ceil: the last curve point is the final step
        self.train(b.unet_batch, "experiment=demo_unet", f"run_dir={run}", f"max_steps={b.unet_steps}",
                   f"data.urls={self.out / 'latents'}", f"weights.autoencoder={self.out / 'autoencoder/export'}",
                   f"checkpoint.every={every}", f"checkpoint.keep_last={b.curve_points + 1}", *b.extra_unet)  # fmt: skip

    def sample_and_score(self, model: Path, out: Path) -> dict:
        b = self.budget
        self.sh(self.tool("ldm-sample"), model, "--prompts-file", self.out / "data/heldout_prompts.txt",
                "--num", str(b.images_per_prompt), "--steps", str(b.sample_steps), "--guidance", str(b.guidance),
                "--batch-size", "48", "--out", out, "--device", "cpu")  # fmt: skip
        return json.loads(self.sh(self.tool("ldm-eval"), "adherence", out, capture=True))

    def evaluate(self) -> dict:
        """Adherence of every kept checkpoint (the accuracy curve), then of the exported final model."""
        from ..engine.checkpoint import COMMITTED

        ckpts = sorted(p for p in (self.out / "unet/checkpoints").iterdir() if (p / COMMITTED).is_file())
        curve = []
        for ckpt in ckpts[:-1]:
            scores = self.sample_and_score(ckpt, self.out / "samples" / ckpt.name)
            curve.append({"checkpoint": ckpt.name, **scores})
        self.sh(self.tool("ldm-export"), self.out / "unet/checkpoints", "--out", self.out / "export")
        final = self.sample_and_score(self.out / "export", self.out / "samples/final")
        curve.append({"checkpoint": ckpts[-1].name, **final})
        return {"curve": curve, "final": final}

    def run(self) -> Path:
        t0 = time.perf_counter()
        data = self.stage("data", self.data)
        ae = self.stage("autoencoder", self.autoencoder)
        self.stage("precompute", self.precompute)
        self.stage("unet", self.unet)
        ev = self.stage("sample+eval", self.evaluate)
        results = {
            "budget": asdict(self.budget),
            "data": data,
            "autoencoder": ae,
            "eval": ev,
            "times": self.times,
        }
        results["total_s"] = time.perf_counter() - t0
        from .report import write_report

        return write_report(self.out, results)
