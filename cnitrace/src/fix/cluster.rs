//! `fix --cluster`: what is wrong with the cluster rather than with a pair — today flannel's backend for
//! Windows nodes (the incident's `fix_flannel_mixed_os.sh`) — planned from `check`'s cluster findings,
//! asked on a terminal, applied with `--auto`, journaled with the ConfigMap's previous value (so
//! `--rollback` puts it back and restarts flannel again), verified by reading the cluster again.

use std::io::Write;

use anyhow::{anyhow, bail, Result};

use super::{apply_steps, confirmed, finish_unfixed, journal::Journal, node_checks, FixRequest, Mode};
use crate::{
    k8s,
    plan::{Action, Step, Target},
};

pub fn run(req: &FixRequest, out: &mut dyn Write) -> Result<u8> {
    let mut c = k8s::connect_configured().map_err(|e| anyhow!("`fix --cluster` needs the Kubernetes API: {e}"))?;
    let facts = k8s::gather(&mut c, &[]);
    if !facts.missing.is_empty() {
        bail!("the cluster could not be read whole ({}): nothing is planned on half a picture", facts.missing.join("; "));
    }
    let findings = node_checks::cluster_findings(&facts);
    if findings.is_empty() {
        writeln!(out, "the cluster: nothing to fix")?;
        return Ok(crate::exit::OK);
    }
    let mut steps = Vec::new();
    for f in &findings {
        writeln!(out, "{}: {}", f.cause, f.what)?;
        let conf = facts.flannel.as_ref().expect("a cluster finding rests on flannel's ConfigMap");
        let Some(patched) = node_checks::patched_net_conf(&conf.raw) else {
            writeln!(out, "  no safe fix: {}'s net-conf.json has no Backend object to change", conf.source)?;
            continue;
        };
        let (namespace, configmap) = conf.source.split_once('/').expect("namespace/name");
        let Some(daemonset) = c.owner_of_app(namespace, "flannel")? else {
            writeln!(out, "  no safe fix: no flannel DaemonSet's pods in {namespace} to restart with the new configuration")?;
            continue;
        };
        let reconfigure = |value: &str| Action::Reconfigure {
            ns: Target::cluster(),
            namespace: namespace.into(),
            configmap: configmap.into(),
            key: "net-conf.json".into(),
            value: value.into(),
            daemonset: daemonset.clone(),
        };
        steps.push(Step {
            action: reconfigure(&patched),
            undo: reconfigure(&conf.raw),
            why: format!("{}'s Backend as Windows nodes need it (vxlan, VNI {}, port {}), flannel restarted to use it", conf.source, node_checks::WINDOWS_VNI, node_checks::WINDOWS_PORT),
        });
    }
    if steps.is_empty() {
        return Ok(crate::exit::DROPPED);
    }
    writeln!(out, "\nplan (the cluster):")?;
    for s in &steps {
        writeln!(out, "{}", s.action.command_lines("  ", "  "))?;
        writeln!(out, "      # {}", s.why)?;
    }
    match req.mode {
        Mode::DryRun => {
            writeln!(out, "\ndry run: nothing was changed (run with --auto to apply, or on a terminal to be asked)")?;
            return Ok(crate::exit::DROPPED);
        }
        Mode::Ask => {
            if !confirmed(out, "this changes flannel's configuration for every node and restarts flannel everywhere; apply?")? {
                return Ok(crate::exit::DROPPED);
            }
        }
        Mode::Auto => {}
    }
    let unspecified = std::net::Ipv4Addr::UNSPECIFIED;
    let mut j = Journal::create(&req.state_dir, unspecified, unspecified)?;
    j.note = format!("cluster: {}", findings.iter().map(|f| f.cause).collect::<Vec<_>>().join(", "));
    j.sync()?;
    if let Err(e) = apply_steps(&mut j, "flannel-backend-windows", steps, out) {
        writeln!(out, "applying failed: {e:#}; rolling back")?;
        return finish_unfixed(Some(j), out, "applying failed");
    }
    // Verified on what it could have touched: the configuration read back, and every flannel pod Ready
    // (reconfigure waited for that).
    let mut again = k8s::connect_configured().map_err(|e| anyhow!("read the cluster again: {e}"))?;
    let after = k8s::gather(&mut again, &[]);
    let left = node_checks::cluster_findings(&after);
    if !after.missing.is_empty() || !left.is_empty() {
        let why = if left.is_empty() { after.missing.join("; ") } else { left.iter().map(|f| f.what.clone()).collect::<Vec<_>>().join("; ") };
        return finish_unfixed(Some(j), out, &format!("still wrong after the change: {why}"));
    }
    j.outcome = super::journal::Outcome::Fixed;
    j.note = format!("fixed (cluster): {}", findings.iter().map(|f| f.cause).collect::<Vec<_>>().join(", "));
    j.sync()?;
    writeln!(out, "\nverified: flannel's configuration is what Windows nodes need and every flannel pod is Ready (fix {}; undo with `cnitrace fix --rollback {}`)", j.id, j.id)?;
    Ok(crate::exit::OK)
}
