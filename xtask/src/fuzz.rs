//! `cargo xtask fuzz`: seed corpora from real encoder output, then run every target.

use std::path::{Path, PathBuf};
use std::process::Command;

use checkpoint::memfile::{save_compressed, MainMemPersist, MemIndex, MemState};
use checkpoint::{Persist, Section, Snapshot};
use transport::frame::{Epoch, Fence, FrameHeader, FrameType, Generation};
use transport::message::NackCode;
use transport::pages::{encode_batch, encode_range, PageRange};
use transport::Message;

/// The targets, in the order they run.
pub const TARGETS: [&str; 7] = [
    "frame_header",
    "control_message",
    "page_ranges",
    "handshake",
    "snapshot_reader",
    "standby_machine",
    "kv_requests",
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("fuzz")
}

fn messages() -> Vec<Message> {
    let fence = Fence {
        generation: Generation(3),
        epoch: Epoch(41),
    };
    vec![
        Message::Hello {
            version: 1,
            nonce: [7; 32],
            plaintext: false,
        },
        Message::HelloReply {
            version: 1,
            nonce: [9; 32],
            proof: [1; 32],
        },
        Message::Auth { proof: [2; 32] },
        Message::FullSync {
            fence,
            mem_bytes: 256 << 20,
            vcpus: 4,
        },
        Message::EpochBegin { fence, pages: 2000 },
        Message::DeviceState {
            fence,
            name: "vcpu/1".into(),
            version: 1,
            data: vec![0xaa; 300],
        },
        Message::DeviceState {
            fence,
            name: "group/output".into(),
            version: 1,
            data: vec![1, 2, 3],
        },
        Message::EpochEnd {
            fence,
            ranges: 17,
            digest: [5; 32],
        },
        Message::Ack { fence },
        Message::Nack {
            fence,
            code: NackCode::Stale,
            message: "stale generation 2".into(),
        },
        Message::Heartbeat { fence },
        Message::Goodbye,
        Message::Intent {
            intent: transport::Intent::Join,
        },
        Message::PreCopy {
            fence,
            round: 1,
            pages: 1045,
        },
        Message::PreCopyEnd {
            fence,
            round: 1,
            ranges: 3,
            digest: [9; 32],
        },
        Message::Switch { fence },
    ]
}

fn ranges() -> Vec<PageRange> {
    let text: Vec<u8> = (0..8192).map(|i| b"tandem epoch page "[i % 18]).collect();
    let mut again = text.clone();
    again[77] ^= 0xff;
    vec![
        encode_range(0x1000, &[0u8; 4096], None),
        encode_range(0x3000, &text, None),
        encode_range(0x9000, &again, Some(&text)),
        transport::pages::encode_range_with(0xb000, &again, Some(&text), transport::Codec::XorZstd),
        PageRange {
            gpa: 0x20000,
            pages: 1,
            codec: transport::Codec::Raw,
            payload: vec![0x42; 4096].into(),
        },
    ]
}

/// Writes seed inputs for every target.
pub fn seed(dir: &Path) -> std::io::Result<()> {
    let put = |target: &str, name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let d = dir.join(target);
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join(name), bytes)
    };
    for (i, kind) in [
        FrameType::Handshake,
        FrameType::Control,
        FrameType::Pages,
        FrameType::Heartbeat,
        FrameType::Cancel,
        FrameType::EndOfStream,
    ]
    .into_iter()
    .enumerate()
    {
        put(
            "frame_header",
            &format!("h{i}"),
            &FrameHeader::new(kind, 0, 16).expect("small").encode(),
        )?;
    }
    for (i, m) in messages().iter().enumerate() {
        put("control_message", &format!("m{i}"), &m.encode())?;
    }
    let rs = ranges();
    put("page_ranges", "batch", &encode_batch(&rs))?;
    for (i, r) in rs.iter().enumerate() {
        put(
            "page_ranges",
            &format!("r{i}"),
            &encode_batch(std::slice::from_ref(r)),
        )?;
    }
    let frame = |m: &Message| {
        let b = m.encode();
        [
            FrameHeader::new(m.frame_type(), 0, b.len())
                .expect("small")
                .encode()
                .to_vec(),
            b,
        ]
        .concat()
    };
    let hello = frame(&Message::Hello {
        version: 1,
        nonce: [3; 32],
        plaintext: false,
    });
    put("handshake", "hello", &hello)?;
    put(
        "handshake",
        "hello-auth",
        &[hello.clone(), frame(&Message::Auth { proof: [4; 32] })].concat(),
    )?;
    put(
        "handshake",
        "plaintext",
        &frame(&Message::Hello {
            version: 1,
            nonce: [3; 32],
            plaintext: true,
        }),
    )?;
    // A real compressed snapshot of a small memory.
    let mem: Vec<u8> = (0..(4usize << 20))
        .map(|i| if i < 300_000 { (i % 251) as u8 } else { 0 })
        .collect();
    let read = |gpa: u64, buf: &mut [u8]| {
        buf.copy_from_slice(&mem[gpa as usize..gpa as usize + buf.len()]);
        Ok(())
    };
    let (index, sections) =
        save_compressed(mem.len() as u64, &read, &|_| {}).map_err(std::io::Error::other)?;
    let mut snap = Snapshot::default();
    snap.push(Section {
        name: "module/MainMem".into(),
        version: MainMemPersist::VERSION,
        data: MainMemPersist::encode(&MemState {
            index: index.clone(),
            file: None,
        })
        .map_err(std::io::Error::other)?,
    })
    .map_err(std::io::Error::other)?;
    for s in sections {
        snap.push(s).map_err(std::io::Error::other)?;
    }
    snap.push(Section {
        name: "group/output".into(),
        version: 1,
        data: vec![0; 40],
    })
    .map_err(std::io::Error::other)?;
    put("snapshot_reader", "compressed", &snap.to_bytes())?;
    let _: MemIndex = index;
    // The kv conformance script, as RESP2 arrays and as inline lines (first byte: the split).
    let mut resp = vec![128u8];
    let mut inline = vec![64u8];
    for line in kvstore::compat::SCRIPT {
        if let Some(args) = kvstore::resp::split_args(line.as_bytes()) {
            let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
            kvstore::resp::encode_request(&refs, &mut resp);
        }
        inline.extend_from_slice(line.as_bytes());
        inline.extend_from_slice(b"\r\n");
    }
    put("kv_requests", "script-resp", &resp)?;
    put("kv_requests", "script-inline", &inline)?;
    // Whole sessions of the standby's protocol, built with the real encoders.
    for (name, ops) in ft::standby::harness::seeds() {
        put(
            "standby_machine",
            name,
            &ft::standby::harness::encode_script(&ops),
        )?;
    }
    Ok(())
}

fn nightly_and_cargo_fuzz() -> Result<(), String> {
    let ok = |c: &mut Command| c.output().map(|o| o.status.success()).unwrap_or(false);
    if !ok(Command::new("cargo").args(["+nightly", "--version"])) {
        return Err("no nightly toolchain (cargo-fuzz needs one): fuzz targets not run".into());
    }
    if !ok(Command::new("cargo").args(["fuzz", "--version"])) {
        return Err(
            "cargo-fuzz is not installed (`cargo install cargo-fuzz`): fuzz targets not run".into(),
        );
    }
    Ok(())
}

/// Runs the targets; prints and returns (target, runs) per target.
pub fn run(secs: u64, only: Option<&str>) -> Result<(), String> {
    if let Err(why) = nightly_and_cargo_fuzz() {
        println!("xtask fuzz: {why}");
        return Ok(());
    }
    let fuzz = fuzz_dir();
    let corpus = fuzz.join("corpus");
    seed(&corpus).map_err(|e| format!("cannot write seed corpora: {e}"))?;
    let mut rows = Vec::new();
    for t in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        println!("fuzzing {t} for {secs} s");
        let out = Command::new("cargo")
            .current_dir(&fuzz)
            .args([
                "+nightly",
                "fuzz",
                "run",
                t,
                corpus.join(t).to_str().expect("utf-8 path"),
                "--",
            ])
            .arg(format!("-max_total_time={secs}"))
            .arg("-rss_limit_mb=4096")
            .arg("-print_final_stats=1")
            .output()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|| "?".into());
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            return Err(format!(
                "fuzz target {t} failed after {runs} runs:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ));
        }
        println!("{t}: {runs} runs in {secs} s, no crash");
        rows.push((t.to_string(), runs));
    }
    println!("\n| target | runs | seconds |\n|---|---|---|");
    for (t, r) in rows {
        println!("| {t} | {r} | {secs} |");
    }
    Ok(())
}
