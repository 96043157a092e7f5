"""Which shape the scorer reads in generated samples, per prompted shape.

python bench/demo_probes/sample_confusion.py SAMPLES_FOLDER   # as ldm-sample writes it
"""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from trainer.evaluate.adherence import parse_prompt, read_image

folder = Path(sys.argv[1])
conf = Counter()
for r in json.loads((folder / "prompts.json").read_text()):
    got = read_image(np.asarray(Image.open(folder / r["file"]).convert("RGB")))
    conf[(parse_prompt(r["prompt"])[1], got.shape)] += 1
print(sorted(conf.items()))
