//! The write-ahead log of [`crate::EmbeddedStore`].
//!
//! Each batch appends its changes (sealed records and deletions, never key bytes in clear)
//! to this log with one `fdatasync`, applies them to the in-memory overlay (see `overlay`),
//! and only then answers. About once a second the writer freezes the overlay and *rotates*
//! the log: the current file becomes `<log>.prev` and new records go to a fresh file, while
//! a checkpoint thread writes the frozen changes to redb in one durable commit that also
//! records the sequence number of their last record. Then `<log>.prev` is kept as
//! `<log>.spare`, and the next rotation continues in it. After a crash redb is back at its
//! last checkpoint, and the records after it (in `<log>.prev`, then `<log>`) are applied
//! again at open: each change is a put or a delete of a whole record, so applying one twice
//! is harmless.
//!
//! Why files are reused: appending to a file changes its size, and then every `fdatasync`
//! must also write the inode, a second device round trip on the path of every answer.
//! Overwriting blocks a file already has needs only the data written. A reused file still
//! holds its older records after the new ones; they are all covered by a checkpoint, and
//! reading stops at them because sequence numbers within a file must follow one another.
//!
//! Record layout (integers big-endian):
//!
//! ```text
//! u32  payload length
//! [8]  first 8 bytes of SHA-256(seq ‖ payload)
//! u64  seq (one more than the previous record's)
//! payload: u32 change count, then per change a tag and its fields (see `Change`)
//! ```
//!
//! A record is acknowledged only after `fdatasync` returned, so only the unacknowledged tail
//! can be incomplete: reading stops at the first record that is short, fails its check, or
//! does not follow the one before it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::StoreError;

/// One change to a table, as applied in a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    /// Keys table: write the encoded record of a key ID.
    PutKey(u128, Vec<u8>),
    /// Keys table: delete a key ID.
    DelKey(u128),
    /// Ready-key table: write the value at (link, position).
    PutReady(String, u64, Vec<u8>),
    /// Ready-key table: delete (link, position).
    DelReady(String, u64),
    /// In-flight table: write the encoded record of a request ID.
    PutInFlight(u128, Vec<u8>),
    /// In-flight table: delete a request ID.
    DelInFlight(u128),
}

const PUT_KEY: u8 = 1;
const DEL_KEY: u8 = 2;
const PUT_READY: u8 = 3;
const DEL_READY: u8 = 4;
const PUT_IN_FLIGHT: u8 = 5;
const DEL_IN_FLIGHT: u8 = 6;
const HEADER: usize = 4 + 8 + 8;

/// A checkpointed file larger than this is deleted rather than kept for reuse, so a burst
/// (the writer lets the log grow while a slow checkpoint runs) does not pin its disk space.
const SPARE_MAX_BYTES: u64 = 128 << 20;

/// The open log. Records are written at `bytes`, which may be short of the file's length
/// when the file is a reused one.
pub(crate) struct Wal {
    file: File,
    path: PathBuf,
    /// Sequence number of the next record.
    next_seq: u64,
    /// Bytes of records in the current file: where the next one goes.
    bytes: u64,
}

/// Records read back at open, in order, with their sequence numbers.
pub(crate) type Recovered = Vec<(u64, Vec<Change>)>;

impl Wal {
    /// Opens (creating if needed) the log at `path` and reads every complete record of
    /// `<path>.prev` (left by a checkpoint that a crash interrupted), then of `path`.
    /// An incomplete tail (never acknowledged) is cut off.
    pub(crate) fn open(path: &Path) -> Result<(Wal, Recovered), StoreError> {
        let io = |what: &str, at: &Path| {
            let context = format!("{what} {}", at.display());
            move |e| StoreError::io(context, e)
        };
        let previous = previous_path(path);
        let mut records = match std::fs::read(&previous) {
            Ok(data) => parse(&data).0,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("reading the previous write-ahead log", &previous)(e)),
        };
        let mut file = open_for_writing(path).map_err(io("opening the write-ahead log", path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data)
            .map_err(io("reading the write-ahead log", path))?;
        let (current, valid) = parse(&data);
        if valid < data.len() {
            if parse_one(&data[valid..]).is_some() {
                // An intact record that does not follow: the file was reused, and this is
                // where its earlier (checkpointed) records begin.
                tracing::debug!(
                    path = %path.display(),
                    dropped_bytes = data.len() - valid,
                    "cutting off the checkpointed records of a reused write-ahead log"
                );
            } else {
                tracing::warn!(
                    path = %path.display(),
                    dropped_bytes = data.len() - valid,
                    "write-ahead log ends in an incomplete record (never acknowledged); cutting it off"
                );
            }
            file.set_len(valid as u64)
                .map_err(io("truncating the write-ahead log", path))?;
            file.sync_all()
                .map_err(io("syncing the write-ahead log", path))?;
        }
        records.extend(current);
        let next_seq = records.last().map_or(1, |(seq, _)| seq + 1);
        Ok((
            Wal {
                file,
                path: path.to_owned(),
                next_seq,
                bytes: valid as u64,
            },
            records,
        ))
    }

    /// Where the log lives.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written since the log last started over.
    pub(crate) fn len(&self) -> u64 {
        self.bytes
    }

    /// The sequence number the next record will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Makes the next record's sequence number at least `seq` (after a checkpoint recorded
    /// a later one than the log holds).
    pub(crate) fn skip_to(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// Appends one record and waits until it is on disk; returns its sequence number.
    /// After an error the log may end in a partial record: the caller must stop writing.
    #[cfg(test)]
    pub(crate) fn append(&mut self, changes: &[Change]) -> std::io::Result<u64> {
        let mut batch = Batch::default();
        for change in changes {
            batch.push(change)?;
        }
        self.append_batch(&mut batch)
    }

    /// Appends `batch` as one record and waits until it is on disk; returns its sequence
    /// number. After an error the log may end in a partial record: the caller must stop
    /// writing.
    pub(crate) fn append_batch(&mut self, batch: &mut Batch) -> std::io::Result<u64> {
        let seq = self.next_seq;
        let record = batch.seal(seq)?;
        self.file.write_all_at(record, self.bytes)?;
        self.file.sync_data()?;
        self.next_seq += 1;
        self.bytes += record.len() as u64;
        Ok(seq)
    }

    /// Moves the current file aside to `<log>.prev` and continues in `<log>.spare` (an
    /// older file whose records a checkpoint covers) or else in a new, empty file, so a
    /// checkpoint of everything logged so far can run while new records arrive.
    ///
    /// The directory is synced after each rename: a file system that does not order
    /// renames must not be left, after a crash, with the spare named as the log and the
    /// log's acknowledged records under no name at all.
    pub(crate) fn rotate(&mut self) -> std::io::Result<()> {
        std::fs::rename(&self.path, previous_path(&self.path))?;
        sync_directory(&self.path)?;
        match std::fs::rename(spare_path(&self.path), &self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.file = open_for_writing(&self.path)?;
        sync_directory(&self.path)?;
        self.bytes = 0;
        Ok(())
    }

    /// Keeps `<log>.prev` as `<log>.spare` for the next rotation once a durable commit
    /// covers every record in it (or deletes it, when it grew past [`SPARE_MAX_BYTES`]).
    /// A crash that forgets the rename leaves a `.prev` whose records recovery skips.
    pub(crate) fn discard_previous(&self) -> std::io::Result<()> {
        let previous = previous_path(&self.path);
        let size = match std::fs::metadata(&previous) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        if size > SPARE_MAX_BYTES {
            std::fs::remove_file(&previous)
        } else {
            std::fs::rename(&previous, spare_path(&self.path))
        }
    }

    /// Empties the log (and deletes `<log>.prev`) once a checkpoint made every record
    /// redundant.
    pub(crate) fn start_over(&mut self) -> std::io::Result<()> {
        self.file.set_len(0)?;
        self.file.sync_all()?;
        self.bytes = 0;
        self.discard_previous()
    }
}

/// Where a rotated log waits for its checkpoint: the log's name with `.prev` added.
pub(crate) fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

/// Where a checkpointed log file waits to be reused: the log's name with `.spare` added.
pub(crate) fn spare_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".spare");
    PathBuf::from(name)
}

/// Opens (creating if needed, readable by this user only) a log file for reading and for
/// writing at chosen offsets.
fn open_for_writing(path: &Path) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// Makes renames and creations in the directory of `path` durable.
fn sync_directory(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

/// The changes of one batch, encoded as they are made (no copy of each record is kept
/// apart), with room in front for the record header.
pub(crate) struct Batch {
    buf: Vec<u8>,
    count: u32,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            buf: vec![0; HEADER + 4],
            count: 0,
        }
    }
}

impl Batch {
    /// Whether no change was recorded.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let len =
            u32::try_from(bytes.len()).map_err(|_| std::io::Error::other("change too large"))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn counted(&mut self) -> std::io::Result<()> {
        self.count = self
            .count
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("too many changes"))?;
        Ok(())
    }

    /// Keys table: write the encoded record of a key ID.
    pub(crate) fn put_key(&mut self, id: u128, value: &[u8]) -> std::io::Result<()> {
        self.buf.push(PUT_KEY);
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.bytes(value)?;
        self.counted()
    }

    /// Keys table: delete a key ID.
    pub(crate) fn del_key(&mut self, id: u128) -> std::io::Result<()> {
        self.buf.push(DEL_KEY);
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.counted()
    }

    /// Ready-key table: write the value at (link, position).
    pub(crate) fn put_ready(&mut self, link: &str, pos: u64, value: &[u8]) -> std::io::Result<()> {
        self.buf.push(PUT_READY);
        self.bytes(link.as_bytes())?;
        self.buf.extend_from_slice(&pos.to_be_bytes());
        self.bytes(value)?;
        self.counted()
    }

    /// Ready-key table: delete (link, position).
    pub(crate) fn del_ready(&mut self, link: &str, pos: u64) -> std::io::Result<()> {
        self.buf.push(DEL_READY);
        self.bytes(link.as_bytes())?;
        self.buf.extend_from_slice(&pos.to_be_bytes());
        self.counted()
    }

    /// In-flight table: write the encoded record of a request ID.
    pub(crate) fn put_in_flight(&mut self, id: u128, value: &[u8]) -> std::io::Result<()> {
        self.buf.push(PUT_IN_FLIGHT);
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.bytes(value)?;
        self.counted()
    }

    /// In-flight table: delete a request ID.
    pub(crate) fn del_in_flight(&mut self, id: u128) -> std::io::Result<()> {
        self.buf.push(DEL_IN_FLIGHT);
        self.buf.extend_from_slice(&id.to_be_bytes());
        self.counted()
    }

    #[cfg(test)]
    fn push(&mut self, change: &Change) -> std::io::Result<()> {
        match change {
            Change::PutKey(id, value) => self.put_key(*id, value),
            Change::DelKey(id) => self.del_key(*id),
            Change::PutReady(link, pos, value) => self.put_ready(link, *pos, value),
            Change::DelReady(link, pos) => self.del_ready(link, *pos),
            Change::PutInFlight(id, value) => self.put_in_flight(*id, value),
            Change::DelInFlight(id) => self.del_in_flight(*id),
        }
    }

    /// Fills in the header for sequence number `seq`; the whole record.
    fn seal(&mut self, seq: u64) -> std::io::Result<&[u8]> {
        self.buf[HEADER..HEADER + 4].copy_from_slice(&self.count.to_be_bytes());
        let payload = &self.buf[HEADER..];
        let len =
            u32::try_from(payload.len()).map_err(|_| std::io::Error::other("batch too large"))?;
        let sum = checksum(seq, payload);
        self.buf[..4].copy_from_slice(&len.to_be_bytes());
        self.buf[4..12].copy_from_slice(&sum);
        self.buf[12..HEADER].copy_from_slice(&seq.to_be_bytes());
        Ok(&self.buf)
    }
}

fn checksum(seq: u64, payload: &[u8]) -> [u8; 8] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&seq.to_be_bytes());
    ctx.update(payload);
    let digest = ctx.finish();
    let mut out = [0; 8];
    out.copy_from_slice(&digest.as_ref()[..8]);
    out
}

/// Every complete, intact record of `data` that follows the one before it, and the length
/// they cover.
fn parse(data: &[u8]) -> (Recovered, usize) {
    let mut records: Recovered = Vec::new();
    let mut at = 0;
    while let Some((seq, changes, used)) = parse_one(&data[at..]) {
        if records.last().is_some_and(|(last, _)| seq != last + 1) {
            break;
        }
        records.push((seq, changes));
        at += used;
    }
    (records, at)
}

fn parse_one(data: &[u8]) -> Option<(u64, Vec<Change>, usize)> {
    let header = data.get(..HEADER)?;
    let len = u32::from_be_bytes(header[..4].try_into().ok()?) as usize;
    let sum: [u8; 8] = header[4..12].try_into().ok()?;
    let seq = u64::from_be_bytes(header[12..20].try_into().ok()?);
    let payload = data.get(HEADER..HEADER.checked_add(len)?)?;
    if checksum(seq, payload) != sum {
        return None;
    }
    let changes = decode(payload)?;
    Some((seq, changes, HEADER + len))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_be_bytes(self.take(16)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let len = self.u32()? as usize;
        Some(self.take(len)?.to_vec())
    }
    fn text(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?).ok()
    }
}

fn decode(payload: &[u8]) -> Option<Vec<Change>> {
    let mut r = Reader(payload);
    let count = r.u32()? as usize;
    // Every change takes at least 9 bytes: a corrupt count cannot make us allocate much.
    let mut changes = Vec::with_capacity(count.min(payload.len() / 9));
    for _ in 0..count {
        changes.push(match r.u8()? {
            PUT_KEY => Change::PutKey(r.u128()?, r.bytes()?),
            DEL_KEY => Change::DelKey(r.u128()?),
            PUT_READY => Change::PutReady(r.text()?, r.u64()?, r.bytes()?),
            DEL_READY => Change::DelReady(r.text()?, r.u64()?),
            PUT_IN_FLIGHT => Change::PutInFlight(r.u128()?, r.bytes()?),
            DEL_IN_FLIGHT => Change::DelInFlight(r.u128()?),
            _ => return None,
        });
    }
    r.0.is_empty().then_some(changes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> Vec<Change> {
        vec![
            Change::PutKey(7, vec![1, 2, 3]),
            Change::DelKey(8),
            Change::PutReady("A>B".into(), 42, vec![9; 40]),
            Change::DelReady("A>B".into(), 41),
            Change::PutInFlight(9, vec![1; 20]),
            Change::DelInFlight(10),
        ]
    }

    #[test]
    fn records_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (mut wal, got) = Wal::open(&path).unwrap();
            assert!(got.is_empty());
            assert_eq!(wal.append(&sample()).unwrap(), 1);
            assert_eq!(wal.append(&[Change::DelKey(1)]).unwrap(), 2);
        }
        let (wal, got) = Wal::open(&path).unwrap();
        assert_eq!(got, vec![(1, sample()), (2, vec![Change::DelKey(1)])]);
        assert_eq!(wal.next_seq(), 3);
    }

    #[test]
    fn an_incomplete_or_damaged_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (mut wal, _) = Wal::open(&path).unwrap();
            wal.append(&sample()).unwrap();
            wal.append(&sample()).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let one = full.len() / 2;
        for cut in [full.len() - 1, one + 5, one + HEADER + 3] {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (mut wal, got) = Wal::open(&path).unwrap();
            assert_eq!(got, vec![(1, sample())], "cut at {cut}");
            assert_eq!(std::fs::metadata(&path).unwrap().len(), one as u64);
            // Appending after the cut continues the sequence.
            assert_eq!(wal.append(&[Change::DelKey(5)]).unwrap(), 2);
        }
        let mut flipped = full.clone();
        flipped[one + HEADER + 6] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        let (_, got) = Wal::open(&path).unwrap();
        assert_eq!(got.len(), 1, "a record failing its checksum ends the log");
    }

    #[test]
    fn starting_over_keeps_the_sequence() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        wal.append(&sample()).unwrap();
        wal.start_over().unwrap();
        assert_eq!(wal.len(), 0);
        assert_eq!(wal.append(&sample()).unwrap(), 2);
        drop(wal);
        let (_, got) = Wal::open(&path).unwrap();
        assert_eq!(got, vec![(2, sample())]);
    }

    /// Rotating into the spare overwrites it from the start without shortening it; at
    /// open, reading stops where the old records begin.
    #[test]
    fn a_reused_file_is_overwritten_and_its_old_records_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut wal, _) = Wal::open(&path).unwrap();
        for _ in 0..3 {
            wal.append(&sample()).unwrap();
        }
        let three = std::fs::metadata(&path).unwrap().len();
        wal.rotate().unwrap();
        wal.append(&sample()).unwrap(); // 4
        wal.discard_previous().unwrap();
        assert!(spare_path(&path).exists() && !previous_path(&path).exists());
        wal.rotate().unwrap(); // the file holding 1..=3 is the log again
        assert!(!spare_path(&path).exists());
        assert_eq!(wal.append(&sample()).unwrap(), 5);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            three,
            "written over, not appended"
        );
        drop(wal);
        let (wal, got) = Wal::open(&path).unwrap();
        assert_eq!(got, vec![(4, sample()), (5, sample())]);
        assert_eq!(wal.next_seq(), 6);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), three / 3);
    }

    #[test]
    fn a_rotated_log_is_read_before_the_current_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        {
            let (mut wal, _) = Wal::open(&path).unwrap();
            wal.append(&sample()).unwrap();
            wal.rotate().unwrap();
            assert_eq!(wal.len(), 0);
            assert_eq!(wal.append(&[Change::DelKey(3)]).unwrap(), 2);
        }
        assert!(previous_path(&path).exists());
        let (wal, got) = Wal::open(&path).unwrap();
        assert_eq!(got, vec![(1, sample()), (2, vec![Change::DelKey(3)])]);
        wal.discard_previous().unwrap();
        drop(wal);
        let (_, got) = Wal::open(&path).unwrap();
        assert_eq!(got, vec![(2, vec![Change::DelKey(3)])]);
    }
}
