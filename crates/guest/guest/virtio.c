/*
 * Polling virtio-mmio drivers of the test guest, for the devices its
 * command line lists (virtio_mmio.device=<size>@<addr>:<irq>):
 *
 * block: reads sector 0 of the first drive and prints its first 16 bytes;
 *        if the drive is writable, writes "flatlet-guest-was-here" at the
 *        start of sector 1 (keeping the rest of it), flushes, and prints
 *        "blk: ok". flatlet.blkwrite=force writes even to a read-only drive
 *        and prints the status the device returned.
 * net:   sends one UDP datagram from 10.0.2.15:7777 to 255.255.255.255:7777
 *        with the payload "hello from flatlet", and prints "net: ok".
 *
 * flatlet.beatio (with flatlet.stay): on each heartbeat, the drive that
 * took the write reads sector 1 again and prints its first bytes as text
 * (so a test sees a drive's image change under the guest), and the
 * interface sends the datagram again (so that a restored snapshot shows
 * its queues working where the saved ones stopped).
 */
#include "guest_main.h"

#define VIRTIO_MAGIC 0x74726976
#define REG_MAGIC 0x000
#define REG_VERSION 0x004
#define REG_DEVICE_ID 0x008
#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define ID_NET 1
#define ID_BLOCK 2
#define ID_RNG 4
#define F_BLK_RO (1u << 5)
#define F_BLK_FLUSH (1u << 9)
#define F_NET_MAC (1u << 5)

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define QSIZE 8
#define TIMEOUT_CYCLES 4000000000UL

struct desc {
    u64 addr;
    u32 len;
    u16 flags;
    u16 next;
};

struct queue {
    struct desc desc[QSIZE];
    struct {
        u16 flags;
        u16 idx;
        u16 ring[QSIZE];
    } avail __attribute__((aligned(2)));
    struct {
        u16 flags;
        u16 idx;
        struct {
            u32 id;
            u32 len;
        } ring[QSIZE];
    } used __attribute__((aligned(4)));
    u16 last_used;
} __attribute__((aligned(4096)));

/* Queues and buffers live in .data: zero at load, no clearing needed. */
static struct queue blk_q __attribute__((aligned(4096))) = {};
static struct queue net_q[2] __attribute__((aligned(4096))) = {};
static u8 sector_buf[512] __attribute__((aligned(512))) = {0};
static u8 blk_hdr[16] = {0};
static volatile u8 blk_status = 0;
static u8 net_frame[12 + 60] = {0};
static u8 rx_bufs[2][1526 + 12] = {};

static u32 force_write = 0;
static u32 beat_io = 0;
static u64 blk_base = 0, net_base = 0;
static u32 blk_done = 0, net_done = 0, rng_done = 0;
static struct queue rng_q __attribute__((aligned(4096))) = {};
static u8 rng_buf[16] = {0};

static u32 rd(u64 base, u32 reg) { return mmio_read32(base + reg); }
static void wr(u64 base, u32 reg, u32 v) { mmio_write32(base + reg, v); }

static void say(const char *a, const char *b)
{
    console_lock();
    puts_raw("flatlet-guest: ");
    puts_raw(a);
    if (b)
        puts_raw(b);
    puts_raw("\n");
    console_unlock();
}

/* Resets the device and negotiates VERSION_1 plus `wanted` (low word);
 * returns the device's low feature word, or -1. */
static long negotiate(u64 base, u32 wanted)
{
    wr(base, REG_STATUS, 0);
    wr(base, REG_STATUS, S_ACK);
    wr(base, REG_STATUS, S_ACK | S_DRIVER);
    wr(base, REG_DEVICE_FEATURES_SEL, 0);
    u32 low = rd(base, REG_DEVICE_FEATURES);
    wr(base, REG_DEVICE_FEATURES_SEL, 1);
    u32 high = rd(base, REG_DEVICE_FEATURES);
    if (!(high & 1))
        return -1;
    wr(base, REG_DRIVER_FEATURES_SEL, 0);
    wr(base, REG_DRIVER_FEATURES, low & wanted);
    wr(base, REG_DRIVER_FEATURES_SEL, 1);
    wr(base, REG_DRIVER_FEATURES, 1);
    wr(base, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(rd(base, REG_STATUS) & S_FEATURES_OK))
        return -1;
    return (long)low;
}

static int setup_queue(u64 base, u32 index, struct queue *q)
{
    wr(base, REG_QUEUE_SEL, index);
    if (rd(base, REG_QUEUE_NUM_MAX) < QSIZE)
        return -1;
    wr(base, REG_QUEUE_NUM, QSIZE);
    wr(base, REG_QUEUE_DESC_LOW, (u32)(u64)q->desc);
    wr(base, REG_QUEUE_DESC_HIGH, (u32)((u64)q->desc >> 32));
    wr(base, REG_QUEUE_DRIVER_LOW, (u32)(u64)&q->avail);
    wr(base, REG_QUEUE_DRIVER_HIGH, (u32)((u64)&q->avail >> 32));
    wr(base, REG_QUEUE_DEVICE_LOW, (u32)(u64)&q->used);
    wr(base, REG_QUEUE_DEVICE_HIGH, (u32)((u64)&q->used >> 32));
    q->avail.flags = 1; /* no interrupts: the guest polls */
    wr(base, REG_QUEUE_READY, 1);
    return 0;
}

/* Makes descriptor `head` available, notifies, and waits for it to be used.
 * Returns the used length, or -1 on timeout. */
static long submit(u64 base, u32 index, struct queue *q, u16 head)
{
    q->avail.ring[q->avail.idx % QSIZE] = head;
    barrier();
    q->avail.idx++;
    barrier();
    wr(base, REG_QUEUE_NOTIFY, index);
    u64 deadline = rdtsc() + TIMEOUT_CYCLES;
    while (*(volatile u16 *)&q->used.idx == q->last_used) {
        if (rdtsc() > deadline)
            return -1;
        cpu_relax();
    }
    u32 len = q->used.ring[q->last_used % QSIZE].len;
    q->last_used++;
    return (long)len;
}

/* One block request: header, sector buffer (device-writable for reads),
 * status. Returns the status byte, or 0xff on timeout. */
static u8 blk_request(u64 base, u32 type, u64 sector, int with_data)
{
    *(u32 *)&blk_hdr[0] = type;
    *(u32 *)&blk_hdr[4] = 0;
    *(u64 *)&blk_hdr[8] = sector;
    blk_status = 0xff;
    struct desc *d = blk_q.desc;
    d[0] = (struct desc){(u64)blk_hdr, 16, DESC_F_NEXT, 1};
    if (with_data) {
        d[1] = (struct desc){(u64)sector_buf, 512, (u16)(DESC_F_NEXT | (type == 0 ? DESC_F_WRITE : 0)), 2};
        d[2] = (struct desc){(u64)&blk_status, 1, DESC_F_WRITE, 0};
    } else {
        d[1] = (struct desc){(u64)&blk_status, 1, DESC_F_WRITE, 0};
    }
    if (submit(base, 0, &blk_q, 0) < 0)
        return 0xff;
    return blk_status;
}

static void say_status(const char *what, u8 status)
{
    console_lock();
    puts_raw("flatlet-guest: blk: ");
    puts_raw(what);
    puts_raw(" status ");
    put_dec(status);
    puts_raw("\n");
    console_unlock();
}

static const char marker[] = "flatlet-guest-was-here";

static void blk_test(u64 base)
{
    long f = negotiate(base, F_BLK_RO | F_BLK_FLUSH);
    if (f < 0 || setup_queue(base, 0, &blk_q) < 0) {
        say("blk: cannot set up the device", NULL);
        return;
    }
    wr(base, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    u8 st = blk_request(base, 0, 0, 1);
    if (st != 0) {
        say_status("read of sector 0 failed:", st);
        return;
    }
    console_lock();
    puts_raw("flatlet-guest: blk: sector 0:");
    for (int i = 0; i < 16; i++) {
        puts_raw(" ");
        put_hex_byte(sector_buf[i]);
    }
    puts_raw("\n");
    console_unlock();

    int read_only = (f & F_BLK_RO) != 0;
    if (read_only && !force_write) {
        say("blk: read-only drive, not writing", NULL);
        return;
    }
    if ((st = blk_request(base, 0, 1, 1)) != 0) {
        say_status("read of sector 1 failed:", st);
        return;
    }
    memcpy(sector_buf, marker, sizeof(marker) - 1);
    st = blk_request(base, 1, 1, 1);
    if (st != 0) {
        say_status("write refused:", st);
        return;
    }
    if ((f & F_BLK_FLUSH) && (st = blk_request(base, 4, 0, 0)) != 0) {
        say_status("flush failed:", st);
        return;
    }
    blk_base = base;
    say("blk: ok", NULL);
}

static u16 ip_checksum(const u8 *p, u32 len)
{
    u32 sum = 0;
    for (u32 i = 0; i + 1 < len; i += 2)
        sum += (u32)(p[i] << 8 | p[i + 1]);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (u16)~sum;
}

static const char payload[] = "hello from flatlet";

static void build_datagram(const u8 *mac)
{
    u8 *e = net_frame + 12; /* after the virtio-net header (zero) */
    memset(e, 0xff, 6);
    memcpy(e + 6, mac, 6);
    e[12] = 0x08;
    e[13] = 0x00;
    u8 *ip = e + 14;
    u32 plen = sizeof(payload) - 1;
    u32 total = 20 + 8 + plen;
    static const u8 iphdr[20] = {0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 2, 15, 255, 255, 255, 255};
    memcpy(ip, iphdr, 20);
    ip[2] = (u8)(total >> 8);
    ip[3] = (u8)total;
    u16 ck = ip_checksum(ip, 20);
    ip[10] = (u8)(ck >> 8);
    ip[11] = (u8)ck;
    u8 *udp = ip + 20;
    udp[0] = 7777 >> 8;
    udp[1] = 7777 & 0xff;
    udp[2] = 7777 >> 8;
    udp[3] = 7777 & 0xff;
    udp[4] = (u8)((8 + plen) >> 8);
    udp[5] = (u8)(8 + plen);
    udp[6] = 0; /* no UDP checksum (allowed over IPv4) */
    udp[7] = 0;
    memcpy(udp + 8, payload, plen);
}

static void net_test(u64 base)
{
    long f = negotiate(base, F_NET_MAC);
    if (f < 0 || setup_queue(base, 0, &net_q[0]) < 0 || setup_queue(base, 1, &net_q[1]) < 0) {
        say("net: cannot set up the device", NULL);
        return;
    }
    /* Receive buffers, as a driver posts them (this guest reads none). */
    for (u16 i = 0; i < 2; i++) {
        net_q[0].desc[i] = (struct desc){(u64)rx_bufs[i], sizeof(rx_bufs[i]), DESC_F_WRITE, 0};
        net_q[0].avail.ring[i] = i;
    }
    barrier();
    net_q[0].avail.idx = 2;
    wr(base, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    wr(base, REG_QUEUE_NOTIFY, 0);

    u8 mac[6] = {0x02, 0, 0, 0, 0, 0x01};
    if (f & F_NET_MAC)
        for (int i = 0; i < 6; i++)
            mac[i] = *(volatile u8 *)(base + REG_CONFIG + (u64)i);
    build_datagram(mac);
    net_q[1].desc[0] = (struct desc){(u64)net_frame, sizeof(net_frame), 0, 0};
    if (submit(base, 1, &net_q[1], 0) < 0) {
        say("net: transmit timed out", NULL);
        return;
    }
    net_base = base;
    say("net: ok", NULL);
}

/* virtio-rng: asks for 16 bytes twice and prints them in hex. */
static void rng_test(u64 base)
{
    if (negotiate(base, 0) < 0 || setup_queue(base, 0, &rng_q) < 0) {
        say("rng: cannot set up the device", NULL);
        return;
    }
    wr(base, REG_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    for (int round = 0; round < 2; round++) {
        rng_q.desc[0] = (struct desc){(u64)rng_buf, sizeof(rng_buf), DESC_F_WRITE, 0};
        long got = submit(base, 0, &rng_q, 0);
        if (got != (long)sizeof(rng_buf)) {
            say("rng: no entropy", NULL);
            return;
        }
        static const char hex[] = "0123456789abcdef";
        char line[2 * sizeof(rng_buf) + 1];
        for (u32 i = 0; i < sizeof(rng_buf); i++) {
            line[2 * i] = hex[rng_buf[i] >> 4];
            line[2 * i + 1] = hex[rng_buf[i] & 15];
        }
        line[2 * sizeof(rng_buf)] = 0;
        say("rng: ", line);
    }
}

static void parse_flag(const char *w, u32 len)
{
    if (option_is(w, len, "flatlet.blkwrite=force"))
        force_write = 1;
    else if (option_is(w, len, "flatlet.beatio"))
        beat_io = 1;
}

void virtio_heartbeat(u64 n)
{
    if (!beat_io)
        return;
    if (blk_base) {
        /* The first bytes of sector 1, as text (up to a NUL or 32). */
        u8 st = blk_request(blk_base, 0, 1, 1);
        char text[33];
        u32 k = 0;
        while (st == 0 && k < 32 && sector_buf[k] >= 0x20 && sector_buf[k] < 0x7f) {
            text[k] = (char)sector_buf[k];
            k++;
        }
        text[k] = 0;
        console_lock();
        puts_raw("flatlet-guest: blk: heartbeat ");
        put_dec(n);
        puts_raw(st == 0 ? " read: " : " read failed, status ");
        if (st == 0)
            puts_raw(text);
        else
            put_dec(st);
        puts_raw("\n");
        console_unlock();
    }
    if (net_base) {
        net_q[1].desc[0] = (struct desc){(u64)net_frame, sizeof(net_frame), 0, 0};
        long sent = submit(net_base, 1, &net_q[1], 0);
        console_lock();
        puts_raw("flatlet-guest: net: heartbeat ");
        put_dec(n);
        puts_raw(sent < 0 ? " send timed out\n" : " sent\n");
        console_unlock();
    }
}

static void parse_device(const char *w, u32 len)
{
    static const char key[] = "virtio_mmio.device=";
    if (len < sizeof(key) - 1 || memcmp(w, key, sizeof(key) - 1) != 0)
        return;
    /* <size>@<addr>:<irq>: only the address matters to a polling driver. */
    const char *p = w + sizeof(key) - 1;
    while (p < w + len && *p != '@')
        p++;
    if (p >= w + len)
        return;
    p++;
    u64 base = parse_u64(&p, 0);
    u64 pin = 0;
    if (p < w + len && *p == ':') {
        p++;
        pin = parse_u64(&p, 10);
    }
    if (base < 0xc0000000UL || base >= 0xc0200000UL) {
        say("virtio: device outside the mapped window: ", w);
        return;
    }
    if (rd(base, REG_MAGIC) != VIRTIO_MAGIC || rd(base, REG_VERSION) != 2)
        return;
    u32 id = rd(base, REG_DEVICE_ID);
    if (id == ID_BLOCK && !blk_done) {
        blk_done = 1;
        blk_test(base);
    } else if (id == ID_NET && !net_done) {
        net_done = 1;
        net_test(base);
    } else if (id == ID_RNG && !rng_done) {
        rng_done = 1;
        rng_test(base);
    } else if (id == 19) {
        vsock_found(base, (u32)pin); /* driven later, by its options */
    }
}

void virtio_run(void)
{
    /* Flags first: they may come after the devices on the line. */
    for_each_option(parse_flag);
    for_each_option(parse_device);
}
