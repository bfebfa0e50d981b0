//! Test and demo infrastructure: a local Kubernetes control plane and the end-to-end tests.
//! Real users run real clusters; nothing in the product depends on this crate.
pub mod apiserver;
pub mod bench;
pub mod demo;
pub mod federation;
pub mod harness;
pub mod hub;
pub mod kubelet;
pub mod otlp;
pub mod plot;
pub mod scrape;

/// Server-side applies one object given as JSON, as `kubectl apply --server-side` does;
/// `strict` refuses unknown or misplaced fields (`fieldValidation=Strict`) instead of
/// dropping them.
pub async fn apply(
    client: &kube::Client,
    object: &serde_json::Value,
    strict: bool,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use kube::api::{Api, DynamicObject, Patch, PatchParams, ValidationDirective};
    use kube::core::{ApiResource, GroupVersionKind};
    let object: DynamicObject = serde_json::from_value(object.clone())?;
    let types = object
        .types
        .clone()
        .context("an object without apiVersion and kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let resource = ApiResource::from_gvk(&gvk);
    let name = object
        .metadata
        .name
        .clone()
        .context("an object without a name")?;
    let api: Api<DynamicObject> = match &object.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams {
        field_validation: strict.then_some(ValidationDirective::Strict),
        ..PatchParams::apply("starling-e2e").force()
    };
    api.patch(&name, &params, &Patch::Apply(&object))
        .await
        .with_context(|| format!("applying {} {name}", gvk.kind))?;
    Ok(())
}
