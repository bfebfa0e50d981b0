//! The load balancer, like k3s's ServiceLB: a `LoadBalancer` Service's ingress address is
//! the address of a running pod it selects.

use k8s_openapi::api::core::v1::{Pod, Service};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::Kubelet;
use super::watch::Cache;

impl Kubelet {
    /// Gives each `LoadBalancer` Service the address of a running pod it selects.
    pub(super) async fn load_balancers(&self, cache: &Cache, all: &[Pod]) -> kube::Result<()> {
        for svc in cache.services.state() {
            let Some(spec) = &svc.spec else { continue };
            if spec.type_.as_deref() != Some("LoadBalancer") {
                continue;
            }
            let ns = svc.namespace().unwrap_or_default();
            let selector = spec.selector.clone().unwrap_or_default();
            let ip = all
                .iter()
                .filter(|p| p.namespace().as_deref() == Some(ns.as_str()))
                .filter(|p| !self.assumed.is_deleted(p))
                .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                .filter_map(|p| {
                    let s = p.status.as_ref()?;
                    (s.phase.as_deref() == Some("Running")).then(|| s.pod_ip.clone())?
                })
                .next();
            let ingress = ip.map_or(json!([]), |ip| json!([{"ip": ip}]));
            let current = svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .map_or(json!([]), |i| serde_json::to_value(i).unwrap_or_default());
            if current != ingress {
                let status = json!({"status": {"loadBalancer": {"ingress": ingress}}});
                Api::<Service>::namespaced(self.client.clone(), &ns)
                    .patch_status(
                        &svc.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(status),
                    )
                    .await?;
            }
        }
        Ok(())
    }
}
