"""Build a calibration set from your own files.

    python calibration/build_set.py OUT_DIR --pair face1.jpg speech1.wav "optional prompt" \
                                            --pair face2.png speech2.mp3
    python calibration/build_set.py OUT_DIR --csv pairs.csv      # columns: image,audio[,prompt]

Each file is checked (the image must decode, the audio must decode and be non-empty), copied into OUT_DIR,
and hashed into OUT_DIR/manifest.json. Use it with `qavatar quantize CKPT --calibration OUT_DIR`.
A few dozen pairs that look like your use (framing, lighting, voices, languages) beat hundreds of random ones.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qavatar.pipeline.media import MediaError, load_audio, load_image  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--pair", nargs="+", action="append", default=[], metavar="IMAGE AUDIO [PROMPT]")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    rows = [p for p in args.pair]
    if args.csv:
        with open(args.csv, newline="") as f:
            rows += [[r["image"], r["audio"], r.get("prompt", "")] for r in csv.DictReader(f)]
    if not rows:
        ap.error("give at least one --pair IMAGE AUDIO [PROMPT] or --csv")
    if args.out.exists():
        ap.error(f"{args.out} exists; choose a new directory")
    tmp = args.out.with_name(args.out.name + ".partial")
    (tmp / "images").mkdir(parents=True)
    (tmp / "audio").mkdir()
    pairs = []
    try:
        for i, row in enumerate(rows):
            if len(row) < 2:
                raise SystemExit(f"pair {i}: needs IMAGE and AUDIO")
            image, audio = Path(row[0]), Path(row[1])
            name = f"p{i:03d}"
            try:
                load_image(image)
                load_audio(audio)
            except MediaError as e:
                raise SystemExit(f"{name}: {e}")
            dst_i = tmp / "images" / f"{name}{image.suffix.lower()}"
            dst_a = tmp / "audio" / f"{name}{audio.suffix.lower()}"
            shutil.copyfile(image, dst_i)
            shutil.copyfile(audio, dst_a)
            pairs.append({"name": name, "image": dst_i.relative_to(tmp).as_posix(),
                          "audio": dst_a.relative_to(tmp).as_posix(), "prompt": row[2] if len(row) > 2 else "",
                          "sha256": {"image": hashlib.sha256(dst_i.read_bytes()).hexdigest(),
                                     "audio": hashlib.sha256(dst_a.read_bytes()).hexdigest()}})
        manifest = {"format": "qavatar-calibration/1", "name": args.name or args.out.name, "pairs": pairs}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.rename(args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {len(pairs)} pairs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
