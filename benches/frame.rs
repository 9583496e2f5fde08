//! Criterion benchmarks of the hot-path codec: splitting frames off a read buffer, and
//! the relay's scanner walking a typical server response and client request.

use bytes::{BufMut, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pgrelay::protocol::{backend, frontend, split_frame, Scanner, Step, MAX_MESSAGE_LEN};

fn msg(buf: &mut BytesMut, tag: u8, body: &[u8]) {
    buf.put_u8(tag);
    buf.put_u32(body.len() as u32 + 4);
    buf.put_slice(body);
}

/// What a server sends for `pgbench -S`: RowDescription, DataRow, CommandComplete, Z,
/// repeated.
fn select_responses(count: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for _ in 0..count {
        msg(
            &mut buf,
            b'T',
            b"\0\x01abalance\0\0\0\x40\x00\0\x03\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0",
        );
        msg(&mut buf, b'D', b"\0\x01\0\0\0\x041234");
        msg(&mut buf, b'C', b"SELECT 1\0");
        msg(&mut buf, b'Z', b"I");
    }
    buf
}

/// A pgbench -S request in the extended protocol: Parse, Bind, Describe, Execute, Sync.
fn extended_requests(count: usize) -> BytesMut {
    let mut buf = BytesMut::new();
    for _ in 0..count {
        msg(
            &mut buf,
            b'P',
            b"\0SELECT abalance FROM pgbench_accounts WHERE aid = $1;\0\0\0",
        );
        msg(&mut buf, b'B', b"\0\0\0\0\0\x01\0\0\0\x0512345\0\0");
        msg(&mut buf, b'D', b"P\0");
        msg(&mut buf, b'E', b"\0\0\0\0\0");
        msg(&mut buf, b'S', b"");
    }
    buf
}

fn bench(c: &mut Criterion) {
    const N: usize = 1000;
    let responses = select_responses(N).freeze();
    let requests = extended_requests(N).freeze();

    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements((4 * N) as u64));
    group.bench_function("split_frame (server messages)", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&responses[..]);
            let mut n = 0;
            while let Ok(Some(frame)) = split_frame(&mut buf, MAX_MESSAGE_LEN) {
                n += frame.tag() as usize;
            }
            black_box(n)
        })
    });
    group.bench_function("scanner (server messages)", |b| {
        b.iter(|| {
            let mut scanner = Scanner::new(&backend::INSPECT, MAX_MESSAGE_LEN);
            let mut ready = 0;
            let scanned = scanner.scan(&responses, |tag, body| {
                if tag == b'Z' {
                    ready += body.map_or(0, |b| b.len());
                }
                Step::Forward
            });
            black_box((scanned.map(|s| s.forward), ready))
        })
    });
    group.throughput(Throughput::Elements((5 * N) as u64));
    group.bench_function("scanner (client extended requests)", |b| {
        b.iter(|| {
            let mut scanner = Scanner::new(&frontend::INSPECT, MAX_MESSAGE_LEN);
            let mut syncs = 0;
            let scanned = scanner.scan(&requests, |tag, _| {
                syncs += usize::from(tag == b'S');
                Step::Forward
            });
            black_box((scanned.map(|s| s.forward), syncs))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
