//! The one way Starling's pods are locked down: the Pod Security Standards' `restricted`
//! profile, which the member chart has the trainer namespace enforce.

use k8s_openapi::api::core::v1::{
    Capabilities, EmptyDirVolumeSource, PodSecurityContext, PodSpec, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};

/// Where every pod Starling makes works (data shards, state, checkpoints): an
/// `emptyDir`, so the images' root filesystem can stay read-only.
pub const WORKDIR: &str = "/var/lib/starling";
/// The user the images run as (distroless `nonroot`).
const NONROOT: i64 = 65532;

/// Makes `spec` meet the Pod Security Standards' `restricted` profile, as the member
/// chart labels the trainer namespace to enforce: non-root, no privilege escalation, no
/// capabilities, the runtime's seccomp profile and a read-only root filesystem, with an
/// `emptyDir` working directory ([`WORKDIR`]) and `/tmp` to write to.
pub fn locked_down(spec: &mut PodSpec) {
    spec.security_context = Some(PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(NONROOT),
        run_as_group: Some(NONROOT),
        fs_group: Some(NONROOT),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    });
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for (name, _) in SCRATCH {
        if !volumes.iter().any(|v| v.name == name) {
            volumes.push(Volume {
                name: name.into(),
                empty_dir: Some(EmptyDirVolumeSource::default()),
                ..Volume::default()
            });
        }
    }
    for c in &mut spec.containers {
        c.security_context = Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..SecurityContext::default()
        });
        c.working_dir.get_or_insert_with(|| WORKDIR.into());
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        for (name, path) in SCRATCH {
            if !mounts.iter().any(|m| m.mount_path == path) {
                mounts.push(VolumeMount {
                    name: name.into(),
                    mount_path: path.into(),
                    ..VolumeMount::default()
                });
            }
        }
    }
}

/// The writable directories of a locked-down pod: (volume, mount path).
const SCRATCH: [(&str, &str); 2] = [("work", WORKDIR), ("tmp", "/tmp")];

/// What in `spec` the Pod Security Standards' `restricted` profile refuses (empty when
/// it admits the pod): the checks the member's trainer namespace enforces.
#[cfg(test)]
pub(crate) fn restricted_violations(spec: &PodSpec) -> Vec<String> {
    let mut out = vec![];
    let pod = spec.security_context.clone().unwrap_or_default();
    let host = [spec.host_network, spec.host_pid, spec.host_ipc];
    if host.contains(&Some(true)) {
        out.push("host namespaces".to_owned());
    }
    let seccomp = pod.seccomp_profile.as_ref().map(|p| p.type_.as_str());
    if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
        out.push(format!("seccompProfile {seccomp:?}"));
    }
    for v in spec.volumes.iter().flatten() {
        let allowed = v.empty_dir.is_some()
            || v.secret.is_some()
            || v.config_map.is_some()
            || v.projected.is_some()
            || v.downward_api.is_some();
        if !allowed {
            out.push(format!("volume {} of a kind restricted refuses", v.name));
        }
    }
    for c in &spec.containers {
        let sc = c.security_context.clone().unwrap_or_default();
        let non_root = sc.run_as_non_root.or(pod.run_as_non_root);
        if non_root != Some(true) {
            out.push(format!("{}: runAsNonRoot", c.name));
        }
        if sc.allow_privilege_escalation != Some(false) {
            out.push(format!("{}: allowPrivilegeEscalation", c.name));
        }
        if sc.privileged == Some(true) {
            out.push(format!("{}: privileged", c.name));
        }
        let caps = sc.capabilities.unwrap_or_default();
        if !caps.drop.unwrap_or_default().iter().any(|d| d == "ALL") {
            out.push(format!("{}: capabilities not dropped", c.name));
        }
        if caps
            .add
            .unwrap_or_default()
            .iter()
            .any(|a| a != "NET_BIND_SERVICE")
        {
            out.push(format!("{}: capabilities added", c.name));
        }
        if sc.read_only_root_filesystem != Some(true) {
            out.push(format!("{}: writable root filesystem", c.name));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_down_pod_meets_the_restricted_pod_security_standard() {
        let mut spec = PodSpec {
            containers: vec![k8s_openapi::api::core::v1::Container {
                name: "trainer".into(),
                ..Default::default()
            }],
            ..PodSpec::default()
        };
        let before = restricted_violations(&spec);
        for refused in ["seccompProfile", "runAsNonRoot", "allowPrivilegeEscalation"] {
            assert!(before.iter().any(|v| v.contains(refused)), "{before:?}");
        }
        locked_down(&mut spec);
        assert_eq!(restricted_violations(&spec), Vec::<String>::new());
        let mounts = spec.containers[0].volume_mounts.clone().unwrap();
        let paths: Vec<&str> = mounts.iter().map(|m| m.mount_path.as_str()).collect();
        assert_eq!(paths, [WORKDIR, "/tmp"]);
        locked_down(&mut spec);
        assert_eq!(spec.volumes.unwrap().len(), 2, "idempotent");
    }
}
