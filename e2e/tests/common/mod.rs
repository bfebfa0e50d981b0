//! Helpers shared by the end-to-end tests.

use std::path::Path;
use std::process::Command;

/// Runs `hub_client.py` (the official `huggingface_hub` client) against the Hub at
/// `endpoint` as `token`, if a Python with it is named by `STARLING_PYTHON` (`.ci/run`
/// installs one; under `CI` it is required). Returns its output.
pub fn hub_client(endpoint: &str, token: &str, home: &Path, args: &[&str]) -> Option<String> {
    let Some(python) = std::env::var_os("STARLING_PYTHON") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must check publishing with the official client: set STARLING_PYTHON"
        );
        eprintln!("STARLING_PYTHON not set: skipped the huggingface_hub check");
        return None;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hub_client.py");
    let out = Command::new(python)
        .arg(script)
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_TOKEN", token)
        .env("HF_HOME", home)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}
