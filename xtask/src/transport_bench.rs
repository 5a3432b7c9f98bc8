//! `cargo xtask bench transport`: page codecs and the sealed link over loopback TCP.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use rand::{RngCore, SeedableRng};
use rayon::prelude::*;
use transport::handshake::{client, server};
use transport::pages::{decode_range, encode_range, encode_range_with, PAGE};
use transport::{Codec, PageRange, Psk, Received};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;
const RANGE: usize = 2 * MIB;

fn mix(name: &str) -> Vec<u8> {
    match name {
        "zero" => vec![0; SIZE],
        "text" => {
            let words: &[&[u8]] = &[
                b"the ",
                b"epoch ",
                b"standby ",
                b"commits ",
                b"page ",
                b"vcpu ",
                b"kvm ",
                b"tandem\n",
            ];
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let mut v = Vec::with_capacity(SIZE);
            while v.len() < SIZE {
                v.extend_from_slice(words[(rng.next_u32() % words.len() as u32) as usize]);
            }
            v.truncate(SIZE);
            v
        }
        _ => {
            let mut v = vec![0; SIZE];
            rand::rngs::StdRng::seed_from_u64(2).fill_bytes(&mut v);
            v
        }
    }
}

/// The same memory with one byte in every 64 changed (pages re-dirtied by an epoch).
fn redirtied(prev: &[u8]) -> Vec<u8> {
    let mut v = prev.to_vec();
    for i in (0..v.len()).step_by(64) {
        v[i] = v[i].wrapping_add(1);
    }
    v
}

fn mbs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn codec_rows(out: &mut String) {
    writeln!(
        out,
        "| mix | codec | encode MB/s | decode MB/s | wire / pages |\n|---|---|---|---|---|"
    )
    .unwrap();
    for name in ["zero", "text", "random"] {
        let data = mix(name);
        let next = redirtied(&data);
        let codecs: &[Codec] = if name == "zero" {
            &[Codec::Zero, Codec::Zstd]
        } else {
            &[Codec::Raw, Codec::Zstd, Codec::XorZstd]
        };
        for &codec in codecs {
            let src = if codec == Codec::XorZstd {
                &next
            } else {
                &data
            };
            let t = Instant::now();
            let ranges: Vec<PageRange> = src
                .par_chunks(RANGE)
                .zip(data.par_chunks(RANGE))
                .enumerate()
                .map(|(i, (c, p))| encode_range_with((i * RANGE) as u64, c, Some(p), codec))
                .collect();
            let enc = t.elapsed().as_secs_f64();
            let wire: usize = ranges.iter().map(|r| r.payload.len()).sum();
            let t = Instant::now();
            let ok = ranges.par_iter().zip(data.par_chunks(RANGE)).all(|(r, p)| {
                decode_range(r, SIZE as u64, Some(p))
                    .map(|b| b.len() == RANGE)
                    .unwrap_or(false)
            });
            let dec = t.elapsed().as_secs_f64();
            assert!(ok, "decode failed");
            let row = format!(
                "| {name} | {codec:?} | {:.0} | {:.0} | {:.3} |",
                mbs(SIZE, enc),
                mbs(SIZE, dec),
                wire as f64 / SIZE as f64
            );
            println!("{row}");
            writeln!(out, "{row}").unwrap();
        }
    }
}

/// Sends `data` as auto-coded 2 MiB ranges in frames of 16 ranges; the receiver decodes them.
/// Returns MB/s of guest pages, end to end.
fn link(data: &[u8], sealed: bool) -> f64 {
    let psk = Psk::generate();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = l.local_addr().expect("addr");
    let p2 = psk.clone();
    let len = data.len();
    let rx = std::thread::spawn(move || {
        let (s, _) = l.accept().expect("accept");
        s.set_nodelay(true).ok();
        let mut ch = server(s, sealed.then_some(&p2)).expect("server handshake");
        let mut got = 0usize;
        loop {
            match ch.recv().expect("recv") {
                Received::Pages(rs) => {
                    let n: usize = rs
                        .par_iter()
                        .map(|r| decode_range(r, len as u64, None).expect("decode").len())
                        .sum();
                    got += n;
                }
                Received::End => return got,
                other => panic!("unexpected {other:?}"),
            }
        }
    });
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    let mut ch = client(s, sealed.then_some(&psk)).expect("client handshake");
    let t = Instant::now();
    // Pipelined: batch n+1 is coded (on the rayon pool) while batch n is sealed and sent.
    let encode = |j: usize, batch: &[u8]| -> Vec<PageRange> {
        batch
            .par_chunks(RANGE)
            .enumerate()
            .map(|(i, c)| encode_range((j * 16 * RANGE + i * RANGE) as u64, c, None))
            .collect()
    };
    let batches: Vec<&[u8]> = data.chunks(16 * RANGE).collect();
    let mut next = Some(encode(0, batches[0]));
    for j in 0..batches.len() {
        let current = next.take().expect("encoded");
        let (sent, following) = rayon::join(
            || ch.send_pages(&current),
            || batches.get(j + 1).map(|b| encode(j + 1, b)),
        );
        sent.expect("send");
        next = following;
    }
    ch.end().expect("end");
    let got = rx.join().expect("receiver");
    assert_eq!(got, data.len());
    mbs(data.len(), t.elapsed().as_secs_f64())
}

fn raw_tcp(bytes: usize) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut buf = vec![0u8; MIB];
        let mut n = 0;
        while n < bytes {
            n += s.read(&mut buf).expect("read");
        }
    });
    let mut s = TcpStream::connect(addr).expect("connect");
    let buf = vec![7u8; MIB];
    let t = Instant::now();
    for _ in 0..bytes / MIB {
        s.write_all(&buf).expect("write");
    }
    rx.join().expect("receiver");
    mbs(bytes, t.elapsed().as_secs_f64())
}

pub fn bench(out: &mut String) -> Result<(), String> {
    let mut text = String::from(
        "### Transport\n\n`cargo xtask bench transport`: 64 MiB of guest pages per mix, coded in 2 MiB \
         ranges on both cores (rayon). XorZstd codes the same memory with one byte in 64 changed \
         against the copy sent before. *wire / pages*: payload bytes per page byte.\n\n",
    );
    codec_rows(&mut text);
    writeln!(
        text,
        "\nEnd to end over loopback TCP (handshake, then Pages frames of 16 ranges, codec picked \
         per range, receiver decodes every range; both ends on this 2-core machine):\n\n\
         | mix | sealed (AES-256-GCM) MB/s | plaintext MB/s |\n|---|---|---|"
    )
    .unwrap();
    for name in ["zero", "text", "random"] {
        let data = mix(name);
        let row = format!(
            "| {name} | {:.0} | {:.0} |",
            link(&data, true),
            link(&data, false)
        );
        println!("{row}");
        writeln!(text, "{row}").unwrap();
    }
    let tcp = raw_tcp(512 * MIB);
    writeln!(
        text,
        "\nRaw loopback TCP (512 MiB, one writer, one reader): {tcp:.0} MB/s.\n"
    )
    .unwrap();
    println!("raw loopback TCP: {tcp:.0} MB/s");
    let _ = PAGE;
    out.push_str(&text);
    Ok(())
}
