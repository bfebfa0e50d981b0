//! Renders the CRDs in `crate::api` to the YAML files under `crds/`.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// The command that regenerates `crds/` from a checkout's root.
pub const REGENERATE: &str = "cargo run -p starling-operator -- crdgen";

/// Where the CRDs are kept: `crds/`, and the hub chart's `crds/`, which Helm installs.
pub const DIRECTORIES: [&str; 2] = ["crds", "charts/starling-hub/crds"];

/// `crds/<plural>.<group>.yaml`: the CRD's own name, so a file is easy to find from
/// `kubectl get crd`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!(
        "{}.yaml",
        crd.metadata
            .name
            .as_deref()
            .expect("derived CRDs are named")
    )
}

/// The exact text written for one CRD.
pub fn render(crd: &CustomResourceDefinition) -> String {
    let yaml = serde_yaml::to_string(crd).expect("a CRD always serialises");
    format!("# Generated from operator/src/api by `starling-operator crdgen`. Do not edit.\n{yaml}")
}

/// Writes every CRD into `dir` (created if missing) and returns the paths written.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    crate::api::crds()
        .iter()
        .map(|crd| {
            let path = dir.join(file_name(crd));
            std::fs::write(&path, render(crd))?;
            Ok(path)
        })
        .collect()
}
