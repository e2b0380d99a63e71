#!/usr/bin/env python3
"""Cut the committed sample frames out of the CC0 texture photographs.

Standard library only (zlib + struct), so it runs on a bare machine. Reads an 8-bit
greyscale PNG from ../shared/data/textures/, writes 64x64 crops to tests/fixtures/:
clean crops, and crops with a pasted synthetic defect plus its exact binary mask.

Usage: scripts/make-sample-frames.py [textures-dir] [out-dir]
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


def scratch(frame):
    """A dark diagonal scratch, 2 px wide."""
    mask = [bytearray(len(frame[0])) for _ in frame]
    for t in range(14, 50):
        for w in range(2):
            x, y = t, t // 2 + 18 + w
            frame[y][x] = 20
            mask[y][x] = 255
    return frame, mask


def stain(frame):
    """A bright round stain, radius 6."""
    mask = [bytearray(len(frame[0])) for _ in frame]
    for y in range(len(frame)):
        for x in range(len(frame[0])):
            if (x - 40) ** 2 + (y - 24) ** 2 <= 36:
                frame[y][x] = 235
                mask[y][x] = 255
    return frame, mask


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    textures = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "shared", "data", "textures")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(here, "..", "tests", "fixtures")
    os.makedirs(out, exist_ok=True)
    brick = read_grey_png(os.path.join(textures, "brick.png"))
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
