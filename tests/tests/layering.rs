//! The workspace's layering: no crate's modules import each other in a cycle
//! (`cargo xtask modgraph`, which exits non-zero and names the cycle when one exists).

use std::process::Command;

#[test]
fn no_crate_has_a_module_import_cycle() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&root)
        .args(["run", "--quiet", "-p", "xtask", "--", "modgraph"])
        .output()
        .expect("run cargo xtask modgraph");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "module import cycles:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every crate was looked at.
    for c in ["monitor:", "vmx:", "ft:", "devices:", "checkpoint:"] {
        assert!(text.contains(c), "{c} missing from:\n{text}");
    }
}
