#!/usr/bin/env bash
# ae_run.sh NAME SEED [hydra overrides...]: the demo's autoencoder stage on one thread, then what issue 19 scores:
# held-out photos at 256 px (photos.json) and the adherence scorer on the 96 held-out shape reconstructions
# (ceiling.json). Data: the demo's data stage in $PROBE_DATA (bench/demo_probes/mkdata.py); DATA picks the
# autoencoder's shard folder in it (default: mixed). Runs go to /tmp/p/NAME.
set -euo pipefail
name=$1; seed=$2; shift 2
cd "$(dirname "$0")/../.."
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions} WANDB_MODE=offline OMP_NUM_THREADS=1
B=$PWD/.venv/bin; R=/tmp/p/$name; D=${PROBE_DATA:-/tmp/d1}/data
mkdir -p /tmp/p
$B/python -m trainer.cli.train experiment=demo_autoencoder run_dir=$R max_steps=${STEPS:-1100} \
  data.urls=$D/${DATA:-mixed} seed=$seed logger.progress=false "$@" > /tmp/p/$name.log 2>&1
$B/ldm-export $R/checkpoints --out $R/export >> /tmp/p/$name.log 2>&1
$B/ldm-eval recon $R/export $D/heldout_photos/*.png --size 256 > $R/photos.json
$B/python - <<PY > $R/ceiling.json
import json
from pathlib import Path
from trainer.demo.figures import reconstruction_adherence
print(json.dumps(reconstruction_adherence(Path("$R/export"), Path("$D/heldout"))))
PY
echo "$name seed=$seed $*"; cat $R/photos.json | head -c 600; echo; cat $R/ceiling.json
