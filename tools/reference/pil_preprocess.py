#!/usr/bin/env python3
"""Pillow reference for LlmSnp's image pipeline (src/LlmSnp/Data/Images).

Needs only the standard library and Pillow (Debian: apt-get install python3-pil).
The C# test suite does not run this; it reads the JSON fixtures this script wrote
into tests/fixtures/images/.

  pil_preprocess.py resize IMAGE WIDTH HEIGHT
      Pillow's Image.resize((WIDTH, HEIGHT), Image.BICUBIC) of IMAGE converted to RGB,
      as JSON {"width", "height", "pixels": [HWC bytes]}.
  pil_preprocess.py preprocess IMAGE [--shortest-edge N | --size H W] [--crop H W]
                    [--mean R G B] [--std R G B] [--rescale F] [--summary]
      The ViT/DeiT-style pipeline (resize the shorter side to N with the long side
      int(N * long / short), bicubic; torchvision CenterCrop; rescale; normalize) as CHW
      float32 values in JSON; --summary prints sums and 20 sampled values instead.
  pil_preprocess.py decode IMAGE [--raw OUT]
      Decoded RGB (Image.open(..).convert("RGB")) summary; --raw writes the HWC bytes.
  pil_preprocess.py fixtures OUTDIR JPEG
      Regenerates tests/fixtures/images/: the synthetic PNG, its resize/preprocess
      goldens, a copy of JPEG and its decode/preprocess summary.
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import struct
import sys

from PIL import Image, features

# Fixed CHW positions sampled by --summary (channel, y, x as fractions of the size).
SAMPLE_FRACTIONS = [
    (0, 0.0, 0.0), (1, 0.0, 0.999), (2, 0.999, 0.0), (0, 0.999, 0.999), (1, 0.5, 0.5),
    (2, 0.25, 0.75), (0, 0.75, 0.25), (1, 0.1, 0.9), (2, 0.33, 0.66), (0, 0.66, 0.33),
    (1, 0.9, 0.1), (2, 0.45, 0.55), (0, 0.2, 0.2), (1, 0.8, 0.8), (2, 0.6, 0.4),
    (0, 0.4, 0.6), (1, 0.05, 0.5), (2, 0.5, 0.05), (0, 0.95, 0.5), (1, 0.5, 0.95),
]


def f32(x):
    """Round a Python float (double) to the nearest float32, as C#'s (float) cast does."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def load_rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def resize_shortest_edge(img, n):
    w, h = img.size
    short, long_ = (w, h) if w <= h else (h, w)
    new_short, new_long = n, int(n * long_ / short)   # torchvision/timm/HF: truncation
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize(size, Image.BICUBIC)


def center_crop_offsets(h, w, ch, cw):
    """torchvision.transforms.functional.center_crop: pad first where the crop is larger."""
    def one(n, c):
        if c > n:
            return -((c - n) // 2)
        return int(round((n - c) / 2.0))   # Python round: half to even
    return one(h, ch), one(w, cw)


def preprocess(img, shortest_edge=None, size=None, crop=None, rescale=1 / 255,
               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
    if shortest_edge is not None:
        img = resize_shortest_edge(img, shortest_edge)
    elif size is not None:
        img = img.resize((size[1], size[0]), Image.BICUBIC)
    w, h = img.size
    px = img.tobytes()
    if crop is not None:
        ch, cw = crop
        top, left = center_crop_offsets(h, w, ch, cw)
    else:
        ch, cw, top, left = h, w, 0, 0
    mean = [f32(m) for m in mean]
    std = [f32(s) for s in std]
    out = []
    for c in range(3):
        for y in range(ch):
            sy = y + top
            for x in range(cw):
                sx = x + left
                v = px[(sy * w + sx) * 3 + c] if 0 <= sy < h and 0 <= sx < w else 0
                out.append(f32((v * rescale - mean[c]) / std[c]))
    return ch, cw, out


def sample_positions(ch, cw):
    return [[c, min(ch - 1, int(fy * ch)), min(cw - 1, int(fx * cw))] for c, fy, fx in SAMPLE_FRACTIONS]


def summary(ch, cw, vals):
    pos = sample_positions(ch, cw)
    return {
        "height": ch, "width": cw,
        "sum": math.fsum(vals), "abs_sum": math.fsum(abs(v) for v in vals),
        "positions": pos,
        "values": [vals[(c * ch + y) * cw + x] for c, y, x in pos],
    }


def decode_summary(img):
    b = img.tobytes()
    w, h = img.size
    return {
        "width": w, "height": h, "byte_sum": sum(b), "sha256": hashlib.sha256(b).hexdigest(),
        "pixels_at": [[y, x, list(b[(y * w + x) * 3:(y * w + x) * 3 + 3])]
                      for y, x in [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (h // 3, 2 * w // 3), (2 * h // 3, w // 5)]],
    }


def synthetic_png(path, w=37, h=23):
    """Varied colours: gradients, a saturated checker band, hard edges and LCG noise."""
    img = Image.new("RGB", (w, h))
    seed = 12345
    px = []
    for y in range(h):
        for x in range(w):
            seed = (seed * 1103515245 + 12345) & 0x7FFFFFFF
            noise = (seed >> 16) & 0xFF
            if y < 6:
                p = ((x * 255) // (w - 1), (y * 255) // 5, 255 - (x * 7) % 256)
            elif y < 12:
                on = (x // 3 + y // 3) % 2 == 0
                p = (255, 0, 255) if on else (0, 255, 0)
            elif y < 17:
                p = (noise, (noise * 3 + x) & 0xFF, (x * y * 5) & 0xFF)
            else:
                p = (0 if x < w // 2 else 255, 128, 255 if x % 5 == 0 else 0)
            px.append(p)
    img.putdata(px)
    img.save(path, format="PNG", optimize=True)


def pixels_json(img):
    return {"width": img.size[0], "height": img.size[1], "pixels": list(img.tobytes())}


def make_fixtures(outdir, jpeg):
    os.makedirs(outdir, exist_ok=True)
    png = os.path.join(outdir, "synthetic-37x23.png")
    synthetic_png(png)
    src = load_rgb(png)
    gold = {
        "generator": "tools/reference/pil_preprocess.py fixtures",
        "pillow": Image.__version__,
        "source": pixels_json(src),
        "resize": [],
        "preprocess": [],
    }
    for w, h in [(16, 10), (53, 31), (50, 12), (37, 23), (37, 9), (11, 23), (1, 1)]:
        r = src.resize((w, h), Image.BICUBIC)
        gold["resize"].append(pixels_json(r))
    for name, se, crop, mean, std in [
        ("vit_se20_crop16", 20, (16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ("imagenet_se21_crop18", 21, (18, 18), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]:
        ch, cw, vals = preprocess(src, shortest_edge=se, crop=crop, mean=mean, std=std)
        gold["preprocess"].append({"name": name, "shortest_edge": se, "crop": list(crop),
                                   "mean": list(mean), "std": list(std),
                                   "height": ch, "width": cw, "chw": vals})
    with open(os.path.join(outdir, "synthetic-37x23.pil.json"), "w") as f:
        json.dump(gold, f, separators=(",", ":"))

    jname = os.path.basename(jpeg)
    dst = os.path.join(outdir, jname)
    shutil.copyfile(jpeg, dst)
    img = load_rgb(dst)
    ch, cw, vals = preprocess(img, shortest_edge=248, crop=(224, 224))
    jgold = {
        "generator": "tools/reference/pil_preprocess.py fixtures",
        "pillow": Image.__version__, "libjpeg": features.version("jpg"),
        "file": jname, "source": os.path.abspath(jpeg),
        "decode": decode_summary(img),
        "preprocess": dict(shortest_edge=248, crop=[224, 224], mean=[0.5] * 3, std=[0.5] * 3,
                           **summary(ch, cw, vals)),
    }
    with open(os.path.join(outdir, os.path.splitext(jname)[0] + ".pil.json"), "w") as f:
        json.dump(jgold, f, indent=1)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resize"); r.add_argument("image"); r.add_argument("width", type=int); r.add_argument("height", type=int)
    p = sub.add_parser("preprocess"); p.add_argument("image")
    p.add_argument("--shortest-edge", type=int); p.add_argument("--size", type=int, nargs=2)
    p.add_argument("--crop", type=int, nargs=2); p.add_argument("--rescale", type=float, default=1 / 255)
    p.add_argument("--mean", type=float, nargs=3, default=[0.5] * 3); p.add_argument("--std", type=float, nargs=3, default=[0.5] * 3)
    p.add_argument("--summary", action="store_true")
    d = sub.add_parser("decode"); d.add_argument("image"); d.add_argument("--raw")
    fx = sub.add_parser("fixtures"); fx.add_argument("outdir"); fx.add_argument("jpeg")
    a = ap.parse_args(argv)
    if a.cmd == "resize":
        json.dump(pixels_json(load_rgb(a.image).resize((a.width, a.height), Image.BICUBIC)), sys.stdout)
    elif a.cmd == "preprocess":
        ch, cw, vals = preprocess(load_rgb(a.image), a.shortest_edge, a.size, a.crop, a.rescale, a.mean, a.std)
        json.dump(summary(ch, cw, vals) if a.summary else {"height": ch, "width": cw, "chw": vals}, sys.stdout)
    elif a.cmd == "decode":
        img = load_rgb(a.image)
        if a.raw:
            with open(a.raw, "wb") as f:
                f.write(img.tobytes())
        json.dump(decode_summary(img), sys.stdout)
    else:
        make_fixtures(a.outdir, a.jpeg)
    if a.cmd != "fixtures":
        sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
