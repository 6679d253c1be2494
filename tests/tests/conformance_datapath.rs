//! `kpr conformance tests/fixtures --level datapath --proxy-mode MODE`: every fixture flow
//! as real connections through a netns topology per fixture (root). Flows this machine cannot
//! express (SCTP on a kernel without SCTP) are reported as skipped, never as passed. The ipvs
//! mode's run is in `ipvs_vm.rs` (the VM only).
#[test]
fn fixtures_pass_on_the_ebpf_datapath() {
    kpr_testnet::conformance_datapath_passes("ebpf");
}

#[test]
fn fixtures_pass_on_the_iptables_datapath() {
    kpr_testnet::conformance_datapath_passes("iptables");
}

#[test]
fn fixtures_pass_on_the_nftables_datapath() {
    kpr_testnet::conformance_datapath_passes("nftables");
}
