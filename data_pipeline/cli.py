"""``ldm-data``: make, check and stream WebDataset shards.

ldm-data synth --out DIR --num N --shard-size K --size 64 --seed S [--split train|heldout|all] [--labels]
ldm-data from-folder SRC --out DIR [--captions list.csv|.parquet] [--shard-size K] [--workers W]
ldm-data shuffle URLS... --out DIR [--shard-size K] [--seed S]   # merge sources, shuffle across shards
ldm-data validate URLS... [--json]
ldm-data stream URLS... [--resolution R --batch-size B --workers W --batches N]

Bad arguments are refused before any work, with exit code 2 and one line naming the flag and value; so
are shard URLs it will not open and sources with no usable image. A command that writes ``--out`` holds that
folder's lock (``.lock``) while it runs: a second job on the same folder is refused, naming the first.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .args import OneLineParser, int_at_least
from .errors import InputError, NoValidSampleError, ShardUrlError
from .lock import LOCK_FILE, FolderLock
from .samples import DEFAULT_MAX_PIXELS, ImageLimits
from .urls import expand_shards

POSITIVE = int_at_least(1)
COUNT = int_at_least(0)
LIMIT = int_at_least(0, " (0: no limit)")


def _synth(args: argparse.Namespace) -> int:
    from .synthetic import write_synthetic

    shards = write_synthetic(
        args.out,
        args.num,
        args.shard_size,
        args.size,
        args.seed,
        args.split,
        args.workers,
        labels=args.labels,
    )
    extra = " with class ids, boxes, masks and segmentation maps" if args.labels else ""
    print(f"wrote {args.num} {args.split} samples{extra} in {len(shards)} shards to {args.out}")
    return 0


def _from_folder(args: argparse.Namespace) -> int:
    from .shards import from_folder

    limits = ImageLimits(args.min_size, args.max_pixels)
    summary = from_folder(
        args.src, args.out, args.captions, args.shard_size, args.workers, args.prefix, limits
    )
    print(
        f"wrote {summary['samples']} samples in {summary['shards']} shards to {args.out}; "
        f"skipped {summary['skipped'] or 'none'}"
    )
    return 0


def _shuffle(args: argparse.Namespace) -> int:
    from .reshuffle import shuffle_shards

    summary = shuffle_shards(args.urls, args.out, args.shard_size, args.seed, args.prefix)
    print(
        f"wrote {summary['samples']} samples of {len(args.urls)} sources, shuffled, in {summary['shards']} "
        f"shards to {args.out}; skipped {summary['skipped'] or 'none'}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from .validate import validate_shards

    shards = expand_shards(args.urls, allow_pipe=args.allow_pipe)
    report = validate_shards(
        shards,
        ImageLimits(args.min_size, args.max_pixels),
        args.caption_key,
        args.workers,
        progress=not args.json,
    )
    if args.json:
        report.pop("per_shard")
        json.dump(report, sys.stdout, sort_keys=True)
        sys.stdout.write("\n")
    else:
        for r in report["per_shard"]:
            if r["invalid"]:
                print(f"{r['url']}: {r['valid']}/{r['total']} valid, invalid {r['invalid']}")
        print(
            f"{report['shards']} shards, {report['total']} samples: {report['valid']} valid, "
            f"{report['total'] - report['valid']} invalid {report['invalid'] or ''}"
        )
    return 0


def _stream(args: argparse.Namespace) -> int:
    from .images import ImageShards, ImageShardsConfig

    cfg = ImageShardsConfig(
        urls=args.urls,
        resolution=args.resolution,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shuffle_buffer=args.shuffle_buffer,
        allow_pipe=args.allow_pipe,
        resampled=args.resampled,
        epoch_samples=args.epoch_samples,
    )
    try:
        loader = ImageShards(cfg).loader(0, 1)
    except ValueError as exc:  # shards that cannot feed the workers, refused URLs: one line, no traceback
        print(f"ldm-data: {exc}", file=sys.stderr)
        return 2
    it = iter(loader)
    next(it)  # start-up (worker spawn, first block) is not throughput
    t0, n = time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(next(it)["caption"])
    dt = time.perf_counter() - t0
    print(
        f"streamed {n} samples in {dt:.2f}s: {n / dt:.0f} samples/s "
        f"({args.workers} workers, batch {args.batch_size}, {args.resolution}px)"
    )
    print("counters:", json.dumps(loader.counters(), sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="ldm-data", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="write the synthetic captioned-shapes data set")
    s.add_argument("--out", required=True)
    s.add_argument("--num", type=POSITIVE, required=True)
    s.add_argument("--shard-size", type=POSITIVE, default=1000)
    s.add_argument("--size", type=int_at_least(16), default=64)
    s.add_argument("--seed", type=COUNT, default=0)
    s.add_argument("--split", default="train", choices=["train", "heldout", "all"])
    s.add_argument("--workers", type=POSITIVE, default=1)
    s.add_argument(
        "--labels", action="store_true", help="also class ids, boxes, masks and segmentation maps (all modes)"
    )
    s.set_defaults(fn=_synth)

    f = sub.add_parser("from-folder", help="pack an image folder (name.jpg + name.txt) or a CSV/parquet list")
    f.add_argument("src")
    f.add_argument("--out", required=True)
    f.add_argument("--captions", help="CSV or parquet with path and caption columns (paths relative to SRC)")
    f.add_argument("--shard-size", type=POSITIVE, default=1000)
    f.add_argument("--workers", type=POSITIVE, default=4)
    f.add_argument("--prefix", default="shard")
    f.add_argument("--min-size", type=COUNT, default=0)
    f.add_argument("--max-pixels", type=LIMIT, default=DEFAULT_MAX_PIXELS)
    f.set_defaults(fn=_from_folder)

    h = sub.add_parser(
        "shuffle",
        help="merge shard sets into new shards, samples shuffled across all of them (the loader "
        "shuffles within a shard: sources must be mixed before training)",
    )
    h.add_argument("urls", nargs="+", help="each a shard folder, pattern or list: one source")
    h.add_argument("--out", required=True)
    h.add_argument("--shard-size", type=POSITIVE, default=1000)
    h.add_argument("--seed", type=COUNT, default=0)
    h.add_argument("--prefix", default="shard")
    h.set_defaults(fn=_shuffle)

    v = sub.add_parser("validate", help="read every sample and count invalid ones by reason")
    v.add_argument("urls", nargs="+", help="shard paths, brace patterns, globs or folders")
    v.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    v.add_argument("--min-size", type=COUNT, default=16, help="shorter side below this is 'too_small'")
    v.add_argument("--max-pixels", type=LIMIT, default=DEFAULT_MAX_PIXELS)
    v.add_argument("--caption-key", default="txt")
    v.add_argument("--workers", type=POSITIVE, default=1)
    v.add_argument("--allow-pipe", action="store_true")
    v.set_defaults(fn=_validate)

    t = sub.add_parser("stream", help="stream batches through the training loader and print throughput")
    t.add_argument("urls", nargs="+")
    t.add_argument("--resolution", type=POSITIVE, default=64)
    t.add_argument("--batch-size", type=POSITIVE, default=32)
    t.add_argument("--workers", type=int_at_least(0, " (0: load in the main process)"), default=2)
    t.add_argument("--batches", type=POSITIVE, default=50)
    t.add_argument("--shuffle-buffer", type=int_at_least(1, " (1: no shuffling)"), default=1000)
    t.add_argument("--resampled", action="store_true", help="needs --epoch-samples")
    t.add_argument("--epoch-samples", type=COUNT, default=0)
    t.add_argument("--allow-pipe", action="store_true")
    t.set_defaults(fn=_stream)
    for sp in (s, f, h, v, t):
        sp.set_defaults(parser=sp)
    return p


def _check(args: argparse.Namespace) -> None:
    """Refuse combinations of flags that no single flag's type can check."""
    if args.cmd == "stream" and args.resampled and args.epoch_samples < 1:
        args.parser.error(f"argument --epoch-samples: --resampled needs it >= 1, got {args.epoch_samples}")


def _locked(args: argparse.Namespace) -> int:
    """Run a command that writes ``--out`` holding that folder's lock: two jobs writing one folder would
    interleave shards (a second shuffle would delete the first's work). A failed command leaves no folder
    it made behind, lock file included."""
    out = Path(args.out).absolute()
    made = next((p for p in reversed([out, *out.parents]) if not p.exists()), None)
    lock = FolderLock(out, f"ldm-data {args.cmd} job")
    ok = False
    try:
        rc = args.fn(args)
        ok = rc == 0
        return rc
    finally:
        lock.release()
        if not ok and made is not None and [p.name for p in out.iterdir()] == [LOCK_FILE]:
            lock.path.unlink()
            for p in [out, *out.parents]:
                p.rmdir()
                if p == made:
                    break


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    _check(args)
    try:
        if getattr(args, "out", None) is None:
            return args.fn(args)
        return _locked(args)
    except (
        FileNotFoundError,
        ShardUrlError,
        NoValidSampleError,
        InputError,
    ) as exc:  # ShardNotFoundError too
        print(f"ldm-data: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
