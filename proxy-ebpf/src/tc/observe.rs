//! `kpr_tc_observe`: counts the packets it sees and passes them on (`TCX_NEXT`). Never attached
//! by the agent; the tests attach it after kpr's programs to prove that kpr lets the rest of
//! a tcx chain (a CNI's policy, a security tool) see the traffic.
use aya_ebpf::{
    btf_maps::PerCpuArray,
    macros::{btf_map, classifier},
    programs::TcContext,
};

use super::NEXT;

#[btf_map]
static KPR_OBSERVED: PerCpuArray<u64, 1> = PerCpuArray::new();

#[classifier]
fn kpr_tc_observe(_ctx: TcContext) -> i32 {
    if let Some(c) = KPR_OBSERVED.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { *c += 1 };
    }
    NEXT
}
