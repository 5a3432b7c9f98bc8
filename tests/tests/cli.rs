//! `tandem run` as a user sees it.

use devices::DigestSink;
use tandem_tests::{require_kvm, tandem, tandem_ok, total_digest, workload};

#[test]
fn same_arguments_give_the_same_digest_as_the_reference() {
    require_kvm();
    let args = [
        "run",
        "--guest",
        "counter",
        "--vcpus",
        "4",
        "--guest-arg",
        "iters=20M",
    ];
    let a = tandem(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let b = tandem(&args);
    assert!(b.status.success());
    let w = workload("counter", &[("iters", "20M")]);
    let want = DigestSink::of(&w.reference_all(4)).total;
    assert_eq!(total_digest(&a.stdout), want);
    assert_eq!(total_digest(&b.stdout), want);
    let text = String::from_utf8_lossy(&a.stdout);
    assert!(
        text.contains("exits") && text.contains("run time"),
        "{text}"
    );
}

#[test]
fn bad_arguments_get_a_clear_message_and_exit_code_2() {
    require_kvm();
    let cases: &[(&[&str], &str)] = &[
        (&["run", "--guest", "counter", "--vcpus", "0"], "1 to 16"),
        (&["run", "--guest", "counter", "--vcpus", "17"], "1 to 16"),
        (&["run", "--guest", "counter", "--mem-mib", "8"], "16 to"),
        (
            &["run", "--guest", "counter", "--mem-mib", "33"],
            "multiple of 2",
        ),
        (
            &[
                "run",
                "--guest",
                "dirty",
                "--vcpus",
                "4",
                "--guest-arg",
                "ws_mib=64",
            ],
            "--mem-mib 264",
        ),
        (&["run", "--guest", "idle"], "unknown guest"),
        (
            &["run", "--guest", "counter", "--guest-arg", "pages=3"],
            "counter takes",
        ),
        (
            &["run", "--guest", "counter", "--guest-arg", "iters=lots"],
            "not a number",
        ),
        (
            &["run", "--guest", "counter", "--guest-arg", "batch=3"],
            "power of two",
        ),
        (
            &["run", "--image", "/nonexistent/guest.bin"],
            "/nonexistent/guest.bin",
        ),
        (&["run"], "--guest"),
    ];
    for (args, needle) in cases {
        let out = tandem(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(if needle.contains("nonexistent") { 1 } else { 2 }),
            "{args:?}: {err}"
        );
        assert!(err.contains(needle), "{args:?}: {err:?} lacks {needle:?}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn a_user_image_runs_under_the_documented_abi() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("tandem-image-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let w = workload("dirty", &[("iters", "50k"), ("ws_mib", "2")]);
    // Loaded one page above the default address, entered at its first byte.
    let at = 0x20_1000;
    let image = dir.join("dirty.bin");
    std::fs::write(&image, w.code(at).unwrap()).unwrap();
    let lines = dir.join("records.txt");
    let out = tandem_ok(&[
        "run",
        "--image",
        image.to_str().unwrap(),
        "--load-addr",
        "0x201000",
        "--vcpus",
        "2",
        "--output",
        lines.to_str().unwrap(),
    ]);
    assert_eq!(
        total_digest(&out.stdout),
        DigestSink::of(&w.reference_all(2)).total
    );
    let text = std::fs::read_to_string(&lines).unwrap();
    assert_eq!(text.lines().count(), 2 * 51);
    assert!(
        text.lines().any(|l| l.starts_with("1 50 2 ")),
        "vCPU 1's done record:\n{text}"
    );
    let bad = tandem(&[
        "run",
        "--image",
        image.to_str().unwrap(),
        "--entry",
        "0x100",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}
