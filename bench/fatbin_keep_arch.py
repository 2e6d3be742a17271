"""Shrink a CUDA library for carrying: zero the machine code of every GPU architecture but one.

    python bench/fatbin_keep_arch.py libonnxruntime_providers_cuda.so out.so 90

The library keeps its size and layout (every fatbin header stays, so nothing moves), but the cubins of
the other architectures become zeros, which compress to nothing: onnxruntime-gpu 1.31.1's CUDA provider
(284 MB; sm_75/80/86/89/90/120 cubins, no PTX) packs to about 52 MB with xz, under the 64 MB that reaches
a lent GPU machine. The driver only loads a cubin of the GPU's own major architecture (sm_90 on an H100
or H200), so the zeroed ones are never read there; on any other GPU this copy does not run.
Format: the .nv_fatbin section is a run of fatbins (magic 0xBA55ED50, u16 version, u16 header size, u64
size), each a run of entries (u16 kind, u16 version, u32 header size, u32 padded payload size, ..., u32
sm version at byte 28).
"""
from __future__ import annotations

import struct
import subprocess
import sys

MAGIC = 0xBA55ED50


def fatbin_section(path: str) -> tuple[int, int]:
    out = subprocess.run(["readelf", "-S", "-W", path], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if ".nv_fatbin" in line)
    fields = line.split("]", 1)[1].split()
    return int(fields[3], 16), int(fields[4], 16)


def keep_arch(data: bytearray, start: int, size: int, sm: int) -> tuple[int, int]:
    """Zero every entry whose architecture is not `sm`; (bytes zeroed, fatbins left without an `sm` cubin)."""
    pos, end, zeroed, missing = start, start + size, 0, 0
    while pos < end:
        magic, _, header, length = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:  # alignment padding between fatbins
            pos += 8
            continue
        entry, stop, found = pos + header, pos + header + length, False
        while entry < stop:
            _, _, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            if arch == sm:
                found = True
            else:
                data[entry + entry_header:entry + entry_header + padded] = bytes(padded)
                zeroed += padded
            entry += entry_header + padded
        missing += not found
        pos = stop
    return zeroed, missing


def main() -> None:
    src, dst, sm = sys.argv[1], sys.argv[2], int(sys.argv[3])
    data = bytearray(open(src, "rb").read())
    zeroed, missing = keep_arch(data, *fatbin_section(src), sm)
    open(dst, "wb").write(data)
    print(f"{dst}: zeroed {zeroed / 1e6:.0f} MB of other architectures' cubins; {missing} fatbins had no sm_{sm}")


if __name__ == "__main__":
    main()
