//! What a pod's container sees of its cluster besides its environment: the Secret and
//! ConfigMap volumes it mounts, and, unless the pod or its ServiceAccount opts out, the
//! account's token, the cluster's CA and the namespace at
//! `/var/run/secrets/kubernetes.io/serviceaccount` with `KUBERNETES_SERVICE_HOST` /
//! `_PORT`: what in-cluster clients (kube-rs, client-go) read, so an operator installed by
//! a chart reaches its API server as the chart's RBAC allows.
//!
//! Pods are processes of this host, so a mount is a bind mount made in a mount namespace
//! of the process's own as it starts: the host's files stay as they are, and two pods see
//! each their own token at the same path. That needs root; without it the files are still
//! written under the pod's directory, the mounts are skipped, and the kubelet says so.
//! Other volumes (`emptyDir`) are the pod's directory, as before.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, Pod, Secret, ServiceAccount};
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::Kubelet;

/// Where in-cluster clients read their ServiceAccount's credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long the tokens the kubelet mounts last: longer than any local cluster lives, so
/// none needs rotating.
const TOKEN_SECONDS: u64 = 7 * 24 * 3600;

/// How pods reach their API server: the address behind `KUBERNETES_SERVICE_HOST` /
/// `_PORT` and the CA that signed its certificate.
#[derive(Clone, Debug)]
pub struct InCluster {
    pub host: String,
    pub port: u16,
    pub ca_pem: String,
}

impl InCluster {
    /// From the server's `https://host:port` URL and its CA.
    pub fn new(url: &str, ca_pem: &str) -> Option<Self> {
        let authority = url.strip_prefix("https://")?.trim_end_matches('/');
        let (host, port) = authority.rsplit_once(':')?;
        Some(Self {
            host: host.to_owned(),
            port: port.parse().ok()?,
            ca_pem: ca_pem.to_owned(),
        })
    }
}

/// A directory under the pod's own, bind-mounted at `target` in the container.
#[derive(Debug)]
pub(super) struct Bind {
    source: CString,
    target: CString,
    read_only: bool,
}

/// The container's mounts and the environment that goes with them.
#[derive(Debug, Default)]
pub(super) struct Mounts {
    pub(super) binds: Vec<Bind>,
    pub(super) env: Vec<(String, String)>,
}

impl Mounts {
    fn bind(&mut self, source: &Path, target: &str, read_only: bool) -> Result<(), String> {
        let c = |p: &str| CString::new(p).map_err(|_| format!("mount path {p:?}"));
        self.binds.push(Bind {
            source: c(&source.to_string_lossy())?,
            target: c(target)?,
            read_only,
        });
        Ok(())
    }

    /// Makes every mount point that does not exist yet (an empty directory on the host,
    /// as a node's kubelet makes them), so the process can mount onto it.
    pub(super) fn prepare(&self) -> Result<(), String> {
        for b in &self.binds {
            let target = PathBuf::from(b.target.to_string_lossy().into_owned());
            std::fs::create_dir_all(&target)
                .map_err(|e| format!("mount point {}: {e}", target.display()))?;
        }
        Ok(())
    }

    /// In the new process, before it runs the container's binary: a mount namespace of
    /// its own, private so nothing propagates back to the host, then the binds.
    /// Only system calls, as befits code between fork and exec.
    pub(super) fn enter(&self) -> std::io::Result<()> {
        if self.binds.is_empty() {
            return Ok(());
        }
        let check = |rc: libc::c_int| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: plain system calls with NUL-terminated strings that outlive them.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            let root = c"/".as_ptr();
            let none = std::ptr::null();
            check(libc::mount(
                none,
                root,
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                none.cast(),
            ))?;
            for b in &self.binds {
                let (source, target) = (b.source.as_ptr(), b.target.as_ptr());
                check(libc::mount(
                    source,
                    target,
                    none,
                    libc::MS_BIND,
                    none.cast(),
                ))?;
                if b.read_only {
                    let flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY;
                    check(libc::mount(none, target, none, flags, none.cast()))?;
                }
            }
        }
        Ok(())
    }
}

/// Whether this process may make mount namespaces (root).
pub fn may_mount() -> bool {
    // SAFETY: no arguments, no side effects.
    unsafe { libc::geteuid() == 0 }
}

impl Kubelet {
    /// Writes the container's Secret and ConfigMap volumes and its ServiceAccount's files
    /// under the pod's directory `dir` and says where each is mounted.
    pub(super) async fn mounts(
        &self,
        pod: &Pod,
        container: &Container,
        dir: &Path,
    ) -> Result<Mounts, String> {
        let ns = pod.namespace().unwrap_or_default();
        let spec = pod.spec.as_ref().expect("scheduled pods have a spec");
        let mut mounts = Mounts::default();
        for m in container.volume_mounts.iter().flatten() {
            let Some(volume) = spec.volumes.iter().flatten().find(|v| v.name == m.name) else {
                return Err(format!("volume {:?} is mounted but not defined", m.name));
            };
            let files = if let Some(s) = &volume.secret {
                let source = (Source::Secret, s.secret_name.as_deref().unwrap_or_default());
                let (items, optional) = (s.items.as_deref(), s.optional.unwrap_or(false));
                self.volume_files(source, &ns, items, optional).await?
            } else if let Some(c) = &volume.config_map {
                let source = (Source::ConfigMap, c.name.as_str());
                let (items, optional) = (c.items.as_deref(), c.optional.unwrap_or(false));
                self.volume_files(source, &ns, items, optional).await?
            } else {
                continue;
            };
            let source = dir.join("volumes").join(&m.name);
            write_files(&source, &files)?;
            mounts.bind(&source, &m.mount_path, m.read_only.unwrap_or(false))?;
        }
        let Some(api) = &self.config.in_cluster else {
            return Ok(mounts);
        };
        mounts.env = vec![
            ("KUBERNETES_SERVICE_HOST".into(), api.host.clone()),
            ("KUBERNETES_SERVICE_PORT".into(), api.port.to_string()),
            ("KUBERNETES_SERVICE_PORT_HTTPS".into(), api.port.to_string()),
        ];
        let mounted = mounts
            .binds
            .iter()
            .any(|b| b.target.to_bytes() == SERVICE_ACCOUNT_DIR.as_bytes());
        let account = spec.service_account_name.as_deref().unwrap_or("default");
        if !mounted && self.automount(pod, &ns, account).await? {
            let token = self.token(&ns, account).await?;
            let files = vec![
                ("token".to_owned(), token.into_bytes()),
                ("ca.crt".to_owned(), api.ca_pem.clone().into_bytes()),
                ("namespace".to_owned(), ns.clone().into_bytes()),
            ];
            let source = dir.join("serviceaccount");
            write_files(&source, &files)?;
            mounts.bind(&source, SERVICE_ACCOUNT_DIR, true)?;
        }
        Ok(mounts)
    }

    /// Whether the pod gets its account's token: its own say, else the account's, else
    /// yes.
    async fn automount(&self, pod: &Pod, ns: &str, account: &str) -> Result<bool, String> {
        let spec = pod.spec.as_ref().expect("scheduled pods have a spec");
        if let Some(choice) = spec.automount_service_account_token {
            return Ok(choice);
        }
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let sa = accounts
            .get(account)
            .await
            .map_err(|e| format!("serviceaccount {ns}/{account}: {e}"))?;
        Ok(sa.automount_service_account_token.unwrap_or(true))
    }

    /// A bound token for the account (TokenRequest), as the kubelet's projected
    /// volume gets one.
    async fn token(&self, ns: &str, account: &str) -> Result<String, String> {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), ns);
        let request = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {"expirationSeconds": TOKEN_SECONDS}});
        let response: Value = accounts
            .create_subresource("token", account, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("a token for serviceaccount {ns}/{account}: {e}"))?;
        response["status"]["token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("a TokenRequest for {ns}/{account} without a token"))
    }

    /// The keys and bytes of a Secret or ConfigMap, as env `valueFrom` and volumes read
    /// them (a Secret's `stringData` included); `None` if it does not exist.
    pub(super) async fn source_data(
        &self,
        kind: Source,
        ns: &str,
        name: &str,
    ) -> Result<Option<Vec<(String, Vec<u8>)>>, String> {
        let failed = |e: kube::Error| format!("{} {name}: {e}", kind.name());
        Ok(match kind {
            Source::Secret => {
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
                secrets.get_opt(name).await.map_err(failed)?.map(|s| {
                    let data = s.data.unwrap_or_default().into_iter();
                    let text = s.string_data.unwrap_or_default().into_iter();
                    (data.map(|(k, v)| (k, v.0)))
                        .chain(text.map(|(k, v)| (k, v.into_bytes())))
                        .collect()
                })
            }
            Source::ConfigMap => {
                let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
                maps.get_opt(name).await.map_err(failed)?.map(|m| {
                    let data = m.data.unwrap_or_default().into_iter();
                    let binary = m.binary_data.unwrap_or_default().into_iter();
                    (data.map(|(k, v)| (k, v.into_bytes())))
                        .chain(binary.map(|(k, v)| (k, v.0)))
                        .collect()
                })
            }
        })
    }

    /// A Secret or ConfigMap volume's files: every key, or the `items` listed; an absent
    /// source is an empty volume if it is `optional`, else the kubelet's refusal.
    async fn volume_files(
        &self,
        (kind, name): (Source, &str),
        ns: &str,
        items: Option<&[KeyToPath]>,
        optional: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, String> {
        match self.source_data(kind, ns, name).await? {
            Some(data) => select(data, items, kind.name(), name, optional),
            None if optional => Ok(vec![]),
            None => Err(format!(
                "{} \"{name}\" not found in namespace {ns}",
                kind.name()
            )),
        }
    }
}

/// Where a volume's or an env var's contents come from.
#[derive(Clone, Copy, Debug)]
pub(super) enum Source {
    Secret,
    ConfigMap,
}

impl Source {
    pub(super) fn name(self) -> &'static str {
        match self {
            Source::Secret => "Secret",
            Source::ConfigMap => "ConfigMap",
        }
    }
}

/// Every key as a file of its name, or only the `items` listed, each at its `path`.
fn select(
    data: Vec<(String, Vec<u8>)>,
    items: Option<&[KeyToPath]>,
    kind: &str,
    name: &str,
    optional: bool,
) -> Result<Vec<(String, Vec<u8>)>, String> {
    let Some(items) = items else {
        return Ok(data);
    };
    let mut out = vec![];
    for item in items {
        match data.iter().find(|(k, _)| *k == item.key) {
            Some((_, bytes)) => out.push((item.path.clone(), bytes.clone())),
            None if optional => {}
            None => return Err(format!("{kind} {name} has no key {:?}", item.key)),
        }
    }
    Ok(out)
}

/// Writes `files` (relative paths, no `..`) afresh under `dir`.
fn write_files(dir: &Path, files: &[(String, Vec<u8>)]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("writing {}: {e}", dir.display());
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(fail)?;
    }
    std::fs::create_dir_all(dir).map_err(fail)?;
    for (path, bytes) in files {
        let relative = Path::new(path);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!(
                "volume path {path:?} must be relative, without '..'"
            ));
        }
        let file = dir.join(relative);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).map_err(fail)?;
        }
        std::fs::write(&file, bytes).map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_servers_address_splits_into_host_and_port() {
        let api = InCluster::new("https://127.0.0.1:6443", "pem").unwrap();
        assert_eq!((api.host.as_str(), api.port), ("127.0.0.1", 6443));
        assert!(InCluster::new("http://127.0.0.1:6443", "pem").is_none());
    }

    #[test]
    fn items_pick_keys_and_name_their_files() {
        let data = vec![("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())];
        let items = [KeyToPath {
            key: "b".into(),
            path: "dir/bee".into(),
            ..KeyToPath::default()
        }];
        let picked = select(data.clone(), Some(&items), "Secret", "s", false).unwrap();
        assert_eq!(picked, vec![("dir/bee".to_owned(), b"2".to_vec())]);
        let absent = [KeyToPath {
            key: "c".into(),
            path: "c".into(),
            ..KeyToPath::default()
        }];
        let e = select(data.clone(), Some(&absent), "Secret", "s", false).unwrap_err();
        assert!(e.contains("no key \"c\""), "{e}");
        assert!(
            select(data, Some(&absent), "Secret", "s", true)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_volume_file_may_not_climb_out_of_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_files(dir.path(), &[("../x".into(), vec![])]).unwrap_err();
        assert!(e.contains("without '..'"), "{e}");
    }
}
