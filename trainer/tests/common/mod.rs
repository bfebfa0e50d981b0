//! Helpers shared by the integration tests that run the trainer binary.

use std::path::Path;
use std::process::Command;

/// Runs the trainer binary with `args`, asserting it succeeds; returns its stdout.
pub fn trainer(args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let out = Command::new(env!("CARGO_BIN_EXE_starling-trainer"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Checks `checkpoint` with the reference reader, Python `safetensors`, which runs when
/// `STARLING_PYTHON` names a Python with `safetensors` and `numpy` installed (`.ci/run`
/// sets it up; under `CI=true` it is required). Returns the checker's report.
pub fn python_check(checkpoint: &Path) -> Option<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/check_checkpoint.py");
    match std::env::var_os("STARLING_PYTHON") {
        Some(python) => {
            let out = Command::new(python)
                .arg(script)
                .arg(checkpoint)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(text)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must check checkpoints with Python safetensors: set STARLING_PYTHON")
        }
        None => {
            eprintln!("STARLING_PYTHON not set: skipped the Python safetensors check");
            None
        }
    }
}
