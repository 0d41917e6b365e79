/* Interfaces between the guest's boot code (main.c) and what it runs. */
#ifndef FLATLET_GUEST_MAIN_H
#define FLATLET_GUEST_MAIN_H
#include "guest.h"

#define IRQ_VECTOR_BASE 32

u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 v);
void lapic_eoi(void);
u32 lapic_id(void);

void for_each_option(void (*f)(const char *word, u32 len));
int option_is(const char *word, u32 len, const char *name);

/* virtio.c */
void virtio_run(void);
void virtio_heartbeat(u64 n);

/* options.c */
void run_options(void);
void ap_idle(u32 id) __attribute__((noreturn));
void handle_irq(u32 irq);

/* stay.c */
void stay(void) __attribute__((noreturn));
void ioapic_route(u32 pin, u32 vector, u32 dest);

/* vsock.c */
void vsock_found(u64 base, u32 pin);
int vsock_run(void);
int vsock_active(void);
void vsock_step(void);
void vsock_irq(void);

#endif
