//! The stock on a paused clock: a set is handed out once, never stale, never the wrong size.

use zeroize::Zeroizing;

use super::*;

const NOW: u64 = 1_800_000_000;

fn readers() -> Vec<String> {
    vec!["B".to_owned()]
}

/// A set of three ranges of `len` bytes that expire at `expires_at`.
fn set(len: u64, expires_at: u64) -> Set {
    let allocation = |server: &str| Allocation {
        server_id: server.to_owned(),
        pool_id: [1; 16],
        offset: 0,
        len,
        expires_at,
        bytes: Zeroizing::new(vec![0xA5; len as usize]),
    };
    Set::new(vec![allocation("e1"), allocation("e2"), allocation("e3")])
}

/// A stock holding `set` for [`readers`], shelved the way a batch's restock shelves it.
fn stocked(set: Set) -> Stock {
    let stock = Stock::default();
    let need = set.len();
    assert!(stock.take(&readers(), need, NOW, |_| true).is_none());
    assert_eq!(
        stock.reserve(&readers()),
        Some(need.next_power_of_two().max(MIN_RANGE))
    );
    stock.put(&readers(), Some(set));
    stock
}

#[tokio::test(start_paused = true)]
async fn a_set_is_handed_out_once() {
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    let taken = stock
        .take(&readers(), 1000, NOW, |_| true)
        .expect("stocked");
    assert_eq!(taken.allocations.len(), 3);
    assert!(stock.take(&readers(), 1000, NOW, |_| true).is_none());
    // Nor to other readers.
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    assert!(stock.take(&["C".to_owned()], 100, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_close_to_its_expiry_is_dropped_not_used() {
    let stock = stocked(set(MIN_RANGE, NOW + MARGIN_SECS - 1));
    assert!(stock.take(&readers(), 1000, NOW, |_| true).is_none());
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    assert!(stock.take(&readers(), 1000, NOW + 300, |_| true).is_none());
    // Dropped: not there either once the clock would allow it again.
    assert!(stock.take(&readers(), 1000, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_held_too_long_is_dropped_not_used() {
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    tokio::time::advance(MAX_HOLD).await;
    assert!(stock.take(&readers(), 1000, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn a_set_from_a_failing_server_is_dropped_not_used() {
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    assert!(stock
        .take(&readers(), 1000, NOW, |a| a.server_id != "e2")
        .is_none());
    assert!(stock.take(&readers(), 1000, NOW, |_| true).is_none());
}

#[tokio::test(start_paused = true)]
async fn only_a_set_of_the_right_size_is_used() {
    let big = 4 * MIN_RANGE;
    let stock = stocked(set(big, NOW + 300));
    // Too short for the batch; more than four times what it needs.
    assert!(stock.take(&readers(), big + 1, NOW, |_| true).is_none());
    assert!(stock.take(&readers(), big / 4 - 1, NOW, |_| true).is_none());
    assert!(stock.take(&readers(), big / 4, NOW, |_| true).is_some());
    // Below MIN_RANGE any smaller batch may take a set.
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    assert!(stock.take(&readers(), 1, NOW, |_| true).is_some());
}

#[tokio::test(start_paused = true)]
async fn the_stock_stays_small() {
    let stock = stocked(set(MIN_RANGE, NOW + 300));
    for _ in 1..DEPTH {
        assert_eq!(stock.reserve(&readers()), Some(MIN_RANGE));
    }
    assert_eq!(stock.reserve(&readers()), None, "more than DEPTH sets");
    stock.put(&readers(), None);
    assert_eq!(stock.reserve(&readers()), Some(MIN_RANGE));
    // Batches too large to stock allocate for themselves.
    let _ = stock.take(&readers(), MAX_RANGE + 1, NOW, |_| true);
    stock.put(&readers(), None);
    assert_eq!(stock.reserve(&readers()), None);
}
