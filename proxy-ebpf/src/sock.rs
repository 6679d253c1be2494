//! Socket-level load balancing: the cgroup sock_addr programs.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SK_STORAGE_GET_F_CREATE, bpf_sock, bpf_sock_addr},
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_set_retval,
        bpf_sk_storage_get,
    },
    macros::{btf_map, cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use proxy_common::{
    Backend, MemberKey, ServiceKey, ServiceValue, SockRevNatKey, SockRevNatValue, drop_reason,
    is_v4_mapped, proto, scope, service_flags, v4_mapped,
};

use crate::maps::{
    KPR_BACKENDS, KPR_CONFIG, KPR_MEMBERS, KPR_SERVICES, KPR_SOCK_REVNAT, count_drop, count_service,
};
use crate::select::{self, conns_add, select_backend};

/// What a socket connected through a least-connection frontend counts towards: released
/// when the socket closes (`kpr_sock_release`) or connects elsewhere.
#[derive(Clone, Copy)]
struct SockConn {
    /// Backend id + 1 (0: nothing counted).
    backend: u32,
}

#[btf_map]
static KPR_SOCK_CONN: SkStorage<SockConn> = SkStorage::new();

/// The socket's least-connection record, created on first use.
#[inline(always)]
fn sock_conn(sk: *mut bpf_sock) -> Option<&'static mut SockConn> {
    if sk.is_null() {
        return None;
    }
    let mut init = SockConn { backend: 0 };
    // SAFETY: helper call with our map, the context's socket and a value to copy.
    let p = unsafe {
        bpf_sk_storage_get(
            (&raw const KPR_SOCK_CONN).cast_mut().cast(),
            sk.cast(),
            (&raw mut init).cast(),
            u64::from(BPF_SK_STORAGE_GET_F_CREATE),
        )
    }
    .cast::<SockConn>();
    // SAFETY: non-null storage of this socket, alive while the socket is.
    (!p.is_null()).then(|| unsafe { &mut *p })
}

/// Moves the socket's count to `backend_id` (least connections), releasing an older one.
#[inline(never)]
fn count_conn(ctx: &SockAddrContext, backend_id: u32) {
    // SAFETY: `sk` of a sock_addr context (the socket being connected).
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if let Some(c) = sock_conn(sk) {
        if c.backend != 0 {
            conns_add(c.backend - 1, u32::MAX);
        }
        c.backend = backend_id + 1;
        conns_add(backend_id, 1);
    }
}

/// A socket closes: it stops counting towards its least-connection backend.
#[cgroup_sock(sock_release)]
fn kpr_sock_release(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    if sk.is_null() {
        return 1;
    }
    // SAFETY: helper call with our map and the context's socket; no creation.
    let p = unsafe {
        bpf_sk_storage_get(
            (&raw const KPR_SOCK_CONN).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<SockConn>();
    if !p.is_null() {
        // SAFETY: non-null storage of this socket.
        let c = unsafe { &mut *p };
        if c.backend != 0 {
            conns_add(c.backend - 1, u32::MAX);
            c.backend = 0;
        }
    }
    1
}

/// Let the syscall go on (translated or not).
const ALLOW: i32 = 1;
/// Fail the syscall; with `bpf_set_retval` the caller sees our errno instead of EPERM.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
/// Where dropped datagrams go: the discard port of loopback.
const DISCARD_PORT: u16 = 9;
const BLACKHOLE6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// An address as seen by one hook: 16 bytes (v4-mapped for the *4 hooks) and a host-order port.
struct SockAddr {
    addr: [u8; 16],
    port: u16,
}

#[inline(always)]
fn read_v4(sa: *const bpf_sock_addr) -> SockAddr {
    // SAFETY: `sa` is the context pointer the kernel handed to the program.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    SockAddr {
        addr: v4_mapped(ip.to_ne_bytes()),
        port: u16::from_be(port as u16),
    }
}

#[inline(always)]
fn write_v4(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16) {
    let ip = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
    // SAFETY: user_ip4/user_port are writable in the connect4/sendmsg4/recvmsg4/getpeername4
    // hooks, which are the only callers.
    unsafe {
        (*sa).user_ip4 = ip;
        (*sa).user_port = u32::from(port.to_be());
    }
}

#[inline(always)]
fn read_v6(sa: *const bpf_sock_addr) -> SockAddr {
    // SAFETY: as in `read_v4`; the kernel only allows 4-byte loads of user_ip6 words.
    let (w, port) = unsafe {
        (
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ],
            (*sa).user_port,
        )
    };
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    SockAddr {
        addr,
        port: u16::from_be(port as u16),
    }
}

#[inline(always)]
fn write_v6(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16) {
    let word = |i: usize| {
        u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ])
    };
    // SAFETY: user_ip6/user_port are writable in the *6 hooks, the only callers.
    unsafe {
        (*sa).user_ip6[0] = word(0);
        (*sa).user_ip6[1] = word(1);
        (*sa).user_ip6[2] = word(2);
        (*sa).user_ip6[3] = word(3);
        (*sa).user_port = u32::from(port.to_be());
    }
}

#[inline(always)]
fn sock_proto(sa: *const bpf_sock_addr) -> u8 {
    // SAFETY: `protocol` is readable in every sock_addr hook.
    unsafe { (*sa).protocol as u8 }
}

/// What the forward hooks decided.
enum Pick {
    /// Not a Service frontend (or a lookup raced a backend-set update): leave the socket alone.
    NotService,
    /// A frontend without endpoints: refuse.
    NoEndpoints,
    /// A Local policy without local endpoints, or a source outside loadBalancerSourceRanges:
    /// drop (the client hears no answer).
    Drop,
    /// The backend, its id, the service id and the service's flags.
    Backend(Backend, u32, u32, u32),
}

/// `SockRevNatKey::_pad[0]` of a forward entry: (socket, frontend) -> the backend an
/// unconnected socket's datagrams to that frontend go to.
const FORWARD_ENTRY: u8 = 1;

/// The key of a socket's forward entry for `frontend`.
#[inline(always)]
fn forward_key(cookie: u64, frontend: &SockAddr) -> SockRevNatKey {
    SockRevNatKey {
        cookie,
        addr: frontend.addr,
        port: frontend.port,
        _pad: [FORWARD_ENTRY, 0, 0, 0, 0, 0],
    }
}

/// The backend this (unconnected) socket already sends `dst`'s datagrams to, while that
/// backend still serves the service (a QUIC-style client keeps one peer per socket).
#[inline(never)]
fn remembered(cookie: u64, dst: &SockAddr, svc: &ServiceValue) -> Option<(Backend, u32)> {
    let f = KPR_SOCK_REVNAT.get_ptr(&forward_key(cookie, dst))?;
    // SAFETY: a value pointer from a successful lookup; read at once.
    let (addr, port, id) = unsafe { ((*f).addr, (*f).port, (*f).service_id) };
    let b = KPR_BACKENDS.get_ptr(&id)?;
    // SAFETY: as above.
    let b = unsafe { *b };
    let member = KPR_MEMBERS
        .get_ptr(&MemberKey {
            service_id: svc.id,
            backend_id: id,
        })
        .is_some();
    (b.addr == addr && b.port == port && member).then_some((b, id))
}

/// Whether a client of this socket may use a frontend with loadBalancerSourceRanges (pods
/// and the node too, as upstream checks every source). A socket bound to an address is
/// checked with it; otherwise the source is not chosen yet, and the agent's per-frontend
/// verdict for node clients (the node's addresses) or pod clients (the pod CIDRs) decides.
#[inline(never)]
fn source_allowed(ctx: &SockAddrContext, svc: &ServiceValue, v6: bool) -> bool {
    // SAFETY: `sk` of a sock_addr context; src_ip4/src_ip6 are readable.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if !sk.is_null() {
        let mut src = [0u8; 16];
        // SAFETY: as above.
        unsafe {
            if v6 {
                let w = (*sk).src_ip6;
                let mut i = 0;
                while i < 4 {
                    src[i * 4..i * 4 + 4].copy_from_slice(&w[i].to_ne_bytes());
                    i += 1;
                }
            } else {
                src = v4_mapped((*sk).src_ip4.to_ne_bytes());
            }
        }
        let unbound = if v6 {
            src == [0; 16]
        } else {
            src[12..] == [0; 4]
        };
        if !unbound {
            return crate::select::in_source_ranges(svc.id, &src);
        }
    }
    // SAFETY: plain helper call on our own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let node = KPR_CONFIG
        .get(0)
        .is_some_and(|c| c.node_netns_cookie != 0 && c.node_netns_cookie == netns);
    let allowed = if node {
        service_flags::RANGES_ADMIT_NODE
    } else {
        service_flags::RANGES_ADMIT_PODS
    };
    svc.flags & allowed != 0
}

/// Looks the frontend up and picks one of its backends (affinity, Maglev or random), or the
/// one an unconnected socket already uses (`sendmsg`). Out of line, like the writes of
/// `remember_translation`: their locals then never sit in the program's own frame, which
/// older verifiers (6.1) add to every call chain's (512 bytes in all).
/// `how` packs the protocol (low byte), [`PICK_SENDMSG`] and [`PICK_V6`]: a BPF call passes
/// five registers, and the returned `Pick` takes one.
#[inline(never)]
fn pick_backend(ctx: &SockAddrContext, dst: &SockAddr, how: u32) -> Pick {
    let proto = (how & 0xff) as u8;
    let sendmsg = how & PICK_SENDMSG != 0;
    let v6 = how & PICK_V6 != 0;
    let key = ServiceKey {
        addr: dst.addr,
        port: dst.port,
        proto,
        scope: scope::INTERNAL,
    };
    let Some(svc) = KPR_SERVICES.get_ptr_mut(&key) else {
        return Pick::NotService;
    };
    // SAFETY: a value pointer from a successful lookup, valid for this program run.
    let svc = unsafe { &mut *svc };
    if svc.flags & service_flags::SOURCE_RANGES != 0 && !source_allowed(ctx, svc, v6) {
        return Pick::Drop;
    }
    if svc.backend_count == 0 {
        if svc.flags & service_flags::DROP != 0 {
            return Pick::Drop;
        }
        return Pick::NoEndpoints;
    }
    if sendmsg {
        // SAFETY: plain helper call on our own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if let Some((b, id)) = remembered(cookie, dst, svc) {
            return Pick::Backend(b, id, svc.id, svc.flags);
        }
    }
    // The client of socket-level balancing is its network namespace (the source address is
    // not chosen yet at connect()); only affinity needs it. Maglev needs a flow hash, and a
    // socket has no flow yet: a random one spreads like the random pick.
    let mut client = [0u8; 16];
    if svc.flags & service_flags::AFFINITY_CLIENT_IP != 0 {
        // SAFETY: plain helper call on our own context.
        let cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        client[..8].copy_from_slice(&cookie.to_ne_bytes());
        client[15] = 1;
    }
    let hash = if svc.flags & service_flags::MAGLEV != 0 {
        // SAFETY: plain helper call.
        unsafe { bpf_get_prandom_u32() }
    } else {
        0
    };
    let backend_id = select_backend(svc, &client, hash);
    if backend_id == select::NONE {
        return Pick::NotService;
    }
    let Some(backend) = KPR_BACKENDS.get_ptr(&backend_id) else {
        return Pick::NotService;
    };
    // SAFETY: as above.
    Pick::Backend(unsafe { *backend }, backend_id, svc.id, svc.flags)
}

const PICK_SENDMSG: u32 = 1 << 8;
const PICK_V6: u32 = 1 << 9;

/// Records a socket's translation: the reverse entry (backend -> frontend, for recvmsg and
/// getpeername) and, for an unconnected socket, the backend its later datagrams to this
/// frontend go to.
#[inline(never)]
fn remember_translation(
    ctx: &SockAddrContext,
    backend: &Backend,
    dst: &SockAddr,
    // (backend id << 32) | service id: five registers per call.
    ids: u64,
    connect: bool,
) {
    let (backend_id, service_id) = ((ids >> 32) as u32, ids as u32);
    // SAFETY: plain helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let value = SockRevNatValue {
        addr: dst.addr,
        port: dst.port,
        _pad: 0,
        service_id,
    };
    // Best effort: if the LRU insert fails the reply is still delivered, only the address
    // reported to the application is the backend's.
    let _ = KPR_SOCK_REVNAT.insert(&key, &value, 0);
    if !connect {
        // Later datagrams of this socket to this frontend go to the same backend.
        let remember = SockRevNatValue {
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
            service_id: backend_id,
        };
        let _ = KPR_SOCK_REVNAT.insert(&forward_key(cookie, dst), &remember, 0);
    }
}

/// The forward translation shared by connect and sendmsg, for either family.
#[inline(always)]
fn forward(ctx: &SockAddrContext, v6: bool, connect: bool) -> i32 {
    let sa = ctx.sock_addr;
    let proto = sock_proto(sa);
    if proto != proto::TCP && proto != proto::UDP {
        return ALLOW;
    }
    let dst = if v6 { read_v6(sa) } else { read_v4(sa) };
    let how =
        u32::from(proto) | if connect { 0 } else { PICK_SENDMSG } | if v6 { PICK_V6 } else { 0 };
    match pick_backend(ctx, &dst, how) {
        Pick::NotService => ALLOW,
        Pick::NoEndpoints => {
            // SAFETY: plain helper call (cgroup programs, kernel >= 5.18).
            unsafe { bpf_set_retval(-ECONNREFUSED) };
            DENY
        }
        Pick::Drop => {
            count_drop(drop_reason::POLICY_DROP);
            // A dropped SYN ends in ETIMEDOUT; a syscall cannot be held open for the
            // retries, so connect() fails with that at once (never ECONNREFUSED: nothing
            // answered). A datagram is dropped silently: sendmsg reports success.
            if connect {
                // SAFETY: plain helper call (cgroup programs, kernel >= 5.18).
                unsafe { bpf_set_retval(-ETIMEDOUT) };
                return DENY;
            }
            // Delivered nowhere: to the discard port of this host's loopback, which no
            // socket of a network namespace binds by default, with no answer expected.
            if v6 {
                write_v6(sa, &BLACKHOLE6, DISCARD_PORT);
            } else {
                write_v4(sa, &v4_mapped([127, 0, 0, 1]), DISCARD_PORT);
            }
            ALLOW
        }
        Pick::Backend(backend, backend_id, service_id, flags) => {
            // A v4 socket can only reach a v4 backend; the model never mixes families, so a
            // mismatch means a stale entry: leave the socket alone rather than mistranslate.
            if !v6 && !is_v4_mapped(&backend.addr) {
                return ALLOW;
            }
            let ids = (u64::from(backend_id) << 32) | u64::from(service_id);
            remember_translation(ctx, &backend, &dst, ids, connect);
            if connect {
                count_service(service_id, 0, 0, true);
                if flags & service_flags::LEAST_CONN != 0 {
                    count_conn(ctx, backend_id);
                }
            } else {
                count_service(service_id, 0, 1, false);
            }
            if v6 {
                write_v6(sa, &backend.addr, backend.port);
            } else {
                write_v4(sa, &backend.addr, backend.port);
            }
            ALLOW
        }
    }
}

/// The reverse translation shared by recvmsg and getpeername.
#[inline(always)]
fn reverse(ctx: &SockAddrContext, v6: bool) -> i32 {
    let sa = ctx.sock_addr;
    let src = if v6 { read_v6(sa) } else { read_v4(sa) };
    // SAFETY: plain helper call on our own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: src.addr,
        port: src.port,
        _pad: [0; 6],
    };
    if let Some(orig) = KPR_SOCK_REVNAT.get_ptr(&key) {
        // SAFETY: a map value pointer from a successful lookup; read by value at once.
        let orig = unsafe { *orig };
        if v6 {
            write_v6(sa, &orig.addr, orig.port);
        } else {
            write_v4(sa, &orig.addr, orig.port);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
fn kpr_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, true)
}

#[cgroup_sock_addr(connect6)]
fn kpr_connect6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, true)
}

#[cgroup_sock_addr(sendmsg4)]
fn kpr_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false, false)
}

#[cgroup_sock_addr(sendmsg6)]
fn kpr_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true, false)
}

#[cgroup_sock_addr(recvmsg4)]
fn kpr_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
fn kpr_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}

#[cgroup_sock_addr(getpeername4)]
fn kpr_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
fn kpr_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse(&ctx, true)
}
