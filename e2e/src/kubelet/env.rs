//! A container's environment: `value`s, `valueFrom` (Secrets, ConfigMaps, the pod's own
//! fields) and `$(VAR)` references, as Kubernetes resolves them; and the pod's address.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::{Container, EnvVar, EnvVarSource, Pod};
use kube::ResourceExt;

use super::Kubelet;
use super::volumes::Source;

impl Kubelet {
    /// The container's environment, with `valueFrom` resolved through the API.
    pub(super) async fn env(
        &self,
        pod: &Pod,
        container: &Container,
        ip: Ipv4Addr,
    ) -> Result<Vec<(String, String)>, String> {
        let mut out = vec![];
        for EnvVar {
            name,
            value,
            value_from,
        } in container.env.iter().flatten()
        {
            let resolved = match (value, value_from) {
                // Only `value`s expand, and only names defined before them.
                (Some(v), _) => expand(v, &out),
                (None, Some(from)) => self.value_from(pod, name, from, ip).await?,
                (None, None) => String::new(),
            };
            out.push((name.clone(), resolved));
        }
        Ok(out)
    }

    /// An env var's `valueFrom`: a Secret's or ConfigMap's key, or a field of the pod.
    async fn value_from(
        &self,
        pod: &Pod,
        name: &str,
        from: &EnvVarSource,
        ip: Ipv4Addr,
    ) -> Result<String, String> {
        let ns = pod.namespace().unwrap_or_default();
        if let Some(r) = &from.secret_key_ref {
            self.source_key(Source::Secret, &ns, &r.name, &r.key).await
        } else if let Some(r) = &from.config_map_key_ref {
            self.source_key(Source::ConfigMap, &ns, &r.name, &r.key)
                .await
        } else if let Some(f) = &from.field_ref {
            match f.field_path.as_str() {
                "metadata.name" => Ok(pod.name_any()),
                "metadata.namespace" => Ok(ns),
                "metadata.uid" => Ok(pod.uid().unwrap_or_default()),
                "spec.nodeName" => Ok(pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_name.clone())
                    .unwrap_or_default()),
                "status.podIP" => Ok(ip.to_string()),
                "status.hostIP" => Ok("127.0.0.1".into()),
                other => Err(format!("unsupported fieldRef {other}")),
            }
        } else {
            Err(format!("env {name}: unsupported valueFrom"))
        }
    }

    /// Key `key` of Secret or ConfigMap `name`, as text.
    async fn source_key(
        &self,
        kind: Source,
        ns: &str,
        name: &str,
        key: &str,
    ) -> Result<String, String> {
        let data = self.source_data(kind, ns, name).await?;
        let data = data.ok_or_else(|| format!("{} {ns}/{name} not found", kind.name()))?;
        let value = data.into_iter().find(|(k, _)| k == key).map(|(_, v)| v);
        value
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .ok_or_else(|| format!("couldn't find key {key} in {} {ns}/{name}", kind.name()))
    }

    /// The pod's loopback address, stable for the pod's life.
    pub(super) fn address(&mut self, pod: &Pod) -> Ipv4Addr {
        let uid = pod.uid().unwrap_or_default();
        if let Some(ip) = self.addresses.get(&uid) {
            return *ip;
        }
        let ip = Ipv4Addr::from(self.next_address);
        // Skip .0, .1 and .255 of each /24, keep within 127/8.
        self.next_address += 1;
        while matches!(self.next_address & 0xff, 0 | 1 | 255) {
            self.next_address += 1;
        }
        if self.next_address >> 24 != 127 {
            self.next_address = u32::from(Ipv4Addr::new(127, 1, 1, 2));
        }
        self.addresses.insert(uid, ip);
        ip
    }
}

/// Expands `$(NAME)` from `vars` as Kubernetes does: unknown references stay as they are
/// and `$$` escapes a `$`.
pub(super) fn expand(text: &str, vars: &[(String, String)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
            && let Some((_, value)) = vars.iter().rev().find(|(k, _)| *k == inner[..end])
        {
            out.push_str(value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A listen address on all of the pod's addresses (`0.0.0.0:port`) made its own
/// address: pods here share the host's network, where a pod's own network namespace
/// would keep two pods listening on the same port apart.
pub(super) fn confine(text: &str, ip: Ipv4Addr) -> String {
    text.replace("0.0.0.0:", &format!("{ip}:"))
}
