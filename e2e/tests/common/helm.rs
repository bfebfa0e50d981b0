//! Helm, as the chart tests run it: named by `STARLING_HELM` (`.ci/run` installs it;
//! under `CI` it is required), with Helm's default environment but for its cache,
//! configuration and data homes, kept under the temporary directory.

#![allow(dead_code)] // each test uses some of these

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Helm binary, or `None` (the caller skips) outside CI.
pub fn helm() -> Option<PathBuf> {
    let Some(helm) = std::env::var_os("STARLING_HELM") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must check the charts with Helm: set STARLING_HELM (.ci/run installs it)"
        );
        eprintln!("STARLING_HELM not set: skipped the Helm chart checks");
        return None;
    };
    Some(helm.into())
}

/// The chart `name` under `charts/`.
pub fn chart(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("charts")
        .join(name)
}

/// Runs Helm with `args`.
pub fn run_helm(helm: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .args(args)
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("starling-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("starling-helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("starling-helm/data"),
        )
        .output()
        .expect("helm runs")
}

/// Runs Helm with `args` against the cluster of `kubeconfig`; its output, or a panic
/// with what Helm said.
pub fn helm_ok(helm: &Path, kubeconfig: &Path, args: &[&str]) -> String {
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = run_helm(helm, &all);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {}: {stdout}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
