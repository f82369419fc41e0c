"""Image files users really send that Pillow's defaults mishandle, written byte by byte."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image

#: A side whose square is over twice Pillow's pixel limit: Image.open itself refuses it.
BOMB_SIDE = 14_000
assert BOMB_SIDE ** 2 > 2 * Image.MAX_IMAGE_PIXELS


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_decompression_bomb(path: Path) -> None:
    """A valid 1-bit black PNG of BOMB_SIDE² pixels: about 25 kB on disk, 196 MB once decoded."""
    row = b"\x00" * (1 + (BOMB_SIDE + 7) // 8)  # filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(9)
    pixels = b"".join(compressor.compress(row) for _ in range(BOMB_SIDE)) + compressor.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 1, 0, 0, 0, 0)  # 1 bit, grey
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", pixels)
                     + _chunk(b"IEND", b""))
