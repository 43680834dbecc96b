/*
 * virtio.c - bare-metal virtio-mmio drivers: the virtio-net, virtio-blk,
 * virtio-console and virtio-rng test kernels (one source, VIRTIO_KIND picks
 * the device).
 *
 * Multiboot v1 kernels (ELF32 at 1 MiB, entered by virtio-entry.S in 32-bit
 * protected mode, paging off, interrupts off), written for `pykvm run -k` and
 * also bootable with `qemu-system-x86_64 -M microvm -kernel`. Results go to
 * COM1; the run ends through the debug-exit port 0xf4.
 *
 * Finding the device: pykvm lists its virtio-mmio devices in the fw_cfg file
 * "etc/pykvm/virtio-mmio" (16-byte records: le64 base, le32 size, le16 irq,
 * le16 device type); the first record of the wanted type is used. Without
 * that file (QEMU), the 0x200-byte windows QEMU's microvm machine puts at
 * 0xfeb00000 are probed for the magic value and the device ID.
 *
 * The driver (virtio 1.x, section 3.1.1): reset, ACKNOWLEDGE, DRIVER, accept
 * VERSION_1 (plus INDIRECT_DESC, EVENT_IDX and the device's features it uses),
 * FEATURES_OK (checked), one split queue per direction, DRIVER_OK. Requests
 * are polled: the driver notifies and spins on used.idx. The interrupt is not
 * taken (IF stays 0), but InterruptStatus is checked and acknowledged.
 *
 * virtio-blk (exit 0x10, status 33; read-only drive 0x11, status 35):
 *   writes a pattern to sectors 1-8 (one request, data split over two
 *   descriptors, through an indirect table when offered) and to the last
 *   sector, flushes, reads both back and compares; a read past the end must
 *   fail with IOERR; prints the device id. On a read-only device (VIRTIO_BLK_F_RO)
 *   the write must fail with IOERR, and the drive must still read.
 *   Sector s of the pattern: bytes 0-3 = s (le32), 4-15 = "pykvm-virtio",
 *   byte i >= 16 = (i * 7 + s * 13 + 0x5a) & 0xff.
 *   With "bench=<MiB>" on the command line it instead reads that many MiB from
 *   sector 0 in 256 KiB requests, 4 at a time (change with "req=<KiB>" and
 *   "depth=<n>"), checking that each request's first sector starts with its
 *   sector number (le32), between the lines "bench: start" and "bench: done".
 * virtio-console (exit 0x12, status 37): sends "Hello from virtio-console!"
 *   through the transmit queue; with "echo" on the command line it then reads
 *   one line from the receive queue and sends it back as
 *   "virtio-console: got <line>".
 * virtio-rng (exit 0x13, status 39): two 32-byte requests; the 64 bytes must
 *   have at least 8 distinct values and the two halves must differ.
 * virtio-net (exit 0x14, status 41): accepts MAC only (no offloads, no
 *   mergeable buffers), reads the MAC from the configuration space, offers
 *   receive buffers and waits for a frame of EtherType 0x88b5 (IEEE local
 *   experimental; other frames are skipped), checks its 12-byte header
 *   (no flags, no GSO, num_buffers 1) and prints the frame in hex as
 *   "virtio-net: got <len> <hex>". Then it sends its own frame, header and
 *   frame in separate descriptors: broadcast destination, its MAC as source,
 *   EtherType 0x88b5, "pykvm guest->host" and bytes (i * 7 + 3) & 0xff up to
 *   byte i = 89 (90 bytes in all).
 * Failures print "<name>: FAIL <reason>" and exit with 0x70 + n (status 225+).
 *
 * Build: gcc -m32 -ffreestanding -O2 -fno-pic (see the Makefile).
 */

#include <stddef.h>
#include <stdint.h>

#define KIND_NET 1
#define KIND_BLK 2
#define KIND_CONSOLE 3
#define KIND_RNG 4

#ifndef VIRTIO_KIND
#error "define VIRTIO_KIND (1 net, 2 blk, 3 console, 4 rng)"
#endif

#if VIRTIO_KIND == KIND_NET
#define NAME "virtio-net"
#elif VIRTIO_KIND == KIND_BLK
#define NAME "virtio-blk"
#elif VIRTIO_KIND == KIND_CONSOLE
#define NAME "virtio-console"
#else
#define NAME "virtio-rng"
#endif

/* ---- the machine: ports, MMIO, COM1, debug exit --------------------------- */

#define COM1 0x3f8
#define COM1_LSR 0x3fd
#define LSR_THRE 0x20
#define DEBUG_EXIT 0xf4
#define FW_CFG_SELECT 0x510
#define FW_CFG_DATA 0x511

#define barrier() __asm__ volatile("" ::: "memory")

static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline uint8_t inb(uint16_t port)
{
        uint8_t v;
        __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
        return v;
}
static inline uint32_t rd32(uint32_t addr) { return *(volatile uint32_t *)addr; }
static inline void wr32(uint32_t addr, uint32_t v) { *(volatile uint32_t *)addr = v; }
static inline void pause(void) { __asm__ volatile("pause"); }

/* gcc may call these for struct copies and clears even when freestanding */
void *memset(void *d, int c, size_t n)
{
        unsigned char *p = d;
        while (n--)
                *p++ = (unsigned char)c;
        return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
        unsigned char *p = d;
        const unsigned char *q = s;
        while (n--)
                *p++ = *q++;
        return d;
}

static void putc(char c)
{
        while (!(inb(COM1_LSR) & LSR_THRE))
                ;
        outb(COM1, (uint8_t)c);
}

static void puts(const char *s)
{
        while (*s)
                putc(*s++);
}

static void puthex(uint32_t v, int digits)
{
        while (digits--)
                putc("0123456789abcdef"[(v >> (4 * digits)) & 0xf]);
}

static void putdec(uint32_t v)
{
        char buf[12];
        int n = 0;
        do {
                buf[n++] = (char)('0' + v % 10);
                v /= 10;
        } while (v);
        while (n--)
                putc(buf[n]);
}

static __attribute__((noreturn)) void finish(uint8_t code)
{
        outb(DEBUG_EXIT, code);
        for (;;)
                __asm__ volatile("cli; hlt");
}

static __attribute__((noreturn)) void fail(uint8_t n, const char *why)
{
        puts(NAME ": FAIL ");
        puts(why);
        putc('\n');
        finish((uint8_t)(0x70 + n));
}

/* ---- the command line ------------------------------------------------------ */

static const char *cmdline = "";

/* The decimal value after "key=" on the command line, or dflt. */
static __attribute__((unused)) uint32_t option(const char *key, uint32_t dflt)
{
        for (const char *p = cmdline; *p; p++) {
                const char *k = key, *q = p;
                while (*k && *q == *k) {
                        k++;
                        q++;
                }
                if (*k || *q != '=' || (p != cmdline && p[-1] != ' '))
                        continue;
                uint32_t v = 0;
                for (q++; *q >= '0' && *q <= '9'; q++)
                        v = v * 10 + (uint32_t)(*q - '0');
                return v;
        }
        return dflt;
}

static __attribute__((unused)) int has_word(const char *word)
{
        for (const char *p = cmdline; *p; p++) {
                const char *w = word, *q = p;
                while (*w && *q == *w) {
                        w++;
                        q++;
                }
                if (!*w && (*q == 0 || *q == ' ') && (p == cmdline || p[-1] == ' '))
                        return 1;
        }
        return 0;
}

/* ---- fw_cfg ---------------------------------------------------------------- */

static void fw_cfg_select(uint16_t key) { outw(FW_CFG_SELECT, key); }

static uint32_t fw_cfg_read_le(int n)
{
        uint32_t v = 0;
        for (int i = 0; i < n; i++)
                v |= (uint32_t)inb(FW_CFG_DATA) << (8 * i);
        return v;
}

static uint32_t fw_cfg_read_be(int n)
{
        uint32_t v = 0;
        for (int i = 0; i < n; i++)
                v = (v << 8) | inb(FW_CFG_DATA);
        return v;
}

/* The selector key and size of the named fw_cfg file; 0 if there is none. */
static int fw_cfg_file(const char *name, uint16_t *key, uint32_t *size)
{
        fw_cfg_select(0x0000);
        if (fw_cfg_read_le(4) != 0x554d4551)    /* "QEMU" */
                return 0;
        fw_cfg_select(0x0019);                  /* the file directory */
        uint32_t count = fw_cfg_read_be(4);
        for (uint32_t i = 0; i < count && i < 4096; i++) {
                uint32_t fsize = fw_cfg_read_be(4);
                uint16_t fkey = (uint16_t)fw_cfg_read_be(2);
                fw_cfg_read_be(2);
                int match = 1;
                for (int j = 0; j < 56; j++) {
                        char c = (char)inb(FW_CFG_DATA);
                        if (match && c != name[j])
                                match = 0;
                        if (c == 0 && name[j] == 0)
                                break;          /* both ended: the rest is padding */
                }
                if (match) {
                        *key = fkey;
                        *size = fsize;
                        return 1;
                }
        }
        return 0;
}

/* ---- virtio-mmio ----------------------------------------------------------- */

#define VIRTIO_MAGIC 0x74726976
#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG 0x100

#define S_ACKNOWLEDGE 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_INDIRECT_DESC (1ull << 28)
#define F_EVENT_IDX (1ull << 29)
#define F_VERSION_1 (1ull << 32)

#define MICROVM_VIRTIO_BASE 0xfeb00000u
#define MICROVM_VIRTIO_SLOTS 32

struct desc {
        uint64_t addr;
        uint32_t len;
        uint16_t flags;
        uint16_t next;
};
#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4

#define QMAX 64
struct avail {
        uint16_t flags;
        uint16_t idx;
        uint16_t ring[QMAX];
        uint16_t used_event;
};
struct used_elem {
        uint32_t id;
        uint32_t len;
};
struct used {
        uint16_t flags;
        uint16_t idx;
        struct used_elem ring[QMAX];
        uint16_t avail_event;
};

/* One queue's memory: the three areas of a split virtqueue, properly aligned. */
struct qmem {
        struct desc desc[QMAX];                          /* 16-byte aligned */
        struct avail avail __attribute__((aligned(16)));  /* 2-byte aligned */
        struct used used __attribute__((aligned(16)));    /* 4-byte aligned */
} __attribute__((aligned(4096)));

struct vq {
        uint32_t base, index;
        uint16_t num, avail_idx, last_used;
        struct qmem *m;
};

static uint32_t dev_base;
static uint64_t features;                       /* accepted */
static struct qmem qmem[2];

static void find_device(uint32_t type)
{
        uint16_t key;
        uint32_t size;
        if (fw_cfg_file("etc/pykvm/virtio-mmio", &key, &size)) {
                fw_cfg_select(key);
                for (uint32_t i = 0; i < size / 16; i++) {
                        uint32_t lo = fw_cfg_read_le(4), hi = fw_cfg_read_le(4);
                        fw_cfg_read_le(4);
                        uint32_t irq = fw_cfg_read_le(2), t = fw_cfg_read_le(2);
                        if (t == type && hi == 0) {
                                dev_base = lo;
                                puts(NAME ": device at 0x");
                                puthex(lo, 8);
                                puts(" irq ");
                                putdec(irq);
                                puts(" (fw_cfg etc/pykvm/virtio-mmio)\n");
                                return;
                        }
                }
                fail(1, "no such device in etc/pykvm/virtio-mmio");
        }
        for (uint32_t i = 0; i < MICROVM_VIRTIO_SLOTS; i++) {
                uint32_t base = MICROVM_VIRTIO_BASE + i * 0x200;
                if (rd32(base + R_MAGIC) == VIRTIO_MAGIC && rd32(base + R_DEVICE_ID) == type) {
                        dev_base = base;
                        puts(NAME ": device at 0x");
                        puthex(base, 8);
                        puts(" (probed)\n");
                        return;
                }
        }
        fail(1, "no device found");
}

/* Negotiate: accept the wanted features the device offers; VERSION_1 is required. */
static void virtio_init(uint64_t want)
{
        uint32_t b = dev_base;
        if (rd32(b + R_MAGIC) != VIRTIO_MAGIC)
                fail(2, "bad magic value");
        if (rd32(b + R_VERSION) != 2)
                fail(2, "not a virtio 1.x (version 2) device");
        wr32(b + R_STATUS, 0);
        wr32(b + R_STATUS, S_ACKNOWLEDGE);
        wr32(b + R_STATUS, S_ACKNOWLEDGE | S_DRIVER);
        wr32(b + R_DEVICE_FEATURES_SEL, 0);
        uint64_t offered = rd32(b + R_DEVICE_FEATURES);
        wr32(b + R_DEVICE_FEATURES_SEL, 1);
        offered |= (uint64_t)rd32(b + R_DEVICE_FEATURES) << 32;
        features = offered & (want | F_VERSION_1);
        if (!(features & F_VERSION_1))
                fail(2, "the device does not offer VIRTIO_F_VERSION_1");
        wr32(b + R_DRIVER_FEATURES_SEL, 0);
        wr32(b + R_DRIVER_FEATURES, (uint32_t)features);
        wr32(b + R_DRIVER_FEATURES_SEL, 1);
        wr32(b + R_DRIVER_FEATURES, (uint32_t)(features >> 32));
        wr32(b + R_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
        if (!(rd32(b + R_STATUS) & S_FEATURES_OK))
                fail(2, "FEATURES_OK refused");
}

static void vq_setup(struct vq *q, uint32_t index, struct qmem *m, uint16_t num)
{
        uint32_t b = dev_base;
        wr32(b + R_QUEUE_SEL, index);
        if (rd32(b + R_QUEUE_READY))
                fail(3, "queue already in use");
        uint32_t max = rd32(b + R_QUEUE_NUM_MAX);
        if (max == 0)
                fail(3, "queue not available");
        while (num > max)
                num /= 2;
        memset(m, 0, sizeof(*m));
        q->base = b;
        q->index = index;
        q->num = num;
        q->avail_idx = q->last_used = 0;
        q->m = m;
        wr32(b + R_QUEUE_NUM, num);
        wr32(b + R_QUEUE_DESC, (uint32_t)m->desc);
        wr32(b + R_QUEUE_DESC + 4, 0);
        wr32(b + R_QUEUE_DRIVER, (uint32_t)&m->avail);
        wr32(b + R_QUEUE_DRIVER + 4, 0);
        wr32(b + R_QUEUE_DEVICE, (uint32_t)&m->used);
        wr32(b + R_QUEUE_DEVICE + 4, 0);
        wr32(b + R_QUEUE_READY, 1);
}

static void driver_ok(void)
{
        wr32(dev_base + R_STATUS, rd32(dev_base + R_STATUS) | S_DRIVER_OK);
}

static void set_desc(struct desc *d, uint32_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
        d->addr = addr;
        d->len = len;
        d->flags = flags;
        d->next = next;
}

/* Make chain `head` available (without notifying). */
static void vq_offer(struct vq *q, uint16_t head)
{
        volatile struct avail *a = &q->m->avail;
        a->ring[q->avail_idx % q->num] = head;
        a->used_event = q->last_used;   /* EVENT_IDX: interrupt me for the next used entry */
        barrier();                      /* x86 keeps stores in order; the compiler must too */
        a->idx = ++q->avail_idx;
        barrier();
}

static void vq_notify(struct vq *q) { wr32(q->base + R_QUEUE_NOTIFY, q->index); }

/* Wait for the next used entry; returns its length, stores its id. */
static uint32_t vq_wait(struct vq *q, uint32_t *id)
{
        volatile struct used *u = &q->m->used;
        uint32_t spins = 0;
        while (u->idx == q->last_used) {
                if (++spins == 0x4000000)
                        fail(4, "timed out waiting for the device");
                pause();
        }
        barrier();
        struct used_elem e = u->ring[q->last_used % q->num];
        q->last_used++;
        if (id)
                *id = e.id;
        return e.len;
}

/* InterruptStatus must show a used-buffer notification; acknowledge it. */
static void check_interrupt(void)
{
        uint32_t is = rd32(dev_base + R_INTERRUPT_STATUS);
        if (!(is & 1))
                fail(5, "no used-buffer bit in InterruptStatus");
        wr32(dev_base + R_INTERRUPT_ACK, is);
        if (rd32(dev_base + R_INTERRUPT_STATUS) != 0)
                fail(5, "InterruptStatus not cleared by InterruptACK");
}

/* ---- virtio-net ------------------------------------------------------------ */

#if VIRTIO_KIND == KIND_NET

#define F_NET_MAC (1ull << 5)
#define NET_HDR 12                      /* virtio_net_hdr_v1 */
#define ETHERTYPE_LOCAL 0x88b5
#define RX_BUFS 4
#define RX_LEN (NET_HDR + 1514)

static struct vq rxq, txq;
static uint8_t rxbuf[RX_BUFS][RX_LEN];
static uint8_t txhdr[NET_HDR];
static uint8_t txframe[90];

static void offer_rx(uint16_t i)
{
        set_desc(&rxq.m->desc[i], (uint32_t)rxbuf[i], RX_LEN, D_WRITE, 0);
        vq_offer(&rxq, i);
}

static void run(uint32_t mem_upper_kib)
{
        (void)mem_upper_kib;
        find_device(KIND_NET);
        virtio_init(F_NET_MAC);
        if (!(features & F_NET_MAC))
                fail(20, "no MAC feature");
        uint8_t mac[6];
        for (int i = 0; i < 6; i++)
                mac[i] = *(volatile uint8_t *)(dev_base + R_CONFIG + i);
        vq_setup(&rxq, 0, &qmem[0], 8);
        vq_setup(&txq, 1, &qmem[1], 8);
        for (uint16_t i = 0; i < RX_BUFS; i++)
                offer_rx(i);
        driver_ok();
        vq_notify(&rxq);
        puts(NAME ": mac ");
        for (int i = 0; i < 6; i++) {
                puthex(mac[i], 2);
                putc(i < 5 ? ':' : '\n');
        }

        /* Receive until a frame of our EtherType arrives; give the others back. */
        uint32_t id, len;
        uint8_t *f;
        for (uint32_t frames = 0;; frames++) {
                if (frames == 1000)
                        fail(21, "no frame of EtherType 0x88b5 among 1000");
                len = vq_wait(&rxq, &id);
                if (id >= RX_BUFS || len > RX_LEN)
                        fail(21, "bad used entry");
                f = rxbuf[id];
                if (len >= NET_HDR + 14 && f[NET_HDR + 12] == 0x88 && f[NET_HDR + 13] == 0xb5)
                        break;
                offer_rx((uint16_t)id);
                vq_notify(&rxq);
        }
        if (f[0] != 0 || f[1] != 0 || f[10] != 1 || f[11] != 0)
                fail(22, "receive header: flags, gso_type or num_buffers wrong");
        puts(NAME ": got ");
        putdec(len - NET_HDR);
        putc(' ');
        for (uint32_t i = NET_HDR; i < len; i++)
                puthex(f[i], 2);
        putc('\n');

        /* Send our frame: header and frame in two descriptors. */
        static const char text[] = "pykvm guest->host";
        for (uint32_t i = 0; i < sizeof(txframe); i++)
                txframe[i] = (uint8_t)((i * 7 + 3) & 0xff);
        for (int i = 0; i < 6; i++) {
                txframe[i] = 0xff;
                txframe[6 + i] = mac[i];
        }
        txframe[12] = 0x88;
        txframe[13] = 0xb5;
        for (uint32_t i = 0; i < sizeof(text) - 1; i++)
                txframe[14 + i] = (uint8_t)text[i];
        memset(txhdr, 0, sizeof(txhdr));
        set_desc(&txq.m->desc[0], (uint32_t)txhdr, NET_HDR, D_NEXT, 1);
        set_desc(&txq.m->desc[1], (uint32_t)txframe, sizeof(txframe), 0, 0);
        vq_offer(&txq, 0);
        vq_notify(&txq);
        vq_wait(&txq, 0);
        check_interrupt();
        puts(NAME ": sent ");
        putdec(sizeof(txframe));
        puts("\n" NAME ": ok\n");
        finish(0x14);
}

/* ---- virtio-blk ------------------------------------------------------------ */

#elif VIRTIO_KIND == KIND_BLK

#define F_BLK_RO (1ull << 5)
#define F_BLK_FLUSH (1ull << 9)
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define ST_OK 0
#define ST_IOERR 1

struct blk_req {
        uint32_t type, reserved;
        uint64_t sector;
};

static struct vq rq;
static struct blk_req hdr[16];
static volatile uint8_t status[16];
static struct desc itable[4] __attribute__((aligned(16)));
static uint8_t wbuf[9 * 512], rbuf[9 * 512];
static char ident[21];

/* One request through descriptors 0-2 (or an indirect table); data may be split in two. */
static uint8_t blk_request(uint32_t type, uint64_t sector, void *data, uint32_t len, int split)
{
        struct desc *d = rq.m->desc;
        uint16_t dflags = type == T_OUT ? 0 : D_WRITE;
        hdr[0].type = type;
        hdr[0].reserved = 0;
        hdr[0].sector = sector;
        status[0] = 0xff;
        struct desc *t = d;
        int indirect = split && (features & F_INDIRECT_DESC);
        if (indirect)
                t = itable;
        int n = 0;
        set_desc(&t[n], (uint32_t)&hdr[0], sizeof(hdr[0]), D_NEXT, (uint16_t)(n + 1));
        n++;
        if (len && split) {
                set_desc(&t[n], (uint32_t)data, len / 2, dflags | D_NEXT, (uint16_t)(n + 1));
                n++;
                set_desc(&t[n], (uint32_t)data + len / 2, len - len / 2, dflags | D_NEXT, (uint16_t)(n + 1));
                n++;
        } else if (len) {
                set_desc(&t[n], (uint32_t)data, len, dflags | D_NEXT, (uint16_t)(n + 1));
                n++;
        }
        set_desc(&t[n], (uint32_t)&status[0], 1, D_WRITE, 0);
        n++;
        if (indirect)
                set_desc(&d[0], (uint32_t)itable, (uint32_t)(n * sizeof(struct desc)), D_INDIRECT, 0);
        vq_offer(&rq, 0);
        vq_notify(&rq);
        uint32_t id, used = vq_wait(&rq, &id);
        if (id != 0)
                fail(6, "used entry names the wrong chain");
        /* Bytes written: all of a successful read; else at least the status byte (QEMU counts
         * the whole device-writable part even for a failed read or a short id). */
        uint32_t writable = (type == T_OUT ? 0 : len) + 1;
        if ((type == T_IN && status[0] == ST_OK) ? used != writable : (used < 1 || used > writable))
                fail(6, "wrong used length");
        return status[0];
}

static uint8_t pattern(uint32_t s, uint32_t i)
{
        static const char tag[] = "pykvm-virtio";
        if (i < 4)
                return (uint8_t)(s >> (8 * i));
        if (i < 16)
                return (uint8_t)tag[i - 4];
        return (uint8_t)(i * 7 + s * 13 + 0x5a);
}

static void fill_pattern(uint8_t *buf, uint32_t sector, uint32_t count)
{
        for (uint32_t s = 0; s < count; s++)
                for (uint32_t i = 0; i < 512; i++)
                        buf[s * 512 + i] = pattern(sector + s, i);
}

static int same(const uint8_t *a, const uint8_t *b, uint32_t n)
{
        while (n--)
                if (*a++ != *b++)
                        return 0;
        return 1;
}

#define BENCH_BUF 0x1000000u            /* 16 MiB: the read buffers of the benchmark */

static void blk_bench(uint32_t mib, uint64_t capacity, uint32_t mem_upper_kib)
{
        uint32_t req = option("req", 256) * 1024, depth = option("depth", 4);
        if (req == 0 || req % 512 || depth == 0 || depth > 16 || 3 * depth > rq.num)
                fail(7, "bad req= or depth=");
        if ((BENCH_BUF + depth * req) / 1024 > 1024 + mem_upper_kib)
                fail(7, "not enough RAM for the benchmark buffers");
        uint64_t total = (uint64_t)mib * 2048;
        if (total > capacity)
                total = capacity;
        uint32_t per = req / 512;
        struct desc *d = rq.m->desc;
        puts("bench: start\n");
        uint64_t sector = 0;
        while (sector < total) {
                uint32_t n = 0;
                for (; n < depth && sector + (uint64_t)n * per < total; n++) {
                        uint64_t s = sector + (uint64_t)n * per;
                        uint32_t len = (total - s < per) ? (uint32_t)(total - s) * 512 : req;
                        hdr[n].type = T_IN;
                        hdr[n].reserved = 0;
                        hdr[n].sector = s;
                        status[n] = 0xff;
                        set_desc(&d[3 * n], (uint32_t)&hdr[n], 16, D_NEXT, (uint16_t)(3 * n + 1));
                        set_desc(&d[3 * n + 1], BENCH_BUF + n * req, len, D_WRITE | D_NEXT, (uint16_t)(3 * n + 2));
                        set_desc(&d[3 * n + 2], (uint32_t)&status[n], 1, D_WRITE, 0);
                        vq_offer(&rq, (uint16_t)(3 * n));
                }
                vq_notify(&rq);
                for (uint32_t i = 0; i < n; i++)
                        vq_wait(&rq, 0);
                for (uint32_t i = 0; i < n; i++) {
                        if (status[i] != ST_OK)
                                fail(7, "read failed");
                        if (*(volatile uint32_t *)(BENCH_BUF + i * req) != (uint32_t)(sector + (uint64_t)i * per))
                                fail(7, "data is not the sector number pattern");
                }
                sector += (uint64_t)n * per;
        }
        puts("bench: done ");
        putdec((uint32_t)(total / 2048));
        puts(" MiB\n");
        finish(0x10);
}

static void run(uint32_t mem_upper_kib)
{
        find_device(KIND_BLK);
        virtio_init(F_BLK_RO | F_BLK_FLUSH | F_INDIRECT_DESC | F_EVENT_IDX);
        uint64_t capacity = rd32(dev_base + R_CONFIG) | (uint64_t)rd32(dev_base + R_CONFIG + 4) << 32;
        vq_setup(&rq, 0, &qmem[0], QMAX);
        driver_ok();
        int ro = (features & F_BLK_RO) != 0;
        puts(NAME ": capacity ");
        putdec((uint32_t)capacity);
        puts(" sectors");
        if (ro)
                puts(", read-only");
        if (features & F_BLK_FLUSH)
                puts(", flush");
        if (features & F_INDIRECT_DESC)
                puts(", indirect descriptors");
        if (features & F_EVENT_IDX)
                puts(", event index");
        putc('\n');

        uint32_t mib = option("bench", 0);
        if (mib)
                blk_bench(mib, capacity, mem_upper_kib);
        if (capacity < 16)
                fail(8, "the disk is too small (16 sectors at least)");
        uint32_t last = (uint32_t)capacity - 1;
        fill_pattern(wbuf, 1, 8);
        fill_pattern(wbuf + 8 * 512, last, 1);

        uint8_t st = blk_request(T_OUT, 1, wbuf, 8 * 512, 1);
        if (ro) {
                if (st != ST_IOERR)
                        fail(9, "a write to a read-only device did not fail with IOERR");
                puts(NAME ": write refused with IOERR (read-only device)\n");
                if (blk_request(T_IN, 1, rbuf, 8 * 512, 0) != ST_OK)
                        fail(9, "read from the read-only device failed");
                puts(NAME ": read 8 sectors\n");
        } else {
                if (st != ST_OK)
                        fail(10, "write of sectors 1-8 failed");
                if (blk_request(T_OUT, last, wbuf + 8 * 512, 512, 0) != ST_OK)
                        fail(10, "write of the last sector failed");
                if (features & F_BLK_FLUSH) {
                        if (blk_request(T_FLUSH, 0, 0, 0, 0) != ST_OK)
                                fail(10, "flush failed");
                }
                memset(rbuf, 0, sizeof(rbuf));
                if (blk_request(T_IN, 1, rbuf, 8 * 512, 0) != ST_OK ||
                    blk_request(T_IN, last, rbuf + 8 * 512, 512, 1) != ST_OK)
                        fail(11, "read back failed");
                if (!same(wbuf, rbuf, sizeof(wbuf)))
                        fail(11, "read back differs from what was written");
                puts(NAME ": wrote, flushed and read back 9 sectors: they match\n");
        }
        if (blk_request(T_IN, capacity, rbuf, 512, 0) != ST_IOERR)
                fail(12, "a read past the end did not fail with IOERR");
        puts(NAME ": read past the end: IOERR\n");
        memset(ident, 0, sizeof(ident));
        if (blk_request(T_GET_ID, 0, ident, 20, 0) != ST_OK)
                fail(13, "GET_ID failed");
        puts(NAME ": id ");
        puts(ident);
        putc('\n');
        check_interrupt();
        puts(NAME ": ok\n");
        finish(ro ? 0x11 : 0x10);
}

/* ---- virtio-console -------------------------------------------------------- */

#elif VIRTIO_KIND == KIND_CONSOLE

static struct vq rxq, txq;
static char txbuf[256];
static char rxbuf[64];

static void send(const char *s)
{
        uint32_t n = 0;
        while (s[n] && n < sizeof(txbuf))
                txbuf[n] = s[n], n++;
        set_desc(&txq.m->desc[0], (uint32_t)txbuf, n, 0, 0);
        vq_offer(&txq, 0);
        vq_notify(&txq);
        vq_wait(&txq, 0);
}

static void run(uint32_t mem_upper_kib)
{
        (void)mem_upper_kib;
        find_device(KIND_CONSOLE);
        virtio_init(0);
        vq_setup(&rxq, 0, &qmem[0], 8);
        vq_setup(&txq, 1, &qmem[1], 8);
        driver_ok();
        send("Hello from virtio-console!\n");
        check_interrupt();
        if (has_word("echo")) {
                static char line[128];
                uint32_t n = 0;
                for (;;) {
                        set_desc(&rxq.m->desc[0], (uint32_t)rxbuf, sizeof(rxbuf), D_WRITE, 0);
                        vq_offer(&rxq, 0);
                        vq_notify(&rxq);
                        uint32_t got = vq_wait(&rxq, 0), i;
                        for (i = 0; i < got && rxbuf[i] != '\n' && rxbuf[i] != '\r'; i++)
                                if (n < sizeof(line) - 1)
                                        line[n++] = rxbuf[i];
                        if (i < got)
                                break;
                }
                line[n] = 0;
                static char reply[160];
                const char *pre = "virtio-console: got ";
                uint32_t k = 0;
                while (*pre)
                        reply[k++] = *pre++;
                for (uint32_t i = 0; i < n; i++)
                        reply[k++] = line[i];
                reply[k++] = '\n';
                reply[k] = 0;
                send(reply);
        }
        puts(NAME ": ok\n");
        finish(0x12);
}

/* ---- virtio-rng ------------------------------------------------------------ */

#else

static struct vq q;
static uint8_t entropy[64];

static void run(uint32_t mem_upper_kib)
{
        (void)mem_upper_kib;
        find_device(KIND_RNG);
        virtio_init(0);
        vq_setup(&q, 0, &qmem[0], 8);
        driver_ok();
        set_desc(&q.m->desc[0], (uint32_t)entropy, 32, D_WRITE, 0);
        set_desc(&q.m->desc[1], (uint32_t)entropy + 32, 32, D_WRITE, 0);
        vq_offer(&q, 0);
        vq_offer(&q, 1);
        vq_notify(&q);
        uint32_t got = vq_wait(&q, 0) + vq_wait(&q, 0);
        if (got != 64)
                fail(14, "short entropy");
        check_interrupt();
        uint8_t seen[256 / 8];
        memset(seen, 0, sizeof(seen));
        uint32_t distinct = 0, differ = 0;
        for (uint32_t i = 0; i < 64; i++) {
                uint8_t b = entropy[i];
                if (!(seen[b / 8] & (1 << (b % 8)))) {
                        seen[b / 8] |= (uint8_t)(1 << (b % 8));
                        distinct++;
                }
                if (i < 32 && entropy[i] != entropy[i + 32])
                        differ = 1;
        }
        puts(NAME ": 64 bytes, ");
        putdec(distinct);
        puts(" distinct values\n");
        if (distinct < 8 || !differ)
                fail(14, "the bytes look constant");
        puts(NAME ": ok\n");
        finish(0x13);
}

#endif

/* ---- entry (from virtio-entry.S) ------------------------------------------- */

#define MB_BOOT_MAGIC 0x2badb002

struct mb_info {
        uint32_t flags, mem_lower, mem_upper, boot_device, cmdline;
};

void kmain(uint32_t magic, const struct mb_info *mbi)
{
        if (magic != MB_BOOT_MAGIC)
                fail(15, "not started by a Multiboot loader");
        if (mbi->flags & (1 << 2) && mbi->cmdline)
                cmdline = (const char *)mbi->cmdline;
        run(mbi->flags & 1 ? mbi->mem_upper : 0);
}
