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

# The targets below read their input as a sequence of operations (see the
# opcode `match` in each); these seeds are short, well-formed sessions.

def u8(v): return struct.pack("<B", v)
def u16(v): return struct.pack("<H", v)
def u32(v): return struct.pack("<I", v)
def u64(v): return struct.pack("<Q", v)

def write_seeds(target, seeds):
    d = os.path.join(here, "seeds", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        open(os.path.join(d, name), "wb").write(data)

# --- ioapic: first byte the APIC ID, then operations.
def io_program(pin, low, dest): return u8(4) + u8(pin) + u32(low) + u8(dest)
def io_pulse(pin): return u8(5) + u8(pin)
def io_level(pin, up, via_line=True): return u8(6) + u8(pin | (0x80 if up else 0) | (0x40 if via_line else 0))
def io_eoi(vector): return u8(7) + u8(0) + u8(vector)
def io_reg_read(reg): return u8(3) + u8(reg)
def io_reg_write(reg, v): return u8(2) + u8(reg) + u32(v)
def io_bus_read(off, width_sel): return u8(1) + u16(off) + u8(width_sel)
def io_bus_write(off, width_sel, v): return u8(0) + u16(off) + u8(width_sel) + u64(v) + bytes(8)

LEVEL, MASKED = 1 << 15, 1 << 16
write_seeds("ioapic", {
    "ident": u8(2) + io_reg_read(0) + io_reg_read(1) + io_reg_read(2) + io_reg_write(0, 0x0f000000) + io_reg_read(0),
    "edge": u8(0) + io_program(4, 0x34, 3) + io_pulse(4) + io_pulse(4) + io_level(4, True) + io_level(4, False),
    "level-eoi": u8(0) + io_program(9, 0x41 | LEVEL, 0) + io_level(9, True) + io_level(9, True)
                 + io_eoi(0x42) + io_eoi(0x41) + io_level(9, False) + io_eoi(0x41) + io_reg_read(0x10 + 18),
    "unmask-asserted": u8(0) + io_level(5, True) + io_program(5, 0x50 | LEVEL, 0) + io_program(5, 0x50 | LEVEL | MASKED, 0)
                       + io_eoi(0x50) + io_program(5, 0x50 | LEVEL, 0),
    "logical-lowest": u8(1) + io_program(2, 0x61 | (1 << 8) | (1 << 11), 0x0f) + io_pulse(2) + io_program(2, 0x61 | MASKED, 0) + io_pulse(2),
    "odd-access": u8(0) + io_bus_write(0x10, 4, 0x0201) + io_bus_write(0x20, 0, 7) + io_bus_read(0x10, 5)
                  + io_bus_read(0xffe, 0) + io_bus_write(0x1000, 0, 1) + io_pulse(24) + io_level(31, True),
    "sink-fails": u8(0) + u8(8) + u8(1) + io_program(7, 0x70 | LEVEL, 0) + io_level(7, True) + u8(8) + u8(0) + io_eoi(0x70),
})

# --- virtio_net_rx: first byte the queue size (1 << (b % 9)) and readiness.
def rx_chain(head, parts):  # parts: [(addr_half, len)] at 0x4000 + 2 * addr_half
    out = u8(4) + u8(head) + u8(len(parts) - 1)
    for a, l in parts:
        out += u16(a) + u16(l)
    return out
def rx_desc(index, addr, length, flags, nxt, raw_addr=False):
    ctl = (1 if raw_addr else 0) | 2 | (flags << 2) | 0x20
    return u8(0) + u8(index) + u8(ctl) + (u64(addr) if raw_addr else u32(addr)) + u32(length) + u16(nxt)
def rx_avail(head): return u8(1) + u8(0) + u8(head)
def rx_frame(length, hdr=bytes(12)): return u8(5) + u8(2) + u16(length) + hdr
RX = u8(6)

write_seeds("virtio_net_rx", {
    "one": u8(4) + rx_chain(0, [(0, 2048)]) + rx_frame(60) + RX,
    "deferred": u8(4) + rx_frame(60) + rx_frame(100) + rx_frame(1514) + RX
                + rx_chain(0, [(0, 2048)]) + RX + rx_chain(1, [(0x1000, 2048)]) + RX + rx_chain(2, [(0x2000, 2048)]) + RX,
    "scattered": u8(4) + rx_chain(3, [(0, 12), (0x100, 20), (0x800, 4000)]) + rx_frame(1514) + RX,
    "too-small": u8(4) + rx_chain(0, [(0, 20)]) + rx_frame(60) + RX + rx_chain(1, [(0, 2048)]) + rx_frame(5) + rx_frame(0) + RX,
    "bad-chains": u8(4) + rx_desc(0, 0x1fff0, 100, 2, 0) + rx_avail(0) + rx_desc(1, 0x5000, 100, 2 | 4, 0) + rx_avail(1)
                  + rx_desc(2, 0x5000, 100, 0, 0) + rx_avail(2) + rx_desc(3, 0x5000, 100, 1 | 2, 3) + rx_avail(3)
                  + rx_desc(4, 0x5000, 2048, 2, 0) + rx_avail(4) + rx_frame(60) + RX,
    "big": u8(8) + rx_chain(0, [(0, 0xffff), (0x8000, 0x1000)]) + u8(5) + u8(3) + u16(0) + bytes(12) + RX,
    "avail-idx": u8(4) + rx_chain(0, [(0, 2048)]) + u8(2) + u16(1000) + rx_frame(60) + RX + u8(2) + u16(1) + RX,
    "reset": u8(4) + rx_frame(60) + RX + u8(8) + u8(4) + rx_chain(0, [(0, 2048)]) + rx_frame(70) + RX
             + u8(8) + u8(0x40) + rx_frame(80) + RX + u8(8) + u8(5) + RX,
    "overlap-rings": u8(4) + rx_desc(0, 0x1400, 64, 2, 0) + rx_avail(0) + rx_desc(1, 0x0, 64, 2, 0) + rx_avail(1)
                     + rx_chain(2, [(0, 2048)]) + rx_frame(60) + rx_frame(60) + rx_frame(60) + RX,
})

# --- virtio_mmio: first byte picks the device (bit 0: net), then operations.
def mm_bringup(ctl, features=None): return u8(6) + u8(ctl) + (u64(features) if features is not None else b"")
def mm_mem(addr, data):
    out = b""
    for i in range(0, len(data), 255):
        chunk = data[i:i + 255]
        out += u8(7) + u32(addr + i) + u8(len(chunk)) + chunk
    return out
def mm_notify(q): return u8(8) + u8(q)
RUN = u8(9) + u8(9) + u8(9)
def mm_reg_read(i): return u8(3) + u8(i)
def mm_status(v): return u8(4) + u8(v)
SIZE16 = 4 << 2

blk_req = (mm_mem(0x0, desc(0x8000, 16, 1, 1) + desc(0x8100, 512, 3, 2) + desc(0x8400, 1, 2, 0))
           + mm_mem(0x1000, struct.pack("<HHH", 0, 1, 0)) + mm_mem(0x8000, struct.pack("<IIQ", 0, 0, 1)))
blk_write = (mm_mem(0x0, desc(0x8000, 16, 1, 1) + desc(0x8100, 512, 1, 2) + desc(0x8400, 1, 2, 0))
             + mm_mem(0x1000, struct.pack("<HHH", 0, 1, 0)) + mm_mem(0x8000, struct.pack("<IIQ", 1, 0, 2)))
ident = b"".join(mm_reg_read(i) for i in range(24)) + u8(12) + u8(0) + u8(5) + u8(1)
net_rx = (mm_mem(0x0, desc(0x9000, 2048, 2, 0)) + mm_mem(0x1000, struct.pack("<HHH", 0, 1, 0))
          + u8(13) + u16(60))
net_tx = (mm_mem(0x4000, desc(0xa000, 12, 1, 1) + desc(0xa100, 60, 0, 0))
          + mm_mem(0x5000, struct.pack("<HHH", 0, 1, 0)) + mm_mem(0xa100, b"\xff" * 6 + b"\x02" + bytes(5) + b"\x08\x00" + bytes(46)))
write_seeds("virtio_mmio", {
    "blk-ident": u8(0) + ident,
    "blk-read": u8(0x0e) + mm_bringup(SIZE16) + blk_req + mm_notify(0) + RUN + mm_reg_read(13) + u8(11) + u32(1),
    "blk-write-reset": u8(0x2e) + mm_bringup(SIZE16 | 1) + blk_write + mm_notify(0) + RUN + mm_status(0) + RUN
                       + mm_bringup(SIZE16) + RUN,
    "blk-resize": u8(0) + mm_bringup(SIZE16) + RUN + u8(13) + u8(3) + mm_reg_read(22) + u8(12) + u8(0) + u8(5) + u8(1) + RUN,
    "blk-bad-features": u8(0) + mm_bringup(SIZE16 | 3, (1 << 40) | (1 << 32)) + mm_bringup(SIZE16 | 3, 0) + mm_status(7) + ident,
    "blk-bad-queue": u8(0) + mm_status(1) + mm_status(3) + u8(2) + u8(7) + u32(1) + u8(2) + u8(6) + u32(1) + mm_status(11)
                     + u8(5) + u8(0) + u16(16) + u8(7) + u64(0xfffff000ff) + u64(0x1000) + u64(0x2000) + mm_status(15) + RUN,
    "net-rx-tx": u8(3) + mm_bringup(SIZE16 | 1) + net_rx + RUN + net_tx + mm_notify(1) + RUN + mm_notify(0) + RUN,
    "net-odd": u8(1) + u8(0) + u16(0x70) + u8(3) + u64(1) + u8(1) + u16(0x1ffe) + u8(5) + u8(1) + u16(0xffc) + u8(5)
               + u8(12) + u8(4) + u8(13) + u8(1) + mm_notify(0) + u8(8) + u8(0x80) + u32(0xffffffff),
})

# --- virtio_vsock: first byte the guest CID (3 + b % 4), then operations.
def vs_pkt(op, src=0, dst=(0, 0), buf=2, fwd=(0,), flags=0, length=0, cid_ok=True, split=(0,)):
    out = u8(0) + u8(0 if cid_ok else 255) + u8(0) + u8(src) + u8(dst[0])
    out += u8(dst[1]) if dst[0] != 3 else u32(dst[1])
    out += u8(0) + u8(op) + u8(flags) + u8(buf) + u8(fwd[0]) + (u16(fwd[1]) if len(fwd) > 1 else b"")
    out += (u8(0) + u16(length)) if op == 5 else u8(0)
    return out + u8(1) + u8(0) + u8(7) + b"".join(u8(s) if i == 0 else u16(s) for i, s in enumerate(split))
VS_CONNECT = u8(3)
def vs_write(i, what, extra=b""): return u8(4) + u8(i) + u8(what) + extra
def vs_read(i, kib=64): return u8(5) + u8(i) + u8(kib)
def vs_close(i, how=0): return u8(6) + u8(i) + u8(how)
def vs_accept(i): return u8(7) + u8(i)
VS_POLL = u8(8) + u8(3)
def vs_rx(count=4, sel=1): return u8(9) + u8(count) + u8(sel) + u8(0) * count
def vs_time(ticks): return u8(10) + u8(ticks)
VS_RESET = u8(11) + u8(0)

write_seeds("virtio_vsock", {
    "host-connect": u8(0) + VS_CONNECT + vs_write(0, 0) + VS_POLL + vs_rx(1)
                    + vs_pkt(2) + VS_POLL + vs_read(0) + vs_write(0, 2, u8(4)) + VS_POLL + vs_rx()
                    + vs_pkt(5, length=100, split=(1, 30)) + VS_POLL + vs_read(0) + vs_pkt(7) + vs_rx(1)
                    + vs_pkt(4, flags=3) + VS_POLL + vs_rx() + vs_time(10) + VS_RESET,
    "guest-connect": u8(1) + vs_pkt(1, dst=(2, 0)) + vs_rx(1) + vs_accept(0) + vs_write(0, 2, u8(1)) + VS_POLL
                     + vs_rx(4, 2) + vs_pkt(5, dst=(2, 0), length=500) + VS_POLL + vs_read(0)
                     + vs_pkt(6, dst=(2, 0), fwd=(1, 1026)) + vs_close(0) + VS_POLL + vs_rx(),
    "refused": u8(0) + vs_pkt(1, dst=(3, 6000)) + vs_pkt(1, dst=(2, 1)) + vs_rx() + vs_pkt(5, length=10) + vs_rx(),
    "timeouts": u8(0) + VS_CONNECT + vs_time(150) + VS_CONNECT + vs_write(0, 0) + VS_POLL + vs_rx(1) + vs_time(150)
                + VS_POLL + vs_rx(),
    "slow-reader": u8(0) + VS_CONNECT + vs_write(0, 4) + VS_POLL + vs_rx(1) + vs_pkt(2, buf=0)
                   + vs_pkt(5, length=60000) + vs_pkt(5, length=60000) + VS_POLL + vs_rx()
                   + vs_read(0, 8) + VS_POLL + vs_rx() + vs_pkt(4, flags=2) + vs_time(120) + vs_rx(),
    "bad": u8(2) + vs_pkt(9) + vs_pkt(0, cid_ok=False) + vs_pkt(1, length=5) + vs_pkt(5, length=0xffff)
           + VS_CONNECT + vs_write(0, 1, u8(12) + b"CONNECT  12\n") + VS_POLL + vs_rx() + VS_RESET,
})
