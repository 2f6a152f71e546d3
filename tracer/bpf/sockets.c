// Socket syscall capture and gating for supervised processes.
//
// Loaded by tracer/probes.py with bcc. SNAPLEN (bytes of payload copied into each event) is
// passed as a -D flag. Only syscall tracepoint arguments and user memory are read: no kernel
// structs, so borrowed kernel headers cannot skew offsets.

#include <uapi/linux/ptrace.h>

#ifndef SNAPLEN
#define SNAPLEN 4096
#endif

#define MODE_OBSERVE 1
#define MODE_GATE 2
#define MODE_TRACE 3        // observe, and wake the reader once per WAKE_EVERY events a CPU
#define WAKE_EVERY 4096
#define RB_NO_WAKEUP 1
#define RB_FORCE_WAKEUP 2

#define SOCK_LISTEN 1
#define SOCK_CONN 2

#define DIR_IN 0
#define DIR_OUT 1
#define DIR_CTL 2

#define SIGSTOP_NR 19
#define MSG_PEEK_FLAG 2
#define EBADF_NR 9
#define ECONNRESET_NR 104
#define ETIMEDOUT_NR 110

enum call {
    C_ACCEPT = 1, C_ACCEPT4, C_READ, C_READV, C_RECVFROM, C_RECVMSG,
    C_WRITE, C_WRITEV, C_SENDTO, C_SENDMSG, C_SENDFILE,
    C_CLOSE, C_SHUTDOWN, C_DUP, C_DUP2, C_DUP3, C_LISTEN,
};

struct sock_key {
    u32 tgid;
    s32 fd;
};

struct sock_val {
    u64 conn;
    u32 kind;
    u32 pad;
};

struct saved_args {
    u32 call;
    s32 fd;
    u64 buf;      // flat buffer, iovec array, msghdr or sockaddr, depending on call
    u64 count;    // buffer length or iovec count
    u64 addrlen;  // accept: user pointer to the address length
    u32 flags;
    u32 pad;
    u64 conn;     // the connection the fd held when the call began (close needs it)
    u64 owner;    // in arg_slots: the thread that holds the slot (0: free)
};

struct event {
    u64 ts_ns;
    u64 seq;
    u64 conn;
    s64 ret;
    u64 buf;
    u64 count;
    u32 tgid;
    u32 tid;
    u32 call;
    s32 fd;
    u32 data_len;
    u8 dir;
    u8 gated;
    u8 input;
    u8 peer_len;
    u8 peer[28];   // struct sockaddr_in / sockaddr_in6 as returned by accept
    u8 data[SNAPLEN];
};
_Static_assert(__builtin_offsetof(struct event, data) == 100, "EVENT_HEADER in tracer/probes.py");

// Supervised tgid -> mode: in the tgid's slot of tgid_slots (tgid modulo TGID_SLOTS), or in the
// tgids hash when another supervised tgid holds that slot. Syscall tracepoints fire for every
// process on the machine, and for all but the supervised ones this array lookup is all a probe
// does: a hash lookup there cost each of their syscalls more than 100 ns.
#ifndef TGID_SLOTS
#define TGID_SLOTS 65536
#endif
struct tgid_slot {
    u32 tgid;
    u32 mode;
};
BPF_ARRAY(tgid_slots, struct tgid_slot, TGID_SLOTS);
BPF_HASH(tgids, u32, u32, 1024);
BPF_HASH(tids, u32, u8, 65536);                  // seized thread ids (gating applies only to these)
BPF_HASH(socks, struct sock_key, struct sock_val, 65536);
// Arguments saved at syscall entry, until its exit: in the thread's slot of arg_slots (tid modulo
// ARG_SLOTS), or in the args hash when another thread holds that slot. An array lookup is a
// pointer computation; a hash update and delete per syscall cost the traced thread more than
// the rest of the probe.
#ifndef ARG_SLOTS
#define ARG_SLOTS 16384
#endif
BPF_ARRAY(arg_slots, struct saved_args, ARG_SLOTS);
BPF_HASH(args, u32, struct saved_args, 65536);
BPF_ARRAY(counters, u64, 4);                     // 0: event seq, 1: conn ids, 2: lost events
BPF_PERCPU_ARRAY(scratch, struct event, 1);      // an event is built here, then copied out at its size
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(unwoken, u32, 1);               // MODE_TRACE: events since this CPU last woke the reader

// The tgid's mode, 0 when it is not supervised.
static __always_inline u32 mode_of(u32 tgid) {
    u32 idx = tgid % TGID_SLOTS;
    struct tgid_slot *slot = tgid_slots.lookup(&idx);
    if (!slot || slot->tgid == 0)
        return 0;
    if (slot->tgid == tgid)
        return slot->mode;
    u32 *mode = tgids.lookup(&tgid);
    return mode ? *mode : 0;
}

static __always_inline u64 next_counter(u32 idx) {
    u64 *v = counters.lookup(&idx);
    if (!v)
        return 0;
    return __sync_fetch_and_add(v, 1) + 1;
}

// The slot the thread's arguments go in when no other thread holds it.
static __always_inline struct saved_args *slot_of(u32 tid) {
    u32 idx = tid % ARG_SLOTS;
    return arg_slots.lookup(&idx);
}

// The thread's slot if it holds it or could claim it, else NULL (use the args hash).
static __always_inline struct saved_args *claim_slot(u32 tid) {
    struct saved_args *slot = slot_of(tid);
    if (!slot)
        return 0;
    u64 owner = __sync_val_compare_and_swap(&slot->owner, 0, (u64)tid);
    return (owner == 0 || owner == tid) ? slot : 0;
}

// Where the thread's saved arguments are: its slot, the args hash, or NULL.
static __always_inline struct saved_args *saved_args_of(u32 tid, struct saved_args **slot) {
    struct saved_args *s = slot_of(tid);
    if (s && s->owner == tid) {
        *slot = s;
        return s;
    }
    *slot = 0;
    return args.lookup(&tid);
}

static __always_inline void store_args(u32 tid, struct saved_args *a) {
    struct saved_args *slot = claim_slot(tid);
    if (slot) {
        a->owner = tid;
        *slot = *a;
    } else {
        args.update(&tid, a);
    }
}

static __always_inline void drop_args(u32 tid, struct saved_args *slot) {
    if (slot)
        __sync_val_compare_and_swap(&slot->owner, (u64)tid, 0);
    else
        args.delete(&tid);
}

static __always_inline int save(u32 call, s32 fd, u64 buf, u64 count, u64 addrlen, u32 flags) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    if (!mode_of(tgid))
        return 0;
    struct sock_key key = {.tgid = tgid, .fd = fd};
    struct sock_val *sv = socks.lookup(&key);
    if (!sv || ((call == C_ACCEPT || call == C_ACCEPT4) && sv->kind != SOCK_LISTEN)) {
        struct saved_args *slot;
        if (saved_args_of(tid, &slot))
            drop_args(tid, slot);  // never let arguments seeded at attach outlive their syscall
        return 0;
    }
    struct saved_args a = {.call = call, .fd = fd, .buf = buf, .count = count,
                           .addrlen = addrlen, .flags = flags, .conn = sv->conn};
    // A socket's entry leaves the map when close begins, not when it returns: the fd number is
    // free for another thread's accept as soon as the kernel releases it inside close, and an
    // entry deleted at exit would then take the new connection's entry with it.
    if (call == C_CLOSE)
        socks.delete(&key);
    store_args(tid, &a);
    return 0;
}

static __always_inline int save_untracked(u32 call, s32 fd, u64 count) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    if (!mode_of(tgid))
        return 0;
    struct saved_args a = {.call = call, .fd = fd, .count = count};
    store_args(tid, &a);
    return 0;
}

// First user buffer of the call: flat buffer, iovec[0] or msghdr->msg_iov[0].
static __always_inline void first_buffer(struct saved_args *a, u64 *base, u64 *len) {
    u64 iov[2] = {0, 0};
    u64 msg_iov = 0;
    switch (a->call) {
    case C_READ: case C_RECVFROM: case C_WRITE: case C_SENDTO:
        *base = a->buf;
        *len = a->count;
        return;
    case C_READV: case C_WRITEV:
        if (a->count == 0)
            break;
        bpf_probe_read_user(iov, sizeof(iov), (void *)a->buf);
        *base = iov[0];
        *len = iov[1];
        return;
    case C_RECVMSG: case C_SENDMSG:
        bpf_probe_read_user(&msg_iov, sizeof(msg_iov), (void *)(a->buf + 16));
        if (!msg_iov)
            break;
        bpf_probe_read_user(iov, sizeof(iov), (void *)msg_iov);
        *base = iov[0];
        *len = iov[1];
        return;
    }
    *base = 0;
    *len = 0;
}

static __always_inline int finish(s64 ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    struct saved_args *slot;
    // Read at exit, not saved at entry: a thread blocked in read when gating begins is held.
    u32 mode = mode_of(tgid);
    if (!mode) {
        // Its slot is freed; arguments it saved in the args hash before its tgid stopped being
        // supervised stay there until the probes unload, since an unsupervised thread's exit
        // must not pay a hash lookup.
        slot = slot_of(tid);
        if (slot && slot->owner == tid)
            drop_args(tid, slot);
        return 0;
    }
    struct saved_args *a = saved_args_of(tid, &slot);
    if (!a)
        return 0;
    u32 call = a->call;
    struct sock_key key = {.tgid = tgid, .fd = a->fd};
    struct sock_val *sv = socks.lookup(&key);
    u64 conn = sv ? sv->conn : 0;
    u8 dir = DIR_CTL;
    u8 input = 0;
    s32 fd = a->fd;

    switch (call) {
    case C_ACCEPT: case C_ACCEPT4: {
        if (ret < 0)
            goto out;
        struct sock_key nk = {.tgid = tgid, .fd = (s32)ret};
        struct sock_val nv = {.conn = next_counter(1), .kind = SOCK_CONN};
        socks.update(&nk, &nv);
        conn = nv.conn;
        input = 1;
        break;
    }
    case C_LISTEN: {
        if (ret != 0)
            goto out;
        struct sock_val lv = {.conn = 0, .kind = SOCK_LISTEN};
        socks.update(&key, &lv);
        break;
    }
    case C_READ: case C_READV: case C_RECVFROM: case C_RECVMSG:
        if (!sv || sv->kind != SOCK_CONN)
            goto out;
        if (ret < 0 && ret != -ECONNRESET_NR && ret != -ETIMEDOUT_NR)
            goto out;
        dir = DIR_IN;
        input = (a->flags & MSG_PEEK_FLAG) ? 0 : 1;
        break;
    case C_WRITE: case C_WRITEV: case C_SENDTO: case C_SENDMSG: case C_SENDFILE:
        if (!sv || sv->kind != SOCK_CONN || ret <= 0)
            goto out;
        dir = DIR_OUT;
        break;
    case C_CLOSE:
        if (ret == -EBADF_NR)
            goto out;
        conn = a->conn;
        break;
    case C_SHUTDOWN:
        if (!sv)
            goto out;
        break;
    case C_DUP: case C_DUP2: case C_DUP3: {
        if (!sv || ret < 0 || ret == a->fd)
            goto out;
        struct sock_key dk = {.tgid = tgid, .fd = (s32)ret};
        struct sock_val dv = *sv;
        socks.update(&dk, &dv);
        fd = (s32)ret;
        break;
    }
    default:
        goto out;
    }

    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        goto out;
    e->ts_ns = bpf_ktime_get_ns();
    e->seq = next_counter(0);
    e->conn = conn;
    e->ret = ret;
    e->buf = a->buf;
    e->count = a->count;
    e->tgid = tgid;
    e->tid = tid;
    e->call = call;
    e->fd = fd;
    e->dir = dir;
    e->input = input;
    e->gated = 0;
    e->peer_len = 0;
    e->data_len = 0;

    if ((call == C_ACCEPT || call == C_ACCEPT4) && a->buf) {
        bpf_probe_read_user(e->peer, sizeof(e->peer), (void *)a->buf);
        e->peer_len = sizeof(e->peer);
    }
    if ((dir == DIR_IN || dir == DIR_OUT) && ret > 0) {
        u64 base = 0, len = 0;
        first_buffer(a, &base, &len);
        u64 n = (u64)ret < len ? (u64)ret : len;
        if (n > SNAPLEN)
            n = SNAPLEN;
        if (base && n > 0 && n <= SNAPLEN) {
            if (bpf_probe_read_user(e->data, n, (void *)base) == 0)
                e->data_len = n;
        }
    }

    if (input && mode == MODE_GATE && tids.lookup(&tid)) {
        e->gated = 1;
        bpf_send_signal_thread(SIGSTOP_NR);
    }
    // A wake-up per event costs the traced thread more than the event itself (on a VM, an exit
    // to the hypervisor). A gating tracer is woken by a held thread's stop and reads the ring
    // then, so only inputs that are not held wake it; the rest wait for that or its 20 ms poll.
    // A tracer that only prints reads them on its 20 ms poll: 32 MiB of ring holds seconds of
    // events, and a wake-up per 64 events cost each event about 250 ns of probe time (an
    // interrupt raised on the traced thread's CPU; a VM exit). One per 4096 remains, in case.
    // Without FORCE, the ring wakes the reader only if it has read every earlier record: behind
    // a record written with NO_WAKEUP, a default record wakes nobody. So an observer (whose
    // replayer waits on each input) must keep the default for every record.
    u64 wake = 0;
    if (mode == MODE_GATE && (e->gated || !input))
        wake = RB_NO_WAKEUP;
    if (mode == MODE_TRACE) {
        u32 *n = unwoken.lookup(&zero);
        wake = RB_NO_WAKEUP;
        if (n && ++*n >= WAKE_EVERY) {
            *n = 0;
            wake = RB_FORCE_WAKEUP;
        }
    }
    u64 size = sizeof(struct event) - SNAPLEN + e->data_len;
    if (size > sizeof(struct event))
        size = sizeof(struct event);
    if (events.ringbuf_output(e, size, wake) != 0)
        next_counter(2);
out:
    drop_args(tid, slot);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept) {
    return save(C_ACCEPT, args->fd, (u64)args->upeer_sockaddr, 0, (u64)args->upeer_addrlen, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) {
    return save(C_ACCEPT4, args->fd, (u64)args->upeer_sockaddr, 0, (u64)args->upeer_addrlen, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_listen) { return save_untracked(C_LISTEN, args->fd, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_listen) { return finish(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_read) {
    return save(C_READ, args->fd, (u64)args->buf, args->count, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) {
    return save(C_READV, args->fd, (u64)args->vec, args->vlen, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) {
    return save(C_RECVFROM, args->fd, (u64)args->ubuf, args->size, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    return save(C_RECVMSG, args->fd, (u64)args->msg, 0, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return finish(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_write) {
    return save(C_WRITE, args->fd, (u64)args->buf, args->count, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) {
    return save(C_WRITEV, args->fd, (u64)args->vec, args->vlen, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) {
    return save(C_SENDTO, args->fd, (u64)args->buff, args->len, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    return save(C_SENDMSG, args->fd, (u64)args->msg, 0, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendfile64) {
    return save(C_SENDFILE, args->out_fd, 0, args->count, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendfile64) { return finish(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close) { return save(C_CLOSE, args->fd, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_close) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_shutdown) {
    return save(C_SHUTDOWN, args->fd, 0, args->how, 0, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_shutdown) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup) { return save(C_DUP, args->fildes, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return save(C_DUP2, args->oldfd, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup2) { return finish(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return save(C_DUP3, args->oldfd, 0, 0, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup3) { return finish(args->ret); }
