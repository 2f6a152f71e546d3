// Socket syscall capture and gating for supervised processes.
//
// Loaded by tracer/probes.py with bcc. SNAPLEN (bytes of payload copied into each event) is
// passed as a -D flag. Only syscall tracepoint arguments, the user registers saved at syscall
// entry and user memory are read: no kernel structs, so borrowed kernel headers cannot skew
// offsets.

#include <uapi/linux/ptrace.h>

#ifndef SNAPLEN
#define SNAPLEN 4096
#endif
// close_range's record has a slot (u64 conn, s32 fd, 4 bytes unused) in its data for each fd
// number its probe looked at, up to RANGE_MAX of them whatever the snap length
#define RANGE_PAIR 16
#define RANGE_MAX 256
#define EVENT_DATA (SNAPLEN > RANGE_PAIR * RANGE_MAX ? SNAPLEN : RANGE_PAIR * RANGE_MAX)

#define MODE_OBSERVE 1
#define MODE_GATE 2
#define MODE_TRACE 3        // observe; wake the reader per WAKE_EVERY events a CPU, and per connection event
#define MODE_HOLD_OUTPUT 4  // inputs run on; a thread's outputs wait at its breakpoints (output_hold.py)
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
#define ECONNRESET_NR 104
#define ETIMEDOUT_NR 110

enum call {
    C_ACCEPT = 1, C_ACCEPT4, C_READ, C_READV, C_RECVFROM, C_RECVMSG,
    C_WRITE, C_WRITEV, C_SENDTO, C_SENDMSG, C_SENDFILE,
    C_CLOSE, C_SHUTDOWN, C_DUP, C_DUP2, C_DUP3, C_LISTEN, C_CLOSE_RANGE,
    C_SLEEP,  // not a syscall: a thread that took input went to sleep (SERIALIZE, below)
};

struct sock_key {
    u32 tgid;
    s32 fd;
};

struct sock_val {
    u64 conn;
    u32 kind;
    u32 outputs_held;   // accepted in MODE_HOLD_OUTPUT: its inputs need not stop their thread
};

// What an event's `gated` byte says (tracer/events.py: Hold)
#define HOLD_THREAD 1        // input: its thread is stopped until the tracer's caller releases it
#define HOLD_OUTPUTS 2       // input: its thread's outputs wait until the caller releases it
#define HOLD_OUTPUTS_STOP 3  // as HOLD_OUTPUTS, and the thread is stopped to be armed or read whole
#define HOLD_MISSED 4        // output: written by an armed thread, past its breakpoints
#define HOLD_CROSSED 5       // output: by a disarmed thread, after another thread's later input

// The arguments of the syscall that is returning, read from the registers the kernel saved at
// its entry (x86_64: fd, buffer, count and flags stay in rdi, rsi, rdx and r10 until the return).
// Reading them at exit needs no probe at entry, and a thread that was already blocked in the
// call when the probes loaded is seen like any other.
struct call_args {
    u32 call;
    s32 fd;
    u64 buf;      // flat buffer, iovec array, msghdr or sockaddr, depending on call
    u64 count;    // buffer length or iovec count
    u32 flags;
};

// user_regs_struct from r10 to rdi: the x86_64 ABI order of struct pt_regs, which ptrace's
// PTRACE_GETREGS shares, so borrowed kernel headers cannot skew it.
struct regs_r10_to_di {
    u64 r10, r9, r8, ax, cx, dx, si, di;
};
#define REGS_R10_OFFSET 56

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
    u8 data[EVENT_DATA];
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
BPF_ARRAY(counters, u64, 4);                     // 0: event seq, 1: conn ids, 2: lost events
BPF_PERCPU_ARRAY(scratch, struct event, 1);      // an event is built here, then copied out at its size
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(unwoken, u32, 1);               // MODE_TRACE: events since this CPU last woke the reader
// MODE_HOLD_OUTPUT: tid -> ARMED when its breakpoints are on, else the seq of the last input the
// tracer knew committed when it disarmed them; tgid -> the seq of its latest input
#define ARMED (1ULL << 63)
BPF_HASH(armed, u32, u64, 65536);
BPF_HASH(last_input, u32, u64, 1024);
// tgid -> the highest fd number the socket map has held for it (close_range looks no further)
BPF_HASH(top_fd, u32, u32, 1024);
#ifdef SERIALIZE
// tid -> 1 from the thread's last input until it next goes to sleep (tracer/serial.py)
BPF_HASH(busy, u32, u8, 65536);
// tgid -> the bytes its threads have read from tracked connections, and the thread that read
// the last of them: a replaying follower that sent one input waits until the count covers it
// and that thread is no longer busy (supervise/replayer.py), without a wake-up of its tracer.
// The thread is written before the count, so a reader that sees the count sees the thread.
struct input_tally {
    u64 bytes;
    u32 tid;
    u32 pad;
};
BPF_HASH(tallies, u32, struct input_tally, 1024);
#endif

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

// Only ever raised: two threads of a process raising it at once may leave the lower number,
// and a close_range above it then misses a socket, as if it were not tracked.
static __always_inline void raise_top_fd(u32 tgid, s32 fd) {
    u32 *top = top_fd.lookup(&tgid);
    if (top) {
        if ((u32)fd > *top)
            *top = fd;
        return;
    }
    u32 v = fd;
    top_fd.update(&tgid, &v);
}

static __always_inline u64 next_counter(u32 idx) {
    u64 *v = counters.lookup(&idx);
    if (!v)
        return 0;
    return __sync_fetch_and_add(v, 1) + 1;
}

// bpf_probe_read_user, as bcc's helpers.h declares it, under another name: bcc's front end
// reads the kernel's whole symbol table (/proc/kallsyms) again at each call it sees by that name
// to check that the helper exists (it does since 5.5, and ring buffers need 5.8), about 0.14 s
// of compile time a call.
static int (*read_user)(void *dst, u32 size, const void *unsafe_ptr) = (void *)BPF_FUNC_probe_read_user;

// The returning syscall's arguments, from the registers saved at its entry.
static __always_inline void read_args(u32 call, struct call_args *a) {
    struct regs_r10_to_di r = {};
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(&r, sizeof(r), (void *)regs + REGS_R10_OFFSET);
    a->call = call;
    a->fd = (s32)r.di;
    a->buf = r.si;
    a->count = r.dx;
    a->flags = 0;
    switch (call) {
    case C_ACCEPT: case C_ACCEPT4: case C_RECVMSG: case C_SENDMSG:
        a->count = 0;
        a->flags = call == C_RECVMSG || call == C_SENDMSG ? (u32)r.dx : 0;
        break;
    case C_RECVFROM: case C_SENDTO:
        a->flags = (u32)r.r10;
        break;
    case C_SENDFILE:
        a->buf = 0;
        a->count = r.r10;
        break;
    case C_SHUTDOWN:
        a->buf = 0;
        a->count = r.si;
        break;
    case C_LISTEN: case C_DUP: case C_DUP2: case C_DUP3:
        a->buf = 0;
        a->count = 0;
        break;
    case C_CLOSE_RANGE:  // first fd, last fd, flags
        a->buf = 0;
        a->count = (u32)r.si;
        a->flags = (u32)r.dx;
        break;
    }
}

// A vectored call's buffers are gathered here first: the verifier can bound a copy's offset and
// its length, but not their sum, so the space is twice the snap length (32 KiB at most, the
// largest per-CPU value).
struct gather_buf {
    u8 bytes[2 * SNAPLEN];
};
BPF_PERCPU_ARRAY(gather_scratch, struct gather_buf, 1);
#define MAX_IOVECS 16

// Copies the first min(ret, SNAPLEN) bytes the call moved into e->data: from its flat buffer,
// or from up to MAX_IOVECS buffers of its iovec array (readv, writev, msghdr->msg_iov).
static __always_inline u32 copy_payload(struct call_args *a, s64 ret, u8 *data) {
    u64 want = (u64)ret < SNAPLEN ? (u64)ret : SNAPLEN;
    u64 iovs = 0, iovcnt = 0;
    switch (a->call) {
    case C_READ: case C_RECVFROM: case C_WRITE: case C_SENDTO:
        if (a->buf && want > 0 && want <= SNAPLEN && read_user(data, want, (void *)a->buf) == 0)
            return want;
        return 0;
    case C_READV: case C_WRITEV:
        iovs = a->buf;
        iovcnt = a->count;
        break;
    case C_RECVMSG: case C_SENDMSG: {
        u64 msg[2] = {0, 0};  // msg_iov, msg_iovlen
        read_user(msg, sizeof(msg), (void *)(a->buf + 16));
        iovs = msg[0];
        iovcnt = msg[1];
        break;
    }
    default:
        return 0;
    }
    u32 zero = 0;
    struct gather_buf *g = gather_scratch.lookup(&zero);
    if (!g || !iovs)
        return 0;
    u64 got = 0;
    for (int i = 0; i < MAX_IOVECS; i++) {
        if (i >= iovcnt || got >= want)
            break;
        u64 iov[2] = {0, 0};  // iov_base, iov_len
        if (read_user(iov, sizeof(iov), (void *)(iovs + 16 * i)))
            break;
        u64 n = iov[1] < want - got ? iov[1] : want - got;
        if (got >= SNAPLEN || n > SNAPLEN)  // never: bounds for the verifier
            break;
        if (n && read_user(g->bytes + got, n, (void *)iov[0]))
            break;
        got += n;
        // forget got's lower bound (how many buffers had bytes so far): the verifier kept each
        // value apart and walked the rest of the loop once for each, about 60,000 instructions
        // a vectored call's program against 6,000 (an AND with all ones; asm, so it stays)
        asm volatile("%0 &= -1" : "+r"(got));
    }
    if (got > SNAPLEN)  // never: a bound for the verifier
        return 0;
    bpf_probe_read_kernel(data, got, g->bytes);
    return got;
}

// MODE_HOLD_OUTPUT: how an event of a traced thread is held. An input on a connection accepted
// in this mode runs on, unless its thread must first be armed (its breakpoints off) or the probe
// could not copy the input whole; an input on any other connection holds its thread as in
// MODE_GATE. An output must come from a disarmed thread, with no input that ran on in another
// thread since the tracer disarmed it (one that held its thread was released, so committed, by
// the time that thread could share it).
static __always_inline u8 hold_output(u32 tgid, u32 tid, struct event *e, u8 input, u32 outputs_held) {
    u64 *state = armed.lookup(&tid);
    u64 st = state ? *state : 0;
    if (input) {
        u8 hold = HOLD_THREAD;
        if (outputs_held) {
            u64 seq = e->seq;
            last_input.update(&tgid, &seq);
            hold = HOLD_OUTPUTS;
            if (!(st & ARMED) || (e->dir == DIR_IN && e->ret > 0 && e->data_len < e->ret))
                hold = HOLD_OUTPUTS_STOP;
        }
        if (hold != HOLD_OUTPUTS)
            bpf_send_signal_thread(SIGSTOP_NR);
        return hold;
    }
    if (e->dir != DIR_OUT)
        return 0;
    if (st & ARMED)
        return HOLD_MISSED;
    u64 *latest = last_input.lookup(&tgid);
    if (latest && *latest > st)
        return HOLD_CROSSED;
    return 0;
}

// Builds the event in this CPU's scratch space and writes it to the ring at its real size,
// stopping the thread first when it is a held input.
static __always_inline int emit(u32 mode, u32 tgid, u32 tid, u64 conn, s64 ret,
                                struct call_args *a, u8 dir, u8 input, s32 fd, u32 outputs_held) {
    u32 call = a->call;

    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);
    if (!e)
        return 0;
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
        read_user(e->peer, sizeof(e->peer), (void *)a->buf);
        e->peer_len = sizeof(e->peer);
    }
    if ((dir == DIR_IN || dir == DIR_OUT) && ret > 0)
        e->data_len = copy_payload(a, ret, e->data);

#ifdef SERIALIZE
    if (input) {
        u8 one = 1;
        busy.update(&tid, &one);
        if (dir == DIR_IN && ret > 0) {
            struct input_tally *t = tallies.lookup(&tgid);
            if (!t) {
                struct input_tally first = {};
                tallies.update(&tgid, &first);
                t = tallies.lookup(&tgid);
            }
            if (t) {
                t->tid = tid;
                __sync_fetch_and_add(&t->bytes, (u64)ret);
            }
        }
    }
#endif
    if (input && mode == MODE_GATE && tids.lookup(&tid)) {
        e->gated = HOLD_THREAD;
        bpf_send_signal_thread(SIGSTOP_NR);
    }
    if (mode == MODE_HOLD_OUTPUT && tids.lookup(&tid))
        e->gated = hold_output(tgid, tid, e, input, outputs_held);
    if (call == C_CLOSE_RANGE)
        e->data_len = ret * RANGE_PAIR;
    // a close_range whose range the probe could not take out whole holds its thread until the
    // tracer has taken out the rest: a descriptor the thread opens next may get one's number
    if (call == C_CLOSE_RANGE && a->buf && (mode == MODE_GATE || mode == MODE_HOLD_OUTPUT)
        && tids.lookup(&tid)) {
        e->gated = HOLD_THREAD;
        bpf_send_signal_thread(SIGSTOP_NR);
    }
    // A wake-up per event costs the traced thread more than the event itself (on a VM, an exit
    // to the hypervisor). A gating tracer is woken by a held thread's stop and reads the ring
    // then, so only inputs that are not held wake it; the rest wait for that or its 20 ms poll.
    // A tracer that only prints (or a follower catching up, which learns from the server's
    // socket that an input was read) reads them on its poll: 32 MiB of ring holds seconds of
    // events, and a wake-up per 64 events cost each event about 250 ns of probe time (an
    // interrupt raised on the traced thread's CPU; a VM exit). One per 4096 remains, in case;
    // and a connection's start and end wake it at once, since a replayer waits on them.
    // Without FORCE, the ring wakes the reader only if it has read every earlier record: behind
    // a record written with NO_WAKEUP, a default record wakes nobody. So an observer (whose
    // replayer waits on each input) must keep the default for every record.
    u64 wake = 0;
    if (mode == MODE_GATE && (e->gated || !input) && call != C_SLEEP)
        wake = RB_NO_WAKEUP;
    // a thread's inputs are read when it stops at its output (or on the poll); its end of input
    // and the connection events wake the reader at once
    if (mode == MODE_HOLD_OUTPUT)
        wake = (dir == DIR_CTL || (dir == DIR_IN && ret <= 0) || e->gated >= HOLD_MISSED)
            ? RB_FORCE_WAKEUP : RB_NO_WAKEUP;
    if (mode == MODE_TRACE) {
        u32 *n = unwoken.lookup(&zero);
        wake = RB_NO_WAKEUP;
        if (n && ++*n >= WAKE_EVERY) {
            *n = 0;
            wake = RB_FORCE_WAKEUP;
        }
        // but not a thread's sleep: a serializing follower that catches up reads the probes'
        // maps for it (supervise/replayer.py), its tracer the event on its poll
        if ((dir == DIR_CTL && call != C_SLEEP) || (dir == DIR_IN && ret <= 0))
            wake = RB_FORCE_WAKEUP;
    }
    u64 size = sizeof(struct event) - EVENT_DATA + e->data_len;
    if (size > sizeof(struct event))
        size = sizeof(struct event);
    if (events.ringbuf_output(e, size, wake) != 0)
        next_counter(2);
    return 0;
}

// A socket leaves the map when close begins, not when it returns: the fd number is free for
// another thread's accept as soon as the kernel releases it inside close, and an entry deleted
// at exit would then take the new connection's entry with it. So the close event is written at
// entry too (a tracked fd is open, so close releases it whatever it returns).
static __always_inline int on_close(s32 fd) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 mode = mode_of(tgid);
    if (!mode)
        return 0;
    struct sock_key key = {.tgid = tgid, .fd = fd};
    struct sock_val *sv = socks.lookup(&key);
    if (!sv)
        return 0;
    u64 conn = sv->conn;
    socks.delete(&key);
    struct call_args a = {.call = C_CLOSE, .fd = fd};
    return emit(mode, tgid, (u32)id, conn, 0, &a, DIR_CTL, 0, fd, 0);
}

static __always_inline int finish(u32 call, s64 ret) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 tid = (u32)id;
    // Read at exit, not at entry: a thread blocked in read when gating begins is held.
    u32 mode = mode_of(tgid);
    if (!mode)
        return 0;
    struct call_args args_, *a = &args_;
    read_args(call, a);
    struct sock_key key = {.tgid = tgid, .fd = a->fd};
    struct sock_val *sv = socks.lookup(&key);
    u64 conn = sv ? sv->conn : 0;
    u32 outputs_held = sv ? sv->outputs_held : 0;
    u8 dir = DIR_CTL;
    u8 input = 0;
    s32 fd = a->fd;

    switch (call) {
    case C_ACCEPT: case C_ACCEPT4: {
        if (ret < 0 || !sv || sv->kind != SOCK_LISTEN)
            return 0;
        struct sock_key nk = {.tgid = tgid, .fd = (s32)ret};
        struct sock_val nv = {.conn = next_counter(1), .kind = SOCK_CONN,
                              .outputs_held = mode == MODE_HOLD_OUTPUT};
        socks.update(&nk, &nv);
        raise_top_fd(tgid, nk.fd);
        conn = nv.conn;
        outputs_held = 1;  // the accepting thread's next output waits for its CONNECT
        input = 1;
        break;
    }
    case C_LISTEN: {
        if (ret != 0)
            return 0;
        struct sock_val lv = {.conn = 0, .kind = SOCK_LISTEN};
        socks.update(&key, &lv);
        raise_top_fd(tgid, key.fd);
        break;
    }
    case C_READ: case C_READV: case C_RECVFROM: case C_RECVMSG:
        if (!sv || sv->kind != SOCK_CONN)
            return 0;
        if (ret < 0 && ret != -ECONNRESET_NR && ret != -ETIMEDOUT_NR)
            return 0;
        dir = DIR_IN;
        input = (a->flags & MSG_PEEK_FLAG) ? 0 : 1;
        break;
    case C_WRITE: case C_WRITEV: case C_SENDTO: case C_SENDMSG: case C_SENDFILE:
        if (!sv || sv->kind != SOCK_CONN || ret <= 0)
            return 0;
        dir = DIR_OUT;
        break;
    case C_SHUTDOWN:
        if (!sv)
            return 0;
        break;
    case C_DUP: case C_DUP2: case C_DUP3: {
        if (ret < 0 || ret == a->fd)
            return 0;
        struct sock_key dk = {.tgid = tgid, .fd = (s32)ret};
        // dup2 and dup3 close what their new fd named: a tracked socket's descriptor ends here
        struct sock_val *replaced = call == C_DUP ? 0 : socks.lookup(&dk);
        if (replaced) {
            u64 gone = replaced->conn;
            socks.delete(&dk);
            struct call_args c = {.call = C_CLOSE, .fd = (s32)ret};
            emit(mode, tgid, tid, gone, 0, &c, DIR_CTL, 0, (s32)ret, 0);
        }
        if (!sv)
            return 0;
        struct sock_val dv = *sv;
        socks.update(&dk, &dv);
        raise_top_fd(tgid, dk.fd);
        fd = (s32)ret;
        break;
    }
    default:
        return 0;
    }
    return emit(mode, tgid, tid, conn, ret, a, dir, input, fd, outputs_held);
}

#define EXIT_PROBE(name, call) \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return finish(call, args->ret); }

EXIT_PROBE(accept, C_ACCEPT)
EXIT_PROBE(accept4, C_ACCEPT4)
EXIT_PROBE(listen, C_LISTEN)
EXIT_PROBE(read, C_READ)
EXIT_PROBE(readv, C_READV)
EXIT_PROBE(recvfrom, C_RECVFROM)
EXIT_PROBE(recvmsg, C_RECVMSG)
EXIT_PROBE(write, C_WRITE)
EXIT_PROBE(writev, C_WRITEV)
EXIT_PROBE(sendto, C_SENDTO)
EXIT_PROBE(sendmsg, C_SENDMSG)
EXIT_PROBE(sendfile64, C_SENDFILE)
EXIT_PROBE(shutdown, C_SHUTDOWN)
EXIT_PROBE(dup, C_DUP)
EXIT_PROBE(dup2, C_DUP2)
EXIT_PROBE(dup3, C_DUP3)
TRACEPOINT_PROBE(syscalls, sys_enter_close) { return on_close(args->fd); }

// close_range closes every descriptor in its range, with no close call for each. Its sockets
// leave the map here, before the thread can open a descriptor under one of their numbers: those
// among RANGE_MAX fd numbers from the first (and not above the process's top tracked fd). The
// range record (conn 0) has a (conn, fd) slot in its data for each fd number looked at, conn 0
// where that was no connection, and its `buf` is the first fd number not looked at (0: none):
// from there the tracer takes the rest out itself, and while a tracer holds, the thread waits
// for that. (A slot per fd number, not a list: an offset that differs between paths through the
// loop keeps the verifier from merging them.) Not with CLOSE_RANGE_CLOEXEC, which closes nothing
// before exec (reconciled on its own).
#define CLOSE_RANGE_CLOEXEC_FLAG 4
static __always_inline u32 take_range(u32 tgid, struct call_args *a, u32 top, u8 *data) {
    u32 first = a->fd;
    u32 last = a->count < top ? a->count : top;
    a->buf = last - first >= RANGE_MAX ? first + RANGE_MAX : 0;
    u32 looked = a->buf ? RANGE_MAX : last - first + 1;
    for (u32 i = 0; i < RANGE_MAX; i++) {
        if (i >= looked)
            break;
        struct sock_key key = {.tgid = tgid, .fd = first + i};
        u64 conn = 0;
        struct sock_val *sv = socks.lookup(&key);
        // not if another thread's close took it out meanwhile (and reported it), nor a listener
        if (sv && sv->kind == SOCK_CONN)
            conn = sv->conn;
        if (sv && socks.delete(&key) != 0)
            conn = 0;
        *(u64 *)(data + i * RANGE_PAIR) = conn;
        *(s32 *)(data + i * RANGE_PAIR + 8) = key.fd;
    }
    return looked;
}

TRACEPOINT_PROBE(syscalls, sys_exit_close_range) {
    if (args->ret != 0)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    u32 mode = mode_of(tgid);
    if (!mode)
        return 0;
    struct call_args a = {};
    read_args(C_CLOSE_RANGE, &a);
    u32 *top = top_fd.lookup(&tgid);
    if (!top || (u32)a.fd > *top || (a.flags & CLOSE_RANGE_CLOEXEC_FLAG))
        return 0;
    u32 zero = 0;
    struct event *e = scratch.lookup(&zero);  // emit builds the event around the data written here
    if (!e)
        return 0;
    u32 slots = take_range(tgid, &a, *top, e->data);
    return emit(mode, tgid, (u32)id, 0, slots, &a, DIR_CTL, 0, a.fd, 0);
}

#ifdef SERIALIZE
// A thread that took input and then sleeps waiting for more (in epoll_wait, poll, select, or a
// blocking read or accept) has finished with that input: its record lets the tracer hand the
// server the next one. Other sleeps do not count: a thread waiting for a lock (futex), a disk, a
// ptrace stop, or preempted, is still at it. The syscall a thread sleeps in is in the registers
// saved at its entry (orig_ax). sched_switch runs for every switch on the machine, so this probe
// is compiled in only for a tracer that serializes.
#define TASK_INTERRUPTIBLE_STATE 1
#define REGS_ORIG_AX_OFFSET 120
static __always_inline int waits_for_input(u64 nr) {
    switch (nr) {
    case 0: case 7: case 19: case 23: case 43: case 45: case 47:  // read poll readv select accept recvfrom recvmsg
    case 232: case 270: case 271: case 281: case 288: case 299: case 441:  // epoll_wait pselect6 ppoll epoll_pwait accept4 recvmmsg epoll_pwait2
        return 1;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_switch) {
    if ((args->prev_state & 0xff) != TASK_INTERRUPTIBLE_STATE)
        return 0;
    u32 tid = args->prev_pid;
    if (!busy.lookup(&tid))
        return 0;
    u64 nr = 0;
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    bpf_probe_read_kernel(&nr, sizeof(nr), (void *)regs + REGS_ORIG_AX_OFFSET);
    if (!waits_for_input(nr))
        return 0;
    busy.delete(&tid);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;  // prev is still current here
    u32 mode = mode_of(tgid);
    if (!mode)
        return 0;
    struct call_args a = {.call = C_SLEEP, .fd = -1};
    return emit(mode, tgid, tid, 0, 0, &a, DIR_CTL, 0, -1, 0);
}
#endif
