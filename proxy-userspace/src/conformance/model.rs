//! The model level (`--level model`, no root): builds the store from a fixture's objects,
//! computes the desired state with [`model::compute`], the very function the agent uses, and
//! asks [`model::resolve`] what happens to each flow.
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use super::fixture::{
    Expect, Fixture, FixtureFlow, FlowResult, objects, parse_backend, proxy_config,
};
use crate::model::{self, Decision, Flow, ObjectRef, Protocol};
use crate::render::ProxyMode;
use crate::store::{Change, Store};
use crate::{Error, Result};

/// Compares a decision with an expectation; `Err` says how they differ.
fn check(expect: &Expect, decision: &Decision, src: IpAddr) -> Result<(), String> {
    let got = describe(decision);
    if let Some(verdict) = &expect.verdict {
        let ok = matches!(
            (verdict.as_str(), decision),
            ("REJECT", Decision::Reject)
                | ("DROP", Decision::Drop)
                | ("NONE", Decision::None)
                | ("ACCEPT", Decision::Accept)
        );
        return if ok {
            Ok(())
        } else {
            Err(format!("expected {verdict}, got {got}"))
        };
    }
    let Some(want) = &expect.backends else {
        return Err("expect has neither backends nor verdict".into());
    };
    let want: BTreeSet<SocketAddr> = want
        .iter()
        .map(|b| parse_backend(b))
        .collect::<Result<_>>()
        .map_err(|e| e.to_string())?;
    let Decision::Backends(backends) = decision else {
        return Err(format!("expected backends {}, got {got}", fmt_set(&want)));
    };
    let have: BTreeSet<SocketAddr> = backends.iter().map(|(a, _)| *a).collect();
    if have != want {
        return Err(format!(
            "expected backends {}, got {}",
            fmt_set(&want),
            fmt_set(&have)
        ));
    }
    if let Some(masq) = expect.masq {
        for (addr, m) in backends {
            // A pod reaching itself is always masqueraded (hairpin), whatever the flow says.
            let expected = masq || addr.ip() == src;
            if *m != expected {
                return Err(format!(
                    "expected masq={expected} towards {addr}, got masq={m}"
                ));
            }
        }
    }
    Ok(())
}

fn fmt_set(s: &BTreeSet<SocketAddr>) -> String {
    let v: Vec<String> = s.iter().map(ToString::to_string).collect();
    format!("[{}]", v.join(", "))
}

fn describe(d: &Decision) -> String {
    match d {
        Decision::Backends(b) => {
            let v: Vec<String> = b
                .iter()
                .map(|(a, m)| format!("{a}{}", if *m { " (masq)" } else { "" }))
                .collect();
            format!("backends [{}]", v.join(", "))
        }
        Decision::Reject => "REJECT".into(),
        Decision::Drop => "DROP".into(),
        Decision::None => "NONE".into(),
        Decision::Accept => "ACCEPT".into(),
    }
}

fn apply_objects(store: &mut Store, values: &[serde_json::Value]) -> Result<()> {
    let objs = objects(values)?;
    for s in objs.services {
        store.apply(Change::ServiceUpsert(s));
    }
    for s in objs.slices {
        store.apply(Change::SliceUpsert(s));
    }
    Ok(())
}

/// Runs one fixture at model level.
///
/// # Errors
/// The fixture itself is malformed (bad objects, unknown delete kind, bad config).
pub fn run_fixture(fx: &Fixture, mode: ProxyMode) -> Result<Vec<FlowResult>> {
    let node = fx.node_info();
    let config = proxy_config(&fx.config, mode)?;
    let overrides = fx.modes.get(mode.as_str());
    let mut store = Store::default();
    apply_objects(&mut store, &fx.objects)?;
    let mut results = Vec::new();
    let mut check_flows = |store: &Store, flows: &[FixtureFlow]| -> Result<()> {
        let desired = model::compute(store, &node, &config);
        for f in flows {
            let protocol = Protocol::parse(f.proto.as_deref())
                .map_err(|e| e.context(format!("flow {:?}", f.name)))?;
            let flow = Flow {
                src: f.src,
                dst: f.dst,
                dport: f.dport,
                protocol,
            };
            let decision = model::resolve(&desired, &node, &config, &flow);
            let expect = overrides.and_then(|o| o.get(&f.name)).unwrap_or(&f.expect);
            results.push(FlowResult {
                fixture: fx.id.clone(),
                flow: f.name.clone(),
                failure: check(expect, &decision, f.src).err(),
            });
        }
        Ok(())
    };
    check_flows(&store, &fx.flows)?;
    for (i, step) in fx.steps.iter().enumerate() {
        for d in &step.delete {
            let id = ObjectRef::new(&d.namespace, &d.name);
            match d.kind.as_str() {
                "Service" => store.apply(Change::ServiceDelete(id)),
                "EndpointSlice" => store.apply(Change::SliceDelete(id)),
                other => {
                    return Err(Error::invalid(format!(
                        "step {}: cannot delete kind {other:?}",
                        i + 1
                    )));
                }
            };
        }
        apply_objects(&mut store, &step.apply).map_err(|e| e.context(format!("step {}", i + 1)))?;
        check_flows(&store, &step.flows)?;
    }
    Ok(results)
}
