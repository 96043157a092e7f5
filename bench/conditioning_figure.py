"""The figure of docs/conditioning.md: every conditioning mode, trained briefly on CPU on the labelled synthetic
shapes with its preset, sampled on held-out conditions.

    .venv/bin/python bench/conditioning_figure.py --out runs/modes [--steps 600] [--ae-steps 1000]

Stages (each the command a user runs, printed first; a finished stage is skipped on a rerun): ldm-data synth
--labels (train and held-out), the f=4 autoencoder (ldm-train task=autoencoder on the shapes, ldm-export), one
ldm-train per mode (experiment=<mode>_shapes; text: tiny_cpu with the demo's trainable text encoder), then
samples of each model on four held-out samples' conditions, at 32 px and, for super-resolution and semantic
synthesis, at 64 px (twice the training size). Writes <out>/conditioning_modes.png and <out>/results.json.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.synthetic import COLOURS, SHAPES, class_name  # noqa: E402
from data_pipeline.tario import iter_shard  # noqa: E402
from trainer.inference.pipeline import GenerateOptions, load_pipeline  # noqa: E402

MODES = {  # name: (experiment, extra overrides, guidance)
    "unconditional": ("uncond_shapes", [], 1.0),
    "class": ("class_cond_shapes", [], 3.0),
    "text": ("tiny_cpu", ["text_encoder=demo_transformer", "data.caption_dropout=0.1", "data.batch_size=32",
                          "lr_schedule=cosine", "optim.lr=1e-3", "optim.weight_decay=0.0",
                          "lr_schedule.warmup_steps=100", "lr_schedule.min_lr_ratio=0.1", "ema.decay=0.995"], 3.0),
    "layout": ("layout_shapes", [], 3.0),
    "super-resolution": ("superres_shapes", [], 1.0),
    "inpainting": ("inpaint_shapes", [], 1.0),
    "semantic": ("semantic_shapes", [], 1.0),
}  # fmt: skip


def sh(*cmd: str) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, *cmd], check=True, env=env, cwd=ROOT)


def held_out(folder: Path) -> list[dict]:
    from PIL import Image

    out = []
    for raw in (s for p in sorted(folder.glob("*.tar")) for s in iter_shard(str(p))):
        img = np.asarray(Image.open(io.BytesIO(raw.files["jpg"])).convert("RGB"))
        seg = np.asarray(Image.open(io.BytesIO(raw.files["seg.png"])))
        mask = np.asarray(Image.open(io.BytesIO(raw.files["mask.png"])))
        out.append({"image": img, "seg": seg, "mask": mask, **json.loads(raw.files["json"])})
    return out


def inputs_for(mode: str, samples: list[dict], size: int) -> tuple[list, dict]:
    """(prompts, generate() inputs) for a mode's four held-out conditions, at ``size`` px."""
    import torch.nn.functional as F

    x = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    seg = torch.from_numpy(np.stack([s["seg"] for s in samples]).astype(np.int64))[:, None]
    mask = torch.from_numpy(np.stack([s["mask"] for s in samples]) > 127).float()[:, None]
    prompts = {"class": [str(s["class_id"]) for s in samples], "text": [s["caption"] for s in samples],
               "layout": [json.dumps([[s["class_id"], *s["boxes"][0]]]) for s in samples]}.get(mode, [""] * 4)  # fmt: skip
    if mode == "super-resolution":
        return prompts, {"low_res": F.interpolate(x, size=(size // 4, size // 4), mode="area")}
    if mode == "inpainting":
        return prompts, {"init_image": x, "mask": mask}
    if mode == "semantic":
        return prompts, {"segmentation": F.interpolate(seg.float(), size=(size, size), mode="nearest").long()}
    return prompts, {}


def condition_panel(mode: str, s: dict) -> np.ndarray:
    """What the model was given, as a 32x32 RGB picture."""
    palette = np.array(
        [(235, 235, 235)] + [COLOURS[list(COLOURS)[k // len(SHAPES)]] for k in range(24)], np.uint8
    )
    if mode in ("class", "text", "unconditional"):  # what the condition describes: the held-out image
        return s["image"] if mode != "unconditional" else np.full((32, 32, 3), 255, np.uint8)
    if mode == "layout":
        canvas = np.full((32, 32, 3), 255, np.uint8)
        x0, y0, x1, y1 = (round(v * 31) for v in s["boxes"][0])
        canvas[y0 : y1 + 1, [x0, x1]] = palette[s["class_id"] + 1]
        canvas[[y0, y1], x0 : x1 + 1] = palette[s["class_id"] + 1]
        return canvas
    if mode == "super-resolution":
        small = s["image"].reshape(8, 4, 8, 4, 3).mean((1, 3)).astype(np.uint8)
        return small.repeat(4, 0).repeat(4, 1)
    if mode == "inpainting":
        return np.where(s["mask"][..., None] > 127, 128, s["image"]).astype(np.uint8)
    return palette[s["seg"]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/modes"))
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--ae-steps", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--modes", nargs="*", default=list(MODES))
    args = p.parse_args()
    out = args.out.resolve()
    data, held = out / "shapes", out / "heldout"
    times: dict[str, float] = {}
    if not (data / "train-000000.tar").is_file():
        sh("-m", "data_pipeline.cli", "synth", "--out", str(data), "--num", str(args.train), "--shard-size", "500",
           "--size", "32", "--labels")  # fmt: skip
        sh("-m", "data_pipeline.cli", "synth", "--out", str(held), "--num", "16", "--shard-size", "16", "--size",
           "32", "--split", "heldout", "--seed", "1", "--labels")  # fmt: skip
    ae = out / "autoencoder"
    if not (ae / "export" / "autoencoder.json").is_file():
        t0 = time.perf_counter()
        sh("-m", "trainer.cli.train", "experiment=demo_autoencoder", "autoencoder=tiny", f"run_dir={ae}",
           f"data.urls={data}", "data.resolution=32", f"max_steps={args.ae_steps}", "logger.progress=false")  # fmt: skip
        sh("-m", "trainer.cli.export", str(ae / "checkpoints"), "--out", str(ae / "export"))
        times["autoencoder"] = time.perf_counter() - t0
    for mode in args.modes:
        experiment, extra, _ = MODES[mode]
        run = out / mode
        t0 = time.perf_counter()
        sh("-m", "trainer.cli.train", f"experiment={experiment}", f"run_dir={run}", f"data.urls={data}",
           f"weights.autoencoder={ae / 'export'}", "weights.allow_random_autoencoder=false", "data.resolution=32",
           f"max_steps={args.steps}", f"checkpoint.every={args.steps}", "logger.progress=false", *extra)  # fmt: skip
        times[mode] = time.perf_counter() - t0
    figure(out, held_out(held)[:4], args, times)
    return 0


def figure(out: Path, samples: list[dict], args, times: dict) -> None:
    """One row per mode: (given, sampled) for four held-out conditions, then two samples at 64 px."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    fig, axes = plt.subplots(len(MODES), 10, figsize=(12, 1.45 * len(MODES)))
    for r, (mode, (_, _, guidance)) in enumerate(MODES.items()):
        pipe = load_pipeline(out / mode / "checkpoints")
        prompts, inputs = inputs_for(mode, samples, 32)
        opts = GenerateOptions(steps=args.sample_steps, guidance=guidance, seeds=list(range(4)))
        small = pipe.generate(prompts, opts, **inputs).permute(0, 2, 3, 1).numpy()
        for c, s in enumerate(samples):
            axes[r, 2 * c].imshow(condition_panel(mode, s), interpolation="nearest")
            axes[r, 2 * c + 1].imshow(small[c], interpolation="nearest")
        if mode in ("super-resolution", "semantic"):  # twice the training size
            prompts, inputs = inputs_for(mode, samples, 64)
            big = GenerateOptions(
                steps=args.sample_steps, guidance=guidance, seeds=[0, 1], height=64, width=64
            )
            large = pipe.generate(prompts[:2], big, **{k: v[:2] for k, v in inputs.items()}).permute(
                0, 2, 3, 1
            )
            for c in range(2):
                axes[r, 8 + c].imshow(large[c].numpy(), interpolation="nearest")
                axes[r, 8 + c].set_title(f"64 px, as {c + 1}", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
        axes[r, 0].set_ylabel(mode, fontsize=8)
        for c, s in enumerate(samples):
            given = {"class": class_name(s["class_id"]), "text": s["caption"].removeprefix("a ")}.get(
                mode, "given"
            )
            axes[r, 2 * c].set_title(given, fontsize=5 if mode == "text" else 6)
            axes[r, 2 * c + 1].set_title("sample", fontsize=6)
        rows = [json.loads(line) for line in (out / mode / "metrics.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in rows if "loss" in x]
        results[mode] = {"final_loss_mean_last_50": float(np.mean(losses[-50:])), "logged_steps": len(losses)}
    fig.suptitle(f"Each mode's tiny model after {args.steps} CPU steps (batch 32, 32 px shapes, f=4 autoencoder "
                 f"after {args.ae_steps} steps); DDIM {args.sample_steps} steps; held-out conditions",
                 fontsize=8)  # fmt: skip
    fig.savefig(out / "conditioning_modes.png", dpi=120, bbox_inches="tight")
    (out / "results.json").write_text(json.dumps({"times_s": times, "modes": results, "args": vars(args)},
                                                 indent=1, default=str))  # fmt: skip
    print(f"wrote {out / 'conditioning_modes.png'}")


if __name__ == "__main__":
    sys.exit(main())
