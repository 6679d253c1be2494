//! What the rule-based renderers (iptables, nftables) share: the model's frontends grouped
//! into upstream's *service ports* (one Service port and protocol, per IP family) with
//! upstream's chain-name hashes, and each frontend's handling per traffic class.
//!
//! Nothing here decides which endpoints serve what or who is masqueraded: that is the model's
//! [`Frontend`]. This module only arranges the model's answer the way rule sets are arranged.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use sha2::{Digest as _, Sha256};

use crate::model::{
    DesiredState, Frontend, FrontendKey, FrontendKind, Masquerade, ObjectRef, Protocol, Targets,
};

/// IPv4 or IPv6: rule-based modes keep one table per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    #[must_use]
    pub const fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }
}

/// `namespace/name:port` (or `namespace/name` for an unnamed port), upstream's
/// `ServicePortName.String()`.
#[must_use]
pub fn service_port_name(service: &ObjectRef, port_name: &str) -> String {
    if port_name.is_empty() {
        format!("{}/{}", service.namespace, service.name)
    } else {
        format!("{}/{}:{port_name}", service.namespace, service.name)
    }
}

/// upstream `servicePortChainNameBase`: the first 16 characters of base32(sha256(`input`)).
#[must_use]
pub fn chain_hash(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut encoded = data_encoding::BASE32.encode(&digest);
    encoded.truncate(16);
    encoded
}

/// Lowercase protocol name as upstream hashes it.
#[must_use]
pub const fn proto_lower(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// One Service port of one family, with every frontend it answers on.
#[derive(Clone, Debug)]
pub struct ServicePort<'a> {
    pub service: &'a ObjectRef,
    pub port_name: &'a str,
    pub protocol: Protocol,
    pub family: Family,
    pub frontends: Vec<(&'a FrontendKey, &'a Frontend)>,
}

impl ServicePort<'_> {
    /// `namespace/name:port`.
    #[must_use]
    pub fn name(&self) -> String {
        service_port_name(self.service, self.port_name)
    }

    /// The hash of this port's chains (`KUBE-SVC-<hash>` and friends).
    #[must_use]
    pub fn hash(&self) -> String {
        chain_hash(&format!("{}{}", self.name(), proto_lower(self.protocol)))
    }

    /// The hash of one endpoint's chain (`KUBE-SEP-<hash>`).
    #[must_use]
    pub fn endpoint_hash(&self, endpoint: &SocketAddr) -> String {
        chain_hash(&format!(
            "{}{}{endpoint}",
            self.name(),
            proto_lower(self.protocol)
        ))
    }

    /// The sessionAffinity ClientIP timeout of this port (the same on all its frontends).
    #[must_use]
    pub fn affinity(&self) -> Option<u32> {
        self.frontends
            .first()
            .and_then(|(_, fe)| fe.affinity_timeout_secs)
    }

    /// Every backend of the port's backend sets, once each, sorted.
    #[must_use]
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        let mut eps: Vec<SocketAddr> = self
            .backend_sets()
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        eps.sort_unstable();
        eps.dedup();
        eps
    }

    /// The distinct backend lists of this port's frontends, in a stable order: the one that
    /// pods and the node use first (upstream's cluster set, `SVC`), then the one outside
    /// clients of an eTP=Local Service use (upstream's local set, `SVL`).
    #[must_use]
    pub fn backend_sets(&self) -> Vec<&[SocketAddr]> {
        let mut sets: Vec<&[SocketAddr]> = Vec::new();
        let internal = self.frontends.iter().map(|(_, fe)| &fe.internal);
        let external = self.frontends.iter().map(|(_, fe)| &fe.external);
        // External frontends' internal targets are the cluster set; prefer them.
        let mut ordered: Vec<&Targets> = self
            .frontends
            .iter()
            .filter(|(_, fe)| fe.kind != FrontendKind::ClusterIp)
            .map(|(_, fe)| &fe.internal)
            .collect();
        ordered.extend(internal);
        ordered.extend(external);
        for t in ordered {
            if let Targets::Backends(b) = t
                && !sets.contains(&b.as_slice())
            {
                sets.push(b);
            }
        }
        sets
    }
}

/// The Service ports of `desired`, by (service, port name, protocol, family).
#[must_use]
pub fn service_ports(
    desired: &DesiredState,
) -> BTreeMap<(&ObjectRef, &str, Protocol, Family), ServicePort<'_>> {
    let mut out: BTreeMap<(&ObjectRef, &str, Protocol, Family), ServicePort<'_>> = BTreeMap::new();
    for (key, fe) in &desired.frontends {
        let family = Family::of(&key.ip);
        out.entry((&fe.service, fe.port_name.as_str(), key.protocol, family))
            .or_insert_with(|| ServicePort {
                service: &fe.service,
                port_name: &fe.port_name,
                protocol: key.protocol,
                family,
                frontends: Vec::new(),
            })
            .frontends
            .push((key, fe));
    }
    out
}

/// How one class of a frontend's traffic is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassHandling<'a> {
    pub targets: &'a Targets,
    pub masquerade: Masquerade,
}

/// A frontend's handling of traffic from pods and the node (`internal`) and from outside
/// (`external`); `split` when the two differ and rules must tell the classes apart.
#[derive(Clone, Copy, Debug)]
pub struct Handling<'a> {
    pub internal: ClassHandling<'a>,
    pub external: ClassHandling<'a>,
}

impl<'a> Handling<'a> {
    #[must_use]
    pub fn of(fe: &'a Frontend) -> Self {
        Self {
            internal: ClassHandling {
                targets: &fe.internal,
                masquerade: fe.internal_masquerade,
            },
            external: ClassHandling {
                targets: &fe.external,
                masquerade: fe.external_masquerade,
            },
        }
    }

    #[must_use]
    pub fn split(&self) -> bool {
        self.internal != self.external
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_names_hash_like_upstream() {
        // From upstream's proxier_test.go: ns1/svc1:p80 over TCP is KUBE-SVC-XPGD46QRK7WJZT7O.
        let svc = ObjectRef::new("ns1", "svc1");
        assert_eq!(
            chain_hash(&format!("{}tcp", service_port_name(&svc, "p80"))),
            "XPGD46QRK7WJZT7O"
        );
    }
}
