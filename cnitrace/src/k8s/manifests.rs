//! Objects of any kind written and removed through the API by their manifests: what `cnitrace deploy
//! --apply` and `cnitrace undeploy` do. Server-side apply (field manager `cnitrace`), as
//! `kubectl apply --server-side` does; a delete removes only an object that carries the label its
//! manifest gave it, so a same-named object someone else made is left alone.

use std::time::Duration;

use kube::{
    api::{Api, DeleteParams, DynamicObject, Patch, PatchParams},
    core::{ApiResource, GroupVersionKind},
};
use serde_json::Value;

use super::Cluster;

/// How long one object's write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
pub const FIELD_MANAGER: &str = "cnitrace";

/// What one apply did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Created,
    Configured,
    Unchanged,
}

/// What one delete did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removed {
    Deleted,
    /// Not there (never applied, or already removed).
    Absent,
    /// There, without the label its manifest gives: not ours to remove.
    NotOurs { label: String },
}

/// `Kind/name` (and the namespace), as kubectl names an object.
pub fn title(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or("?").to_lowercase();
    let name = obj["metadata"]["name"].as_str().unwrap_or("?");
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind}/{name} in {ns}"),
        None => format!("{kind}/{name}"),
    }
}

/// Whether an object as the API has it carries the label `key=value`.
pub fn labelled(obj: &DynamicObject, (key, value): (&str, &str)) -> bool {
    obj.metadata.labels.as_ref().and_then(|l| l.get(key)).is_some_and(|v| v == value)
}

impl Cluster {
    fn dynamic(&self, obj: &Value) -> anyhow::Result<(Api<DynamicObject>, String)> {
        let (api_version, kind) = (obj["apiVersion"].as_str().unwrap_or(""), obj["kind"].as_str().unwrap_or(""));
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        anyhow::ensure!(!version.is_empty() && !kind.is_empty(), "a manifest without apiVersion or kind: {obj}");
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let name = obj["metadata"]["name"].as_str().ok_or_else(|| anyhow::anyhow!("a manifest without a name: {obj}"))?.to_string();
        let api = match obj["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &ar),
            None => Api::all_with(self.client.clone(), &ar),
        };
        Ok((api, name))
    }

    /// The object as the API has it now, if it is there.
    pub fn get_object(&mut self, obj: &Value) -> anyhow::Result<Option<DynamicObject>> {
        let (api, name) = self.dynamic(obj)?;
        let what = format!("get {}", title(obj));
        self.write(&what, WRITE_TIMEOUT, async move { api.get_opt(&name).await })
    }

    /// Server-side apply of one manifest (forced: this version's fields win over an older one's).
    pub fn apply_object(&mut self, obj: &Value) -> anyhow::Result<Applied> {
        let before = self.get_object(obj)?;
        let (api, name) = self.dynamic(obj)?;
        let what = format!("apply {}", title(obj));
        let patch = obj.clone();
        let after = self.write(&what, WRITE_TIMEOUT, async move {
            api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await
        })?;
        Ok(match before {
            None => Applied::Created,
            Some(b) if b.metadata.resource_version == after.metadata.resource_version => Applied::Unchanged,
            Some(_) => Applied::Configured,
        })
    }

    /// Deletes the object of one manifest if it is there and carries `label` (`key=value`).
    pub fn delete_object(&mut self, obj: &Value, label: (&str, &str)) -> anyhow::Result<Removed> {
        let Some(now) = self.get_object(obj)? else {
            return Ok(Removed::Absent);
        };
        if !labelled(&now, label) {
            return Ok(Removed::NotOurs { label: format!("{}={}", label.0, label.1) });
        }
        let (api, name) = self.dynamic(obj)?;
        let what = format!("delete {}", title(obj));
        let gone = self.write(&what, WRITE_TIMEOUT, async move {
            match api.delete(&name, &DeleteParams::background()).await {
                Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
                other => other.map(|_| true),
            }
        })?;
        Ok(if gone { Removed::Deleted } else { Removed::Absent })
    }
}
