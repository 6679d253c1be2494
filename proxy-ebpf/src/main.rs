//! kpr's eBPF programs: socket-level Service load balancing at the cgroup sock_addr hooks.
//!
//! `connect4/6` and `sendmsg4/6` translate a Service frontend (VIP, port, protocol) to one of
//! its backends before the kernel routes anything, and remember the translation per socket
//! cookie; `recvmsg4/6` and `getpeername4/6` translate the backend back to the frontend so the
//! application only ever sees the Service address.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic adds on map values (the BPF target has no `core::sync::atomic` types).
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod select;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod tc;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic path.
    unsafe { core::hint::unreachable_unchecked() }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
