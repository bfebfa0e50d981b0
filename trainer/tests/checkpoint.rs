//! The trainer binary writes a checkpoint that Hugging Face tooling can read, and samples
//! text from it.
//!
//! The reference reader is Python `safetensors` (see `common::python_check`).

#![allow(clippy::unwrap_used)] // a test fails by panicking, with the value it got

mod common;

use std::path::Path;

use common::{python_check, trainer};

#[test]
fn init_writes_a_hugging_face_checkpoint_that_sample_and_python_read() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("round-0");
    let config = fixtures.join("fixtures/tiny-config.json");
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let stdout = trainer(&[
        os("init"),
        os("--seed"),
        os("42"),
        os("--config"),
        config.as_os_str(),
        os("--out"),
        ckpt.as_os_str(),
    ]);
    assert!(String::from_utf8_lossy(&stdout).contains("820352 parameters"));

    let stdout = trainer(&[
        os("sample"),
        os("--prompt"),
        os("ROMEO:"),
        os("--tokens"),
        os("20"),
        os("--checkpoint"),
        ckpt.as_os_str(),
    ]);
    // 20 byte tokens after the prompt (an untrained model's bytes may not be UTF-8).
    assert!(stdout.starts_with(b"ROMEO:") && stdout.len() > 20);

    if let Some(report) = python_check(&ckpt) {
        assert!(
            report.contains("38 tensors, 820352 parameters, LlamaForCausalLM layout OK"),
            "{report}"
        );
    }
}
