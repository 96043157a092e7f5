#!/usr/bin/env bash
# unet_run.sh NAME SEED AE_EXPORT LATENTS [hydra overrides...]: the demo's UNet stage on one thread, then its
# accuracy curve: every kept checkpoint and the EMA export sampled on the 12 held-out prompts (4 images each,
# DDIM 50, guidance $GUIDANCE: default 5 as the demo's; P17's curves ran at 3) and scored (curve.jsonl).
# LATENTS is made first with ldm-precompute from the demo's train split when it does not exist; AE_OVERRIDES
# (env) are the autoencoder overrides it needs (e.g. "autoencoder.z_channels=8 autoencoder.embed_dim=8").
# Data: $PROBE_DATA as for ae_run.sh. Runs go to /tmp/p/NAME.
set -euo pipefail
name=$1; seed=$2; ae=$3; lat=$4; shift 4
cd "$(dirname "$0")/../.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} WANDB_MODE=offline OMP_NUM_THREADS=1
B=$PWD/.venv/bin; R=/tmp/p/$name; D=${PROBE_DATA:-/tmp/d1}/data; steps=${STEPS:-1700}
mkdir -p /tmp/p
read -r -a aeo <<< "${AE_OVERRIDES:-}"
if [ ! -f "$lat/manifest.json" ]; then
  $B/python -m trainer.cli.precompute data.urls=$D/train data.resolution=64 data.num_workers=1 autoencoder=demo_f8 \
    "${aeo[@]}" weights.autoencoder=$ae out=$lat batch_size=64 > /tmp/p/$name.precompute.log 2>&1
fi
$B/python -m trainer.cli.train experiment=demo_unet run_dir=$R max_steps=$steps data.urls=$lat \
  weights.autoencoder=$ae seed=$seed logger.progress=false checkpoint.every=$(( (steps + 2) / 3 )) \
  checkpoint.keep_last=4 "${aeo[@]}" "$@" > /tmp/p/$name.log 2>&1
$B/ldm-export $R/checkpoints --out $R/export >> /tmp/p/$name.log 2>&1
: > $R/curve.jsonl
for m in $(ls -d $R/checkpoints/step_* | sort | head -n -1) $R/export; do
  $B/ldm-sample $m --prompts-file $D/heldout_prompts.txt --num 4 --steps 50 --guidance ${GUIDANCE:-5} --batch-size 48 \
    --out $R/samples/$(basename $m) --device cpu >> /tmp/p/$name.log 2>&1
  $B/ldm-eval adherence $R/samples/$(basename $m) | $B/python -c "import json, sys; s = json.load(sys.stdin)
print(json.dumps({'model': '$(basename $m)', **{k: round(s[k], 3) for k in ('colour', 'shape', 'position', 'all')}}))" >> $R/curve.jsonl
done
echo "$name seed=$seed ae=$ae $*"; cat $R/curve.jsonl
