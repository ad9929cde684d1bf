use super::*;
use proptest::prelude::*;

fn sample() -> BatchMetadata {
    BatchMetadata {
        version: VERSION,
        n: 3,
        c: 1,
        ranges: (0..3u8)
            .map(|j| RangeRef {
                server_id: format!("es{j}"),
                pool_id: [j; 16],
                offset: 1000 * u64::from(j),
                len: 64,
            })
            .collect(),
        expires_at_unix: 1_800_000_000,
        keys: vec![
            KeyEntry {
                key_id: [0xA0; 16],
                size_bits: 256,
                block_offset: 0,
                confirm: [0x11; 16],
            },
            KeyEntry {
                key_id: [0xA1; 16],
                size_bits: 256,
                block_offset: 32,
                confirm: [0x22; 16],
            },
        ],
    }
}

/// Random valid metadata: distinct servers and key IDs, disjoint blocks that fit.
fn arb_meta() -> impl Strategy<Value = BatchMetadata> {
    (2u8..=6)
        .prop_flat_map(|n| (Just(n), 0..n))
        .prop_flat_map(|(n, c)| {
            (
                Just(n),
                Just(c),
                proptest::collection::vec(
                    ("[a-z0-9.-]{1,20}", any::<[u8; 16]>(), any::<u64>()),
                    n as usize,
                ),
                any::<u64>(),
                proptest::collection::vec(
                    (1u32..=100, 0u64..5, any::<[u8; 12]>(), any::<[u8; 16]>()),
                    1..8,
                ),
                0u64..10,
            )
        })
        .prop_map(|(n, c, servers, expires_at_unix, keys, slack)| {
            let mut pos = 0u64;
            let keys: Vec<KeyEntry> = keys
                .into_iter()
                .enumerate()
                .map(|(i, (bytes, gap, id_tail, confirm))| {
                    let l = key_block_len(bytes as usize, n, c).expect("valid") as u64;
                    let block_offset = pos + gap;
                    pos = block_offset + l;
                    let mut key_id = [0u8; 16];
                    key_id[..4].copy_from_slice(&(i as u32).to_be_bytes());
                    key_id[4..].copy_from_slice(&id_tail);
                    KeyEntry {
                        key_id,
                        size_bits: bytes * 8,
                        block_offset,
                        confirm,
                    }
                })
                .collect();
            let ranges = servers
                .into_iter()
                .enumerate()
                .map(|(j, (name, pool_id, offset))| RangeRef {
                    server_id: format!("{j}{name}"),
                    pool_id,
                    offset: offset / 2,
                    len: pos + slack,
                })
                .collect();
            BatchMetadata {
                version: VERSION,
                n,
                c,
                ranges,
                expires_at_unix,
                keys,
            }
        })
}

#[test]
fn golden_encoding() {
    let bytes = sample().encode().expect("valid");
    let mut expected = vec![2u8, 3, 1];
    expected.extend_from_slice(&1_800_000_000u64.to_be_bytes());
    for j in 0..3u8 {
        expected.extend_from_slice(&[3, b'e', b's', b'0' + j]);
        expected.extend_from_slice(&[j; 16]);
        expected.extend_from_slice(&(1000 * u64::from(j)).to_be_bytes());
        expected.extend_from_slice(&64u64.to_be_bytes());
    }
    expected.extend_from_slice(&[0, 0, 0, 2]);
    expected.extend_from_slice(&[0xA0; 16]);
    expected.extend_from_slice(&[0, 0, 1, 0]);
    expected.extend_from_slice(&0u64.to_be_bytes());
    expected.extend_from_slice(&[0x11; 16]);
    expected.extend_from_slice(&[0xA1; 16]);
    expected.extend_from_slice(&[0, 0, 1, 0]);
    expected.extend_from_slice(&32u64.to_be_bytes());
    expected.extend_from_slice(&[0x22; 16]);
    assert_eq!(bytes, expected);
    assert_eq!(decode(&bytes), Ok(sample()));
    // (32 key bytes + 32 tag-key bytes) / (n − c = 2).
    assert_eq!(sample().block_len(1), Some(32));
    assert_eq!(sample().block_len(2), None);
}

#[test]
fn every_strict_prefix_fails() {
    let bytes = sample().encode().expect("valid");
    for cut in 0..bytes.len() {
        assert!(
            decode(&bytes[..cut]).is_err(),
            "prefix of {cut} bytes decoded"
        );
    }
}

#[test]
fn trailing_bytes_rejected() {
    let mut bytes = sample().encode().expect("valid");
    bytes.push(0);
    assert_eq!(decode(&bytes), Err(MetadataError::TrailingBytes));
}

#[test]
fn header_errors() {
    let good = sample().encode().expect("valid");
    let mut b = good.clone();
    b[0] = 3;
    assert_eq!(decode(&b), Err(MetadataError::UnsupportedVersion(3)));
    let mut b = good.clone();
    b[0] = 0;
    assert_eq!(decode(&b), Err(MetadataError::UnsupportedVersion(0)));
    let mut b = good.clone();
    b[1] = 1;
    b[2] = 0;
    assert_eq!(decode(&b), Err(MetadataError::BadParameters { n: 1, c: 0 }));
    let mut b = good.clone();
    b[2] = 3;
    assert_eq!(decode(&b), Err(MetadataError::BadParameters { n: 3, c: 3 }));
    let mut b = good.clone();
    b[1] = 0;
    assert_eq!(decode(&b), Err(MetadataError::BadParameters { n: 0, c: 1 }));
    // First server id byte -> invalid UTF-8.
    let mut b = good.clone();
    b[12] = 0xFF;
    assert_eq!(decode(&b), Err(MetadataError::InvalidUtf8));
    let mut b = good;
    b[11] = 0;
    assert_eq!(decode(&b), Err(MetadataError::ServerIdLength(0)));
}

#[test]
fn huge_key_count_is_rejected_without_allocating() {
    let good = sample().encode().expect("valid");
    // Key count sits right after the three ranges (3 * (1 + 3 + 32) bytes).
    let at = 11 + 3 * 36;
    let mut b = good[..at].to_vec();
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&b), Err(MetadataError::KeyCount(u32::MAX as usize)));
    let mut b = good[..at].to_vec();
    b.extend_from_slice(&(MAX_KEYS as u32).to_be_bytes());
    assert_eq!(decode(&b), Err(MetadataError::Truncated));
}

#[test]
fn semantic_errors() {
    let mut m = sample();
    m.keys[1].block_offset = 33;
    assert_eq!(
        m.encode(),
        Err(MetadataError::RangeOutOfBounds { key: 1, range: 0 })
    );
    let mut m = sample();
    m.keys[1].block_offset = u64::MAX;
    assert_eq!(
        m.encode(),
        Err(MetadataError::RangeOutOfBounds { key: 1, range: 0 })
    );
    let mut m = sample();
    m.keys[1].block_offset = 31;
    assert!(matches!(
        m.encode(),
        Err(MetadataError::OverlappingBlocks { .. })
    ));
    let mut m = sample();
    m.keys[1].key_id = m.keys[0].key_id;
    assert_eq!(m.encode(), Err(MetadataError::DuplicateKeyId { index: 1 }));
    let mut m = sample();
    m.keys[0].size_bits = 12;
    assert_eq!(
        m.encode(),
        Err(MetadataError::BadKeySize {
            index: 0,
            size_bits: 12
        })
    );
    let mut m = sample();
    m.keys[0].size_bits = 0;
    assert!(matches!(m.encode(), Err(MetadataError::BadKeySize { .. })));
    let mut m = sample();
    m.keys[0].size_bits = u32::MAX - 7;
    assert!(matches!(m.encode(), Err(MetadataError::BadKeySize { .. })));
    let mut m = sample();
    m.keys.clear();
    assert_eq!(m.encode(), Err(MetadataError::KeyCount(0)));
    let mut m = sample();
    m.ranges.pop();
    assert_eq!(
        m.encode(),
        Err(MetadataError::RangeCount {
            expected: 3,
            got: 2
        })
    );
    let mut m = sample();
    m.ranges[2].server_id = "es0".into();
    assert_eq!(m.encode(), Err(MetadataError::DuplicateServer { index: 2 }));
    let mut m = sample();
    m.ranges[0].server_id = "x".repeat(65);
    assert_eq!(m.encode(), Err(MetadataError::ServerIdLength(65)));
    let mut m = sample();
    m.ranges[0].offset = u64::MAX;
    assert_eq!(m.encode(), Err(MetadataError::RangeOverflow { index: 0 }));
    let mut m = sample();
    m.version = 0;
    assert_eq!(m.encode(), Err(MetadataError::UnsupportedVersion(0)));
    let mut m = sample();
    m.version = RETIRED_VERSION;
    assert_eq!(m.encode(), Err(MetadataError::RetiredVersion(1)));
    let mut m = sample();
    m.n = 1;
    m.c = 0;
    m.ranges.truncate(1);
    assert_eq!(m.encode(), Err(MetadataError::BadParameters { n: 1, c: 0 }));
}

/// Version-1 metadata, as an older dqkd wrote it: the same layout with version byte 1 and
/// blocks of `ceil(m / (n − c))` bytes. It is refused with a message that names the cause.
#[test]
fn version_1_is_refused_clearly() {
    let mut v1 = vec![1u8, 3, 1];
    v1.extend_from_slice(&1_800_000_000u64.to_be_bytes());
    for j in 0..3u8 {
        v1.extend_from_slice(&[3, b'e', b's', b'0' + j]);
        v1.extend_from_slice(&[j; 16]);
        v1.extend_from_slice(&0u64.to_be_bytes());
        v1.extend_from_slice(&16u64.to_be_bytes());
    }
    v1.extend_from_slice(&[0, 0, 0, 1]);
    v1.extend_from_slice(&[0xA0; 16]);
    v1.extend_from_slice(&[0, 0, 1, 0]);
    v1.extend_from_slice(&0u64.to_be_bytes());
    v1.extend_from_slice(&[0x11; 16]);
    let err = decode(&v1).expect_err("version 1 is retired");
    assert_eq!(err, MetadataError::RetiredVersion(1));
    assert!(err.to_string().contains("older dqkd"), "{err}");
}

proptest! {
    #[test]
    fn round_trip(m in arb_meta()) {
        let bytes = m.encode().expect("generated metadata is valid");
        prop_assert_eq!(decode(&bytes), Ok(m));
    }

    #[test]
    fn prefixes_of_random_valid_metadata_fail(m in arb_meta(), cut in any::<prop::sample::Index>()) {
        let bytes = m.encode().expect("generated metadata is valid");
        let cut = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..cut]).is_err());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(d) = decode(&bytes) {
            prop_assert_eq!(d.encode().expect("decoded is valid"), bytes);
        }
    }

    /// Arbitrary bytes behind a plausible header (version 2, small n and c, a short first
    /// server ID), so that the search reaches the ranges, the key count and the entries.
    #[test]
    fn arbitrary_bytes_after_a_valid_header(
        n in 2u8..=4,
        c in 0u8..=3,
        body in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut bytes = vec![VERSION, n, c % n];
        bytes.extend_from_slice(&body);
        match decode(&bytes) {
            Ok(d) => {
                prop_assert!(d.validate().is_ok());
                prop_assert_eq!(d.encode().expect("decoded is valid"), bytes);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn mutated_valid_bytes_never_panic(
        m in arb_meta(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = m.encode().expect("generated metadata is valid");
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        if let Ok(d) = decode(&bytes) {
            // Anything that decodes must be valid and re-encode to the same bytes.
            prop_assert_eq!(d.encode().expect("decoded is valid"), bytes);
        }
    }
}
