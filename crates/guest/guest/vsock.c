/*
 * A polling (and interrupt-woken) virtio-vsock driver for the test guest.
 *
 *   flatlet.vsock=echo:PORT     listen on PORT; echo every byte of every
 *                               connection until the host closes it
 *   flatlet.vsock=connect:PORT  connect to host port PORT, send
 *                               "hello from flatlet vsock\n", read one line
 *                               and print "flatlet-guest: vsock: got <line>"
 *
 * Ring 0 is emulated on some hosts, so the data path touches headers only:
 * a received buffer is echoed by rewriting its 44-byte header in place and
 * handing the same buffer to the transmit queue. Bytes are copied only
 * when the host has no credit for them (into a per-connection staging
 * area of GBUF bytes, which is also the credit the guest gives).
 *
 * Buffers live at a fixed place above the image (VS_MEM, 2 to 5.5 MiB).
 */
#include "guest_main.h"

#define REG_DEVICE_FEATURES 0x010
#define REG_DEVICE_FEATURES_SEL 0x014
#define REG_DRIVER_FEATURES 0x020
#define REG_DRIVER_FEATURES_SEL 0x024
#define REG_QUEUE_SEL 0x030
#define REG_QUEUE_NUM_MAX 0x034
#define REG_QUEUE_NUM 0x038
#define REG_QUEUE_READY 0x044
#define REG_QUEUE_NOTIFY 0x050
#define REG_INTERRUPT_STATUS 0x060
#define REG_INTERRUPT_ACK 0x064
#define REG_STATUS 0x070
#define REG_QUEUE_DESC_LOW 0x080
#define REG_QUEUE_DESC_HIGH 0x084
#define REG_QUEUE_DRIVER_LOW 0x090
#define REG_QUEUE_DRIVER_HIGH 0x094
#define REG_QUEUE_DEVICE_LOW 0x0a0
#define REG_QUEUE_DEVICE_HIGH 0x0a4
#define REG_CONFIG 0x100

#define QN 128
#define NRX 64
#define RXBUF 16384
#define NPOOL 32
#define POOLBUF 16384
#define NCONN 64
#define GBUF 32768
#define VS_MEM 0x200000UL
#define RX_BASE VS_MEM
#define POOL_BASE (VS_MEM + NRX * RXBUF)
#define STAGE_BASE (POOL_BASE + NPOOL * POOLBUF)
#define HDR 44
#define HOST_CID 2
#define VSOCK_IRQ 2

enum { OP_REQUEST = 1, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST };
enum { FREE = 0, CONNECTING, ESTABLISHED, CLOSING };
enum { MODE_ECHO = 1, MODE_CONNECT = 2 };

struct vhdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

struct vdesc {
    u64 addr;
    u32 len;
    u16 flags, next;
};

struct vq {
    struct vdesc desc[QN];
    struct {
        u16 flags, idx;
        u16 ring[QN];
        u16 used_event;
    } avail;
    struct {
        u16 flags, idx;
        struct {
            u32 id, len;
        } ring[QN];
        u16 avail_event;
    } used __attribute__((aligned(4)));
    u16 last_used;
    u16 dirty;
} __attribute__((aligned(4096)));

struct conn {
    u32 state, mode, port, peer;
    u32 fwd_cnt, tx_cnt, peer_alloc, peer_fwd;
    u32 staged, want; /* want: control packets owed (bit per op) */
};

static struct vq q[3] __attribute__((aligned(4096))) = {};
static struct conn conns[NCONN] = {};
static u16 tx_free[QN] = {0};
static u32 n_tx_free = 0;
static u32 tx_owner[QN] = {0}; /* 0..NRX-1: an rx buffer; NRX+j: pool buffer j */
static u8 pool_free[NPOOL] = {0};
static u32 n_pool_free = 0;
static u64 base = 0, my_cid = 0;
static u32 irq_pin = 0;
static u32 echo_ports[4] = {0};
static u32 n_echo = 0, connect_port = 0, connect_done = 0;
static char line[80] = {0};
static u32 line_len = 0;

static u32 rd(u32 reg) { return mmio_read32(base + reg); }
static void wr(u32 reg, u32 v) { mmio_write32(base + reg, v); }
static struct vhdr *rx_hdr(u32 i) { return (struct vhdr *)(RX_BASE + (u64)i * RXBUF); }
static u8 *pool_buf(u32 j) { return (u8 *)(POOL_BASE + (u64)j * POOLBUF); }
static u8 *stage(struct conn *c) { return (u8 *)(STAGE_BASE + (u64)(c - conns) * GBUF); }

static void say(const char *a, u32 n, const char *b)
{
    console_lock();
    puts_raw("flatlet-guest: vsock: ");
    puts_raw(a);
    if (b == NULL) {
        put_dec(n);
    } else {
        puts_raw(b);
    }
    puts_raw("\n");
    console_unlock();
}

/* The event queue's size (the other two have QN entries). */
#define EVQ 4

static void push(u32 which, u16 d)
{
    struct vq *v = &q[which];
    v->avail.ring[v->avail.idx % (which == 2 ? EVQ : QN)] = d;
    barrier();
    v->avail.idx++;
    v->dirty = 1;
}

static void post_rx(u32 i)
{
    q[0].desc[i] = (struct vdesc){RX_BASE + (u64)i * RXBUF, RXBUF, 2, 0};
    push(0, (u16)i);
}

/* Buffers for the device's events. */
static u32 ev_buf[EVQ] = {0};

static void post_event(u16 i)
{
    q[2].desc[i] = (struct vdesc){(u64)&ev_buf[i], sizeof(ev_buf[i]), 2, 0};
    push(2, i);
}

/* VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a snapshot restore): every
 * connection is gone, and the CID may have changed. */
static u32 poll_events(void)
{
    u32 work = 0;
    struct vq *e = &q[2];
    while (*(volatile u16 *)&e->used.idx != e->last_used) {
        u16 d = (u16)e->used.ring[e->last_used % EVQ].id;
        e->last_used++;
        work++;
        if (d >= EVQ)
            continue;
        if (ev_buf[d] == 0) {
            for (u32 i = 0; i < NCONN; i++)
                conns[i].state = FREE;
            my_cid = (u64)rd(REG_CONFIG) | ((u64)rd(REG_CONFIG + 4) << 32);
            print("flatlet-guest: vsock: transport reset, connections dropped\n");
        }
        post_event(d);
    }
    return work;
}

static u32 credit(struct conn *c) { return c->peer_alloc - (c->tx_cnt - c->peer_fwd); }

static void fill(struct vhdr *h, struct conn *c, u16 op, u32 len)
{
    h->src_cid = my_cid;
    h->dst_cid = HOST_CID;
    h->src_port = c->port;
    h->dst_port = c->peer;
    h->len = len;
    h->type = 1;
    h->op = op;
    h->flags = op == OP_SHUTDOWN ? 3 : 0;
    h->buf_alloc = GBUF;
    h->fwd_cnt = c->fwd_cnt;
}

/* Sends `len` bytes at `data` (a copy into a pool buffer) or a control
 * packet. Returns 0, or -1 when no buffer or descriptor is free. */
static int send_pool(struct conn *c, u16 op, const u8 *data, u32 len)
{
    if (n_pool_free == 0 || n_tx_free == 0)
        return -1;
    u32 j = pool_free[--n_pool_free];
    u16 d = tx_free[--n_tx_free];
    u8 *b = pool_buf(j);
    fill((struct vhdr *)b, c, op, len);
    if (len)
        memcpy(b + HDR, data, len);
    c->tx_cnt += len;
    tx_owner[d] = NRX + j;
    q[1].desc[d] = (struct vdesc){(u64)b, HDR + len, 0, 0};
    push(1, d);
    return 0;
}

static void owe(struct conn *c, u16 op) { c->want |= 1u << op; }

static void flush_owed(struct conn *c)
{
    for (u16 op = OP_REQUEST; op <= OP_CREDIT_REQUEST; op++)
        if ((c->want & (1u << op)) && !(op == OP_SHUTDOWN && c->staged) && send_pool(c, op, NULL, 0) == 0)
            c->want &= ~(1u << op);
}

static void flush_stage(struct conn *c)
{
    while (c->staged && !(c->want & ~(1u << OP_SHUTDOWN))) {
        u32 n = credit(c);
        if (n > c->staged)
            n = c->staged;
        if (n > POOLBUF - HDR)
            n = POOLBUF - HDR;
        if (n == 0) {
            owe(c, OP_CREDIT_REQUEST);
            return;
        }
        c->fwd_cnt += n;
        if (send_pool(c, OP_RW, stage(c), n) < 0) {
            c->fwd_cnt -= n;
            return;
        }
        c->staged -= n;
        if (c->staged)
            memcpy(stage(c), stage(c) + n, c->staged); /* rare: host short of credit */
    }
}

static struct conn *find(u32 port, u32 peer)
{
    for (u32 i = 0; i < NCONN; i++)
        if (conns[i].state != FREE && conns[i].port == port && conns[i].peer == peer)
            return &conns[i];
    return NULL;
}

static struct conn *alloc_conn(void)
{
    for (u32 i = 0; i < NCONN; i++)
        if (conns[i].state == FREE) {
            conns[i] = (struct conn){0};
            return &conns[i];
        }
    return NULL;
}

static int is_echo_port(u32 p)
{
    for (u32 i = 0; i < n_echo; i++)
        if (echo_ports[i] == p)
            return 1;
    return 0;
}

/* The connection of connect mode got data: collect the line. */
static void connect_data(struct conn *c, const u8 *p, u32 n)
{
    for (u32 i = 0; i < n && c->state == ESTABLISHED; i++) {
        if (p[i] == '\n' || line_len == sizeof(line) - 1) {
            line[line_len] = 0;
            say("got ", 0, line);
            c->state = CLOSING;
            owe(c, OP_SHUTDOWN);
        } else {
            line[line_len++] = (char)p[i];
        }
    }
    c->fwd_cnt += n;
}

/* Handles received buffer i; returns 1 if it went to the transmit queue. */
static int on_packet(u32 i, u32 used_len)
{
    struct vhdr *h = rx_hdr(i);
    if (used_len < HDR || h->len > used_len - HDR || h->dst_cid != my_cid || h->type != 1)
        return 0;
    struct conn *c = find(h->dst_port, h->src_port);
    if (c == NULL) {
        if (h->op == OP_REQUEST && is_echo_port(h->dst_port) && (c = alloc_conn()) != NULL) {
            c->state = ESTABLISHED;
            c->mode = MODE_ECHO;
            c->port = h->dst_port;
            c->peer = h->src_port;
            c->peer_alloc = h->buf_alloc;
            c->peer_fwd = h->fwd_cnt;
            owe(c, OP_RESPONSE);
        } else if (h->op != OP_RST) {
            struct conn tmp = {0};
            tmp.port = h->dst_port;
            tmp.peer = h->src_port;
            send_pool(&tmp, OP_RST, NULL, 0); /* best effort */
        }
        return 0;
    }
    c->peer_alloc = h->buf_alloc;
    c->peer_fwd = h->fwd_cnt;
    switch (h->op) {
    case OP_RESPONSE:
        if (c->state == CONNECTING) {
            c->state = ESTABLISHED;
            static const char hello[] = "hello from flatlet vsock\n";
            if (send_pool(c, OP_RW, (const u8 *)hello, sizeof(hello) - 1) < 0)
                say("cannot send", 0, "");
        }
        return 0;
    case OP_RST:
        if (c->mode == MODE_CONNECT) {
            if (c->state == CONNECTING)
                say("connect refused: port ", c->peer, NULL);
            connect_done = 1;
        }
        c->state = FREE;
        return 0;
    case OP_SHUTDOWN:
        if (c->state == ESTABLISHED) {
            c->state = CLOSING;
            owe(c, OP_SHUTDOWN);
        }
        return 0;
    case OP_CREDIT_REQUEST:
        owe(c, OP_CREDIT_UPDATE);
        return 0;
    case OP_RW:
        break;
    default:
        return 0;
    }
    u32 n = h->len;
    if (c->mode == MODE_CONNECT) {
        connect_data(c, (const u8 *)h + HDR, n);
        return 0;
    }
    if (c->staged == 0 && !c->want && credit(c) >= n && n_tx_free > 0) {
        /* Echo in place: the same buffer goes back with a new header. */
        c->fwd_cnt += n;
        c->tx_cnt += n;
        u32 fwd = c->fwd_cnt;
        fill(h, c, OP_RW, n);
        h->fwd_cnt = fwd;
        u16 d = tx_free[--n_tx_free];
        tx_owner[d] = i;
        q[1].desc[d] = (struct vdesc){(u64)h, HDR + n, 0, 0};
        push(1, d);
        return 1;
    }
    if (c->staged + n <= GBUF) {
        memcpy(stage(c) + c->staged, (const u8 *)h + HDR, n);
        c->staged += n;
    }
    return 0;
}

/* One round of work; returns how much was done. */
static u32 vsock_poll(void)
{
    u32 work = 0;
    struct vq *t = &q[1];
    while (*(volatile u16 *)&t->used.idx != t->last_used) {
        u16 d = (u16)t->used.ring[t->last_used % QN].id;
        t->last_used++;
        if (d >= QN)
            continue;
        u32 o = tx_owner[d];
        if (o < NRX)
            post_rx(o);
        else if (o - NRX < NPOOL)
            pool_free[n_pool_free++] = (u8)(o - NRX);
        tx_free[n_tx_free++] = d;
        work++;
    }
    struct vq *r = &q[0];
    while (*(volatile u16 *)&r->used.idx != r->last_used) {
        u32 id = r->used.ring[r->last_used % QN].id;
        u32 len = r->used.ring[r->last_used % QN].len;
        r->last_used++;
        if (id >= NRX)
            continue;
        if (!on_packet(id, len))
            post_rx(id);
        work++;
    }
    for (u32 i = 0; i < NCONN; i++) {
        struct conn *c = &conns[i];
        if (c->state == FREE)
            continue;
        if (c->want)
            flush_owed(c);
        if (c->staged)
            flush_stage(c);
    }
    work += poll_events();
    for (u32 w = 0; w < 3; w++)
        if (q[w].dirty) {
            q[w].dirty = 0;
            barrier();
            wr(REG_QUEUE_NOTIFY, w);
        }
    return work;
}

void vsock_irq(void)
{
    if (base)
        wr(REG_INTERRUPT_ACK, rd(REG_INTERRUPT_STATUS));
}

static int setup_queue(u32 index, struct vq *v, u32 n)
{
    wr(REG_QUEUE_SEL, index);
    if (rd(REG_QUEUE_NUM_MAX) < n)
        return -1;
    wr(REG_QUEUE_NUM, n);
    wr(REG_QUEUE_DESC_LOW, (u32)(u64)v->desc);
    wr(REG_QUEUE_DESC_HIGH, 0);
    wr(REG_QUEUE_DRIVER_LOW, (u32)(u64)&v->avail);
    wr(REG_QUEUE_DRIVER_HIGH, 0);
    wr(REG_QUEUE_DEVICE_LOW, (u32)(u64)&v->used);
    wr(REG_QUEUE_DEVICE_HIGH, 0);
    wr(REG_QUEUE_READY, 1);
    return 0;
}

/* Called by the virtio probe for a vsock device at `b` on pin `pin`. */
void vsock_found(u64 b, u32 pin)
{
    extern u8 __image_end[];
    if ((u64)__image_end > VS_MEM || base)
        return;
    base = b;
    irq_pin = pin;
}

void vsock_option(const char *w, u32 len)
{
    static const char key[] = "flatlet.vsock=";
    u32 k = sizeof(key) - 1;
    if (len <= k || memcmp(w, key, k) != 0)
        return;
    const char *p = w + k;
    u32 rest = len - k;
    if (rest > 5 && memcmp(p, "echo:", 5) == 0) {
        p += 5;
        if (n_echo < ARRAY_SIZE(echo_ports))
            echo_ports[n_echo++] = (u32)parse_u64(&p, 10);
    } else if (rest > 8 && memcmp(p, "connect:", 8) == 0) {
        p += 8;
        connect_port = (u32)parse_u64(&p, 10);
    }
}

static int start(void)
{
    wr(REG_STATUS, 0);
    wr(REG_STATUS, 1);
    wr(REG_STATUS, 3);
    wr(REG_DEVICE_FEATURES_SEL, 1);
    if (!(rd(REG_DEVICE_FEATURES) & 1))
        return -1;
    wr(REG_DRIVER_FEATURES_SEL, 0);
    wr(REG_DRIVER_FEATURES, 0);
    wr(REG_DRIVER_FEATURES_SEL, 1);
    wr(REG_DRIVER_FEATURES, 1);
    wr(REG_STATUS, 11);
    if (!(rd(REG_STATUS) & 8))
        return -1;
    my_cid = (u64)rd(REG_CONFIG) | ((u64)rd(REG_CONFIG + 4) << 32);
    if (setup_queue(0, &q[0], QN) < 0 || setup_queue(1, &q[1], QN) < 0 || setup_queue(2, &q[2], EVQ) < 0)
        return -1;
    for (u16 i = 0; i < EVQ; i++)
        post_event(i);
    for (u32 i = 0; i < QN; i++)
        tx_free[n_tx_free++] = (u16)i;
    for (u32 j = 0; j < NPOOL; j++)
        pool_free[n_pool_free++] = (u8)j;
    for (u32 i = 0; i < NRX; i++)
        post_rx(i);
    wr(REG_STATUS, 15);
    ioapic_route(irq_pin, IRQ_VECTOR_BASE + VSOCK_IRQ, lapic_id());
    wr(REG_QUEUE_NOTIFY, 0);
    q[0].dirty = 0;
    q[2].dirty = 0;
    return 0;
}

/* Whether vsock has work to keep the guest running (echo serves forever). */
int vsock_active(void) { return base && (n_echo > 0 || (connect_port && !connect_done)); }

/* One step of the guest's wait loop: work, or sleep until an interrupt. */
void vsock_step(void)
{
    __asm__ volatile("cli" ::: "memory");
    if (vsock_poll() == 0)
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    else
        __asm__ volatile("sti; nop; cli" ::: "memory");
}

/* Sets the device up for the options given; returns 0 if vsock runs. */
int vsock_run(void)
{
    for_each_option(vsock_option);
    if (n_echo == 0 && connect_port == 0)
        return -1;
    if (!base) {
        say("no vsock device", 0, "");
        return -1;
    }
    if (start() < 0) {
        say("cannot set up the device", 0, "");
        base = 0;
        return -1;
    }
    say("cid ", (u32)my_cid, NULL);
    for (u32 i = 0; i < n_echo; i++)
        say("echo on port ", echo_ports[i], NULL);
    if (connect_port) {
        struct conn *c = alloc_conn();
        c->state = CONNECTING;
        c->mode = MODE_CONNECT;
        c->port = 50000;
        c->peer = connect_port;
        owe(c, OP_REQUEST);
    }
    return 0;
}
