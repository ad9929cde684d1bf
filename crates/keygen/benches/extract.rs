//! Extraction throughput: batches of 256-bit keys (keys/s) and single large keys (bytes/s).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dqkd_keygen::Extractor;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

fn random_ranges(n: usize, len: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(7);
    (0..n)
        .map(|_| {
            let mut r = vec![0u8; len];
            rng.fill_bytes(&mut r);
            r
        })
        .collect()
}

fn batch_256bit(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("batch_256bit_n3_c1");
    for keys in [100_000usize, 1_000_000] {
        let e = Extractor::new(3, 1).expect("valid");
        let l = e.block_len(32).expect("valid");
        let ranges = random_ranges(3, l * keys);
        let refs: Vec<&[u8]> = ranges.iter().map(Vec::as_slice).collect();
        let mut out = vec![0u8; 32 * keys];
        g.throughput(Throughput::Elements(keys as u64));
        g.bench_function(format!("{keys}_keys"), |b| {
            b.iter(|| {
                e.extract_batch(black_box(&refs), 32, keys, &mut out)
                    .expect("lengths match");
                black_box(&out);
            })
        });
    }
    g.finish();
}

fn large_key(cr: &mut Criterion) {
    let mut g = cr.benchmark_group("large_key_1MiB");
    let m = 1 << 20;
    for (n, c) in [(3, 1), (10, 1)] {
        let e = Extractor::new(n, c).expect("valid");
        let ranges = random_ranges(n, e.block_len(m).expect("valid"));
        let refs: Vec<&[u8]> = ranges.iter().map(Vec::as_slice).collect();
        let mut out = vec![0u8; m];
        g.throughput(Throughput::Bytes(m as u64));
        g.bench_function(format!("n{n}_c{c}"), |b| {
            b.iter(|| {
                e.extract(black_box(&refs), &mut out)
                    .expect("lengths match");
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, batch_256bit, large_key);
criterion_main!(benches);
