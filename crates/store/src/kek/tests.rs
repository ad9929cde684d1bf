use super::*;

impl Kek {
    fn bytes(&self) -> [u8; KEK_LEN] {
        match &self.0 {
            Root::Bytes(b) => b.0,
            Root::Held(_) => panic!("a held KEK has no bytes"),
        }
    }
}

/// A stand-in device: HMAC in memory under a fixed key, counting its calls.
struct Device {
    key: ring::hmac::Key,
    calls: std::sync::atomic::AtomicUsize,
}

impl HeldKek for Device {
    fn hmac_sha256(&self, input: &[u8]) -> Result<Zeroizing<[u8; 32]>, StoreError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(ring::hmac::sign(&self.key, input).as_ref());
        Ok(out)
    }
    fn describe(&self) -> String {
        "test device".into()
    }
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

fn device(byte: u8) -> Arc<Device> {
    Arc::new(Device {
        key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &[byte; 32]),
        calls: Default::default(),
    })
}

/// A held KEK is asked once for the check key and once per epoch, not per seal or open;
/// another start with the same device opens everything, another device nothing.
#[test]
fn a_held_kek_derives_once_per_epoch() {
    let dev = device(1);
    let kek = Kek::held(dev.clone());
    assert_eq!(format!("{kek:?}"), "Kek(test device)");
    let calls = || dev.calls.load(std::sync::atomic::Ordering::SeqCst);
    let c = Cipher::with_seals_per_epoch(&kek, 50).unwrap();
    assert_eq!(calls(), 1, "the check key");
    let check = c.kek_check_value().unwrap();
    let sealed: Vec<_> = (0..100u8)
        .map(|i| c.seal(&[i; 32], b"aad").unwrap())
        .collect();
    assert_eq!(calls(), 3, "two epochs of 50 seals");
    for (i, (s, ct)) in sealed.iter().enumerate() {
        assert_eq!(c.open(s, ct, b"aad").unwrap().as_slice(), &[i as u8; 32]);
    }
    assert_eq!(calls(), 3, "opening uses the cached epoch keys");
    // Each epoch has a key of its own: a record moved to another epoch does not open.
    let (Sealing::Epoch { nonce, .. }, Sealing::Epoch { epoch, .. }) = (sealed[0].0, sealed[99].0)
    else {
        panic!("new seals use epoch keys")
    };
    let moved = Sealing::Epoch { epoch, nonce };
    assert!(c.open(&moved, &sealed[0].1, b"aad").is_none());

    let again = kek.cipher().unwrap();
    assert!(again.verify_kek_check(&check));
    for (s, ct) in &sealed {
        assert!(again.open(s, ct, b"aad").is_some());
    }
    assert_eq!(
        calls(),
        6,
        "a restart derives each old epoch once (and its check key)"
    );

    let other = Kek::held(device(2)).cipher().unwrap();
    assert!(!other.verify_kek_check(&check));
    assert!(other.open(&sealed[0].0, &sealed[0].1, b"aad").is_none());
    let file = Kek::from_bytes([1; 32]).cipher().unwrap();
    assert!(!file.verify_kek_check(&check));
    assert!(file.open(&sealed[0].0, &sealed[0].1, b"aad").is_none());
}

#[test]
fn file_round_trip_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek.hex");
    Kek::generate_file(&path, false).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 65);
    assert!(text.ends_with('\n'));
    assert!(text[..64]
        .bytes()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let a = Kek::load(&path).unwrap();
    let err = Kek::generate_file(&path, false).unwrap_err();
    assert!(matches!(err, StoreError::KekFileExists { .. }));
    assert!(err.to_string().contains("kek.hex"));
    Kek::generate_file(&path, true).unwrap();
    let b = Kek::load(&path).unwrap();
    assert_ne!(a.bytes(), b.bytes());
    assert_eq!(format!("{a:?}"), "Kek(<redacted>)");
}

#[test]
fn load_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let err = Kek::load(&missing).unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }));
    assert!(err.to_string().contains("missing"));

    let short = dir.path().join("short");
    write_private(&short, "abcd\n");
    assert!(matches!(
        Kek::load(&short).unwrap_err(),
        StoreError::KekFileInvalid { .. }
    ));

    let nonhex = dir.path().join("nonhex");
    write_private(&nonhex, &format!("{}\n", "g".repeat(64)));
    let err = Kek::load(&nonhex).unwrap_err();
    assert!(err.to_string().contains("non-hex"));

    let upper = dir.path().join("upper");
    write_private(&upper, &"AB".repeat(32));
    assert_eq!(Kek::load(&upper).unwrap().bytes(), [0xab; 32]);
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// A KEK file others may read (or change) is refused, naming the file and the fix.
#[cfg(unix)]
#[test]
fn generating_a_kek_makes_its_missing_folder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("data/site").join("KME_A.kek");
    Kek::generate_file(&path, false).expect("KEK in a new folder");
    assert!(Kek::load(&path).is_ok());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("folder")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}

#[test]
fn a_kek_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("site.kek");
    Kek::generate_file(&path, false).unwrap();
    for mode in [0o644, 0o640, 0o604, 0o620] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Kek::load(&path).unwrap_err();
        assert!(matches!(err, StoreError::KekFileExposed { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("site.kek"), "{text}");
        assert!(
            text.contains(&format!("chmod 600 {}", path.display())),
            "{text}"
        );
    }
    for mode in [0o600, 0o400] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        Kek::load(&path).unwrap();
    }
}

/// Nonces come from blocks of system randomness, never the same bytes twice, across
/// block boundaries too.
#[test]
fn nonces_never_repeat() {
    let c = Kek::from_bytes([7; 32]).cipher().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 * NONCES_PER_BLOCK + 5 {
        let (sealing, _) = c.seal(b"k", b"a").unwrap();
        let Sealing::Epoch { nonce, .. } = sealing else {
            panic!("new seals use epoch keys")
        };
        assert!(seen.insert(nonce), "nonce repeated");
    }
}

#[test]
fn seal_open_binds_aad() {
    let c = Kek::from_bytes([7; 32]).cipher().unwrap();
    let (s, ct) = c.seal(b"secret", b"aad-1").unwrap();
    assert_eq!(c.open(&s, &ct, b"aad-1").unwrap().as_slice(), b"secret");
    assert!(c.open(&s, &ct, b"aad-2").is_none());
    let other = Kek::from_bytes([8; 32]).cipher().unwrap();
    assert!(other.open(&s, &ct, b"aad-1").is_none());
}

/// A new epoch starts after the configured number of seals and at every start; what
/// was sealed in any epoch, or under the KEK itself, still opens, and an altered epoch
/// ID does not.
#[test]
fn epochs_change_and_every_epoch_still_opens() {
    let kek = Kek::from_bytes([7; 32]);
    let c = Cipher::with_seals_per_epoch(&kek, 3).unwrap();
    let sealed: Vec<_> = (0..7u8)
        .map(|i| (i, c.seal(&[i; 32], b"aad").unwrap()))
        .collect();
    let epoch = |s: &Sealing| match s {
        Sealing::Epoch { epoch, .. } => *epoch,
        Sealing::Kek { .. } => panic!("new seals use epoch keys"),
    };
    let epochs: Vec<_> = sealed.iter().map(|(_, (s, _))| epoch(s)).collect();
    assert!(epochs[..3].iter().all(|e| *e == epochs[0]));
    assert!(epochs[3..6].iter().all(|e| *e == epochs[3]));
    assert_ne!(epochs[0], epochs[3]);
    assert_ne!(epochs[3], epochs[6]);
    let old = c.seal_format_1(b"first format", b"aad").unwrap();
    // Another start of the same KEK: a new epoch, and everything opens.
    let again = kek.cipher().unwrap();
    assert!(!epochs.contains(&epoch(&again.seal(b"k", b"aad").unwrap().0)));
    for (i, (s, ct)) in &sealed {
        assert_eq!(again.open(s, ct, b"aad").unwrap().as_slice(), &[*i; 32]);
    }
    assert_eq!(
        again.open(&old.0, &old.1, b"aad").unwrap().as_slice(),
        b"first format"
    );
    let (s, ct) = &sealed[0].1;
    let Sealing::Epoch { mut epoch, nonce } = *s else {
        unreachable!()
    };
    epoch[0] ^= 1;
    assert!(again
        .open(&Sealing::Epoch { epoch, nonce }, ct, b"aad")
        .is_none());
}
