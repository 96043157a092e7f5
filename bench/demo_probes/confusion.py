"""Per-shape confusion of the scorer on an autoencoder export's reconstructions of the held-out shapes.

python bench/demo_probes/confusion.py EXPORT HELDOUT_SHARDS
"""

import sys
from collections import Counter
from pathlib import Path

from trainer.demo.figures import heldout_images
from trainer.evaluate.adherence import parse_prompt, read_image
from trainer.evaluate.cli import load_autoencoder, to_tensor
from trainer.evaluate.recon import reconstruct
from trainer.inference.images import to_uint8

images, prompts = heldout_images(Path(sys.argv[2]))
rec = to_uint8(reconstruct(load_autoencoder(Path(sys.argv[1])), to_tensor(images)))
conf = Counter()
orig = Counter()
for img, r, p in zip(images, rec, prompts, strict=True):
    want = parse_prompt(p)[1]
    conf[(want, read_image(r).shape)] += 1
    orig[(want, read_image(img).shape)] += 1
print("recon:", sorted(conf.items()))
print("orig :", sorted(orig.items()))
