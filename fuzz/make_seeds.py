#!/usr/bin/env python3
"""Writes seed inputs for the fuzz targets: guest memory images holding
well-formed requests, which the fuzzer then mutates."""
import os, struct

here = os.path.dirname(os.path.abspath(__file__))

def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)

def image(queues, extra):
    mem = bytearray(0x4000)
    for (dt, avail, descs) in queues:
        for i, d in enumerate(descs):
            mem[dt + 16 * i: dt + 16 * i + 16] = d
        heads = [0] if descs else []
        mem[avail:avail + 4] = struct.pack("<HH", 0, len(heads))
        for i, h in enumerate(heads):
            mem[avail + 4 + 2 * i: avail + 6 + 2 * i] = struct.pack("<H", h)
    for addr, data in extra:
        mem[addr:addr + len(data)] = data
    return bytes(mem)

def blk(flags, req_type, sector, data_len, data_flags):
    hdr = struct.pack("<IIQ", req_type, 0, sector)
    descs = [desc(0x2000, 16, 1, 1), desc(0x2100, data_len, 1 | data_flags, 2), desc(0x3000, 1, 2, 0)]
    img = bytearray(image([(0x0, 0x100, descs)], [(0x2000, hdr)]))
    img[0] = flags | (img[0] & 0)  # byte 0 doubles as the flags byte
    return bytes(img)

seeds = {
    "read": blk(0, 0, 0, 512, 2),
    "write": blk(2, 1, 1, 512, 0),
    "ro-write": blk(1, 1, 1, 512, 0),
    "flush": blk(2, 4, 0, 512, 2),
    "getid": blk(0, 8, 0, 20, 2),
}
for name, data in seeds.items():
    open(os.path.join(here, "seeds", "virtio_blk", name), "wb").write(data)

frame = bytes(12) + b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x08\x00" + b"x" * 46
tx = image([(0x0, 0x100, []), (0x1000, 0x1100, [desc(0x2000, 12, 1, 1), desc(0x2100, len(frame) - 12, 0, 0)])],
           [(0x2000, frame[:12]), (0x2100, frame[12:])])
open(os.path.join(here, "seeds", "virtio_net_tx", "frame"), "wb").write(tx)
