//! Builds the `guests/` workspace (no_std guests, `panic = "abort"` in that workspace's
//! profiles) with the same cargo and rustc as this build, into `$OUT_DIR/guests`, so that
//! `src/lib.rs` can embed the ELF images with `include_bytes!`.
//!
//! * Its own target dir: no wait on the outer build's lock.
//! * `--target x86_64-unknown-linux-gnu` (the host's): rustflags then reach only the guests,
//!   not their build scripts and proc macros.
//! * `CARGO_ENCODED_RUSTFLAGS=-Crelocation-model=static`; the link flags (`-nostdlib -static
//!   -no-pie -T link.ld`) come from each guest's build script (`guests/link.rs`).
//! * The outer build's flags, wrappers and profile overrides are removed from the environment.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 6] = [
    "hello",
    "panic",
    "blk-check",
    "net-echo",
    "stall-probe",
    "kv",
];
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest.parent().expect("workspace root");
    let guests = root.join("guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let target_dir = out.join("guests");

    for p in [
        "Cargo.toml",
        "Cargo.lock",
        "link.ld",
        "link.rs",
        ".cargo/config.toml",
        "rt",
        "virtio",
        "hello",
        "panic",
        "blk-check",
        "net-echo",
        "stall-probe",
        "kv",
    ] {
        println!("cargo:rerun-if-changed={}", guests.join(p).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("abi/src").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("kvstore/src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("kvstore/Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        root.join("abi/Cargo.toml").display()
    );

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guests)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target")
        .arg(TARGET)
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in std::env::vars_os() {
        let Some(k) = key.to_str() else { continue };
        if k == "RUSTFLAGS"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k.starts_with("__CARGO")
            || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("CARGO_BUILD_")
            || k.starts_with("CARGO_TARGET_")
            || k.starts_with("CARGO_ENCODED_")
        {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guests: {e}"));
    if !status.success() {
        panic!(
            "building the guests failed ({status}); try: cd {} && cargo build --release",
            guests.display()
        );
    }
    let release = target_dir.join(TARGET).join("release");
    for g in GUESTS {
        let elf = release.join(g);
        assert!(Path::new(&elf).is_file(), "{} was not built", elf.display());
    }
    println!("cargo:rustc-env=GUEST_IMAGES_DIR={}", release.display());
}
