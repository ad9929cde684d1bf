//! Records of cross-site requests a site has sent and not yet answered (see
//! [`crate::InFlight`]), and their encoding in the embedded store.

use uuid::Uuid;

use crate::InFlight;

/// Encoding version of an in-flight record.
const VERSION: u8 = 1;

/// The record's bytes (its request ID is the table key, not part of them).
pub(crate) fn encode(record: &InFlight) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        16 + record.owner.len() + 16 * record.key_ids.len() + 8 * record.ready.len(),
    );
    out.push(VERSION);
    put_text(&mut out, &record.owner);
    put_len(&mut out, record.sites.len());
    for site in &record.sites {
        put_text(&mut out, site);
    }
    put_len(&mut out, record.key_ids.len());
    for id in &record.key_ids {
        out.extend_from_slice(id.as_bytes());
    }
    put_len(&mut out, record.ready.len());
    for seq in &record.ready {
        out.extend_from_slice(&seq.to_be_bytes());
    }
    out
}

/// The record stored under `request_id`, or `None` if `bytes` are not one.
pub(crate) fn decode(request_id: Uuid, bytes: &[u8]) -> Option<InFlight> {
    let mut r = Reader(bytes);
    if r.take(1)? != [VERSION] {
        return None;
    }
    let owner = r.text()?;
    let sites = (0..r.len()?).map(|_| r.text()).collect::<Option<_>>()?;
    let key_ids = (0..r.len()?)
        .map(|_| Uuid::from_slice(r.take(16)?).ok())
        .collect::<Option<_>>()?;
    let ready = (0..r.len()?)
        .map(|_| Some(u64::from_be_bytes(r.take(8)?.try_into().ok()?)))
        .collect::<Option<_>>()?;
    r.0.is_empty().then_some(InFlight {
        request_id,
        owner,
        sites,
        key_ids,
        ready,
    })
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by request sizes far below 2^32.
    out.extend_from_slice(&(len.min(u32::MAX as usize) as u32).to_be_bytes());
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_len(out, text.len());
    out.extend_from_slice(text.as_bytes());
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn len(&mut self) -> Option<usize> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().ok()?) as usize;
        // Every element takes at least 4 bytes: a corrupt length cannot make us allocate much.
        (len <= self.0.len()).then_some(len)
    }
    fn text(&mut self) -> Option<String> {
        let len = self.len()?;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn records_read_back_and_damage_is_refused() {
        let record = InFlight {
            request_id: Uuid::new_v4(),
            owner: "a1".into(),
            sites: vec!["KME_B".into(), "KME_C".into()],
            key_ids: vec![Uuid::new_v4(), Uuid::new_v4()],
            ready: vec![7, u64::MAX],
        };
        let bytes = encode(&record);
        assert_eq!(decode(record.request_id, &bytes), Some(record.clone()));
        assert_eq!(decode(record.request_id, &bytes[..bytes.len() - 1]), None);
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(record.request_id, &longer), None);
        let empty = InFlight {
            request_id: Uuid::new_v4(),
            owner: String::new(),
            sites: vec![],
            key_ids: vec![],
            ready: vec![],
        };
        assert_eq!(decode(empty.request_id, &encode(&empty)), Some(empty));
    }
}
