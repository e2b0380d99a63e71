#!/usr/bin/env python3
"""Cut the committed sample frames out of the CC0 texture photographs.

Standard library only (zlib + struct), so it runs on a bare machine. Reads the 8-bit
greyscale brick.png from ../shared/data/textures/ and writes:

- tests/fixtures/: 64x64 crops, clean and with a pasted synthetic defect plus its mask;
- data/brick/: the demo dataset in the MVTec layout. train/good holds 16 crops of 128x128
  from the left three quarters of the photograph, 2 of them with pasted defects (the
  contamination retrain must be robust to, 12.5 %); test/{good,scratch,stain} hold 64x64
  crops from the right quarter, never seen in training, with ground_truth masks;
- data/brick/line/: full-resolution "line camera" frames, 128x256 from the right quarter
  (larger than one 64-pixel tile: the demo model inspects them in tiles at native scale),
  one clean, one with a small scratch, one with a small stain; masks in data/brick/line-masks/.

Usage: scripts/make-sample-frames.py [textures-dir] [repo-root]
"""
import os
import struct
import sys
import zlib


def read_grey_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour == 0 and interlace == 0, f"{path}: need 8-bit grey, non-interlaced"
    raw = zlib.decompress(idat)
    rows, prev, stride = [], bytearray(width), width + 1
    for y in range(height):
        kind, line = raw[y * stride], bytearray(raw[y * stride + 1:(y + 1) * stride])
        for x in range(width):
            a = line[x - 1] if x else 0
            b, c = prev[x], (prev[x - 1] if x else 0)
            if kind == 1:
                line[x] = (line[x] + a) & 255
            elif kind == 2:
                line[x] = (line[x] + b) & 255
            elif kind == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return rows


def write_grey_png(path, rows):
    height, width = len(rows), len(rows[0])
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    tmp = path + ".tmp"
    open(tmp, "wb").write(png)
    os.replace(tmp, path)


def crop(rows, x0, y0, size=64):
    return [bytearray(r[x0:x0 + size]) for r in rows[y0:y0 + size]]


def scratch(frame, x0=14, y0=18, length=36):
    """A dark diagonal scratch, 2 px wide."""
    mask = [bytearray(len(frame[0])) for _ in frame]
    for t in range(length):
        for w in range(2):
            x, y = x0 + t, y0 + (x0 + t) // 2 + w
            frame[y][x] = 20
            mask[y][x] = 255
    return frame, mask


def stain(frame, cx=40, cy=24, radius=6):
    """A bright round stain."""
    mask = [bytearray(len(frame[0])) for _ in frame]
    for y in range(len(frame)):
        for x in range(len(frame[0])):
            if (x - cx) ** 2 + (y - cy) ** 2 <= radius * radius:
                frame[y][x] = 235
                mask[y][x] = 255
    return frame, mask


def demo_dataset(brick, root):
    base = os.path.join(root, "data", "brick")
    dirs = {d: os.path.join(base, d) for d in
            ["train/good", "test/good", "test/scratch", "test/stain", "ground_truth/scratch", "ground_truth/stain"]}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    # Training: 16 crops of 128x128 on a 4x4 grid over x in [0, 384), y in [0, 512).
    n = 0
    for gy in range(4):
        for gx in range(4):
            x0, y0 = gx * 85, gy * 128
            frame = crop(brick, x0, y0, 128)
            if n == 5:
                frame, _ = scratch(frame, 30, 40, 60)
            elif n == 11:
                frame, _ = stain(frame, 70, 60, 10)
            write_grey_png(os.path.join(dirs["train/good"], f"{n:03d}.png"), frame)
            n += 1
    # Test: 64x64 crops from x in [384, 512), unseen in training.
    for i, (x0, y0) in enumerate([(400, 10), (440, 150), (392, 300), (430, 420)]):
        write_grey_png(os.path.join(dirs["test/good"], f"{i:03d}.png"), crop(brick, x0, y0))
    for i, (x0, y0, sx, sy) in enumerate([(384, 70, 14, 18), (420, 220, 10, 30), (400, 360, 20, 8)]):
        frame, mask = scratch(crop(brick, x0, y0), sx, sy)
        write_grey_png(os.path.join(dirs["test/scratch"], f"{i:03d}.png"), frame)
        write_grey_png(os.path.join(dirs["ground_truth/scratch"], f"{i:03d}_mask.png"), mask)
    for i, (x0, y0, cx, cy, r) in enumerate([(410, 100, 40, 24, 6), (444, 250, 20, 40, 8), (390, 440, 32, 32, 5)]):
        frame, mask = stain(crop(brick, x0, y0), cx, cy, r)
        write_grey_png(os.path.join(dirs["test/stain"], f"{i:03d}.png"), frame)
        write_grey_png(os.path.join(dirs["ground_truth/stain"], f"{i:03d}_mask.png"), mask)


def line_frames(brick, root):
    base = os.path.join(root, "data", "brick")
    frames, masks = os.path.join(base, "line"), os.path.join(base, "line-masks")
    os.makedirs(frames, exist_ok=True)
    os.makedirs(masks, exist_ok=True)
    tall = lambda x0, y0: [bytearray(r[x0:x0 + 128]) for r in brick[y0:y0 + 256]]
    write_grey_png(os.path.join(frames, "000_good.png"), tall(384, 0))
    frame, mask = scratch(tall(384, 256), 70, 150, 24)
    write_grey_png(os.path.join(frames, "001_scratch.png"), frame)
    write_grey_png(os.path.join(masks, "001_scratch.png"), mask)
    frame, mask = stain(tall(384, 128), 30, 200, 4)
    write_grey_png(os.path.join(frames, "002_stain.png"), frame)
    write_grey_png(os.path.join(masks, "002_stain.png"), mask)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    textures = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "shared", "data", "textures")
    root = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..")
    out = os.path.join(root, "tests", "fixtures")
    os.makedirs(out, exist_ok=True)
    brick = read_grey_png(os.path.join(textures, "brick.png"))
    demo_dataset(brick, root)
    line_frames(brick, root)
    write_grey_png(os.path.join(out, "brick_clean.png"), crop(brick, 0, 0))
    write_grey_png(os.path.join(out, "brick_clean_2.png"), crop(brick, 200, 300))
    frame, mask = scratch(crop(brick, 64, 128))
    write_grey_png(os.path.join(out, "brick_scratch.png"), frame)
    write_grey_png(os.path.join(out, "brick_scratch_mask.png"), mask)
    frame, mask = stain(crop(brick, 320, 64))
    write_grey_png(os.path.join(out, "brick_stain.png"), frame)
    write_grey_png(os.path.join(out, "brick_stain_mask.png"), mask)


if __name__ == "__main__":
    main()
