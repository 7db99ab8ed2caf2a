"""Regenerate calibration/bundled/: procedural portraits and espeak-ng speech, license-clean (CC0).

Needs Pillow and espeak-ng (apt-get install espeak-ng). The committed files are the output of:
    python calibration/make_bundled.py
Portraits are drawn from seeded shapes (skin tone, face shape, hair, eyes, mouth, background); speech is
espeak-ng reading short lines with varied voices and speeds, resampled to 16 kHz mono WAV.
"""
from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
OUT = HERE / "bundled"
SIZE = (384, 704)  # W x H, the aspect of Live Avatar's default 704*384 portrait
LINES = [
    ("en-us", 150, "Hello everyone, welcome back to the channel. Today we talk about quantization."),
    ("en-gb", 170, "The weather this morning is calm and bright, a good day for a walk by the river."),
    ("en-us+f3", 140, "Please remember to save your work often, and keep a backup in a second place."),
    ("en-gb+m3", 185, "Numbers like three hundred and forty two are easy to say, but hard to remember."),
    ("en-us+f2", 160, "I think the most important thing is to listen carefully before you answer."),
    ("en-us+m7", 130, "Let me explain how the model turns sound into motion, one frame at a time."),
    ("en-gb+f4", 175, "Good evening. Here are tonight's headlines, and then the sports results."),
    ("en-us+m2", 155, "Thank you for watching. If you liked this video, share it with a friend."),
]
PROMPTS = [
    "A person is speaking to the camera in a bright studio.",
    "A news presenter talks calmly, looking straight ahead.",
    "A young woman explains something with gentle head movements.",
    "A man reads numbers aloud, seated in front of a plain wall.",
    "A teacher answers a question, smiling slightly.",
    "A narrator describes a process while nodding.",
    "An anchor presents the evening headlines.",
    "A streamer thanks the audience at the end of a video.",
]


def portrait(seed: int) -> Image.Image:
    rng = random.Random(seed)
    w, h = SIZE
    bg = tuple(rng.randint(40, 220) for _ in range(3))
    img = Image.new("RGB", SIZE, bg)
    d = ImageDraw.Draw(img)
    for y in range(0, h, 8):  # a soft vertical gradient so the background is not flat
        shade = tuple(max(0, min(255, c + (y - h // 2) // 12)) for c in bg)
        d.rectangle([0, y, w, y + 8], fill=shade)
    skin = rng.choice([(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (92, 51, 23)])
    hair = rng.choice([(20, 20, 20), (90, 60, 30), (200, 170, 90), (120, 40, 20), (160, 160, 160)])
    cx, cy = w // 2, int(h * 0.42)
    fw, fh = rng.randint(110, 140), rng.randint(150, 185)
    d.ellipse([cx - 170, int(h * 0.72), cx + 170, h + 200], fill=tuple(rng.randint(30, 200) for _ in range(3)))
    d.rectangle([cx - 40, cy + fh - 30, cx + 40, int(h * 0.76)], fill=skin)  # neck
    d.ellipse([cx - fw - 12, cy - fh - 25, cx + fw + 12, cy + fh // 3], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=skin)
    eye_y, dx = cy - fh // 5, fw // 2
    iris = rng.choice([(60, 40, 20), (40, 90, 160), (50, 120, 60)])
    for ex in (cx - dx, cx + dx):
        d.ellipse([ex - 18, eye_y - 10, ex + 18, eye_y + 10], fill=(250, 250, 250))
        d.ellipse([ex - 8, eye_y - 8, ex + 8, eye_y + 8], fill=iris)
        d.line([ex - 22, eye_y - 24, ex + 22, eye_y - 28], fill=hair, width=6)
    d.polygon([(cx, cy - 10), (cx - 14, cy + 40), (cx + 14, cy + 40)], fill=tuple(max(0, c - 30) for c in skin))
    mouth_open = rng.randint(4, 18)
    d.ellipse([cx - 38, cy + 70, cx + 38, cy + 70 + mouth_open], fill=(150, 40, 50))
    return img


def speech(voice: str, speed: int, text: str, path: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True)
        sys.path.insert(0, str(HERE.parent))
        from qavatar.pipeline.media import load_audio  # decode + resample to 16 kHz mono

        wave = load_audio(raw)
    import wave as wavmod

    import numpy as np

    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2")
    with wavmod.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(16000)
        f.writeframes(pcm.tobytes())


def main() -> None:
    (OUT / "images").mkdir(parents=True, exist_ok=True)
    (OUT / "audio").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i, ((voice, speed, text), prompt) in enumerate(zip(LINES, PROMPTS)):
        name = f"p{i:02d}"
        image, audio = OUT / "images" / f"{name}.png", OUT / "audio" / f"{name}.wav"
        portrait(1000 + i).save(image, optimize=True)
        speech(voice, speed, text, audio)
        pairs.append({"name": name, "image": f"images/{name}.png", "audio": f"audio/{name}.wav", "prompt": prompt,
                      "transcript": text,
                      "sha256": {k: hashlib.sha256(p.read_bytes()).hexdigest() for k, p in (("image", image),
                                                                                              ("audio", audio))}})
    manifest = {"format": "qavatar-calibration/1", "name": "qavatar-bundled-v1",
                "license": "CC0-1.0: procedural portraits and espeak-ng speech made by calibration/make_bundled.py",
                "pairs": pairs}
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(pairs)} pairs to {OUT}")


if __name__ == "__main__":
    main()
