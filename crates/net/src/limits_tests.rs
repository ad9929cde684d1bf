use super::*;

fn admitted(admission: Admission) -> (u64, Arc<ConnState>, Option<Arc<ConnState>>) {
    match admission {
        Admission::Admitted { id, state, evicted } => (id, state, evicted),
        Admission::Refused => panic!("refused"),
    }
}

#[test]
fn below_the_cap_nothing_is_evicted() {
    let mut table = Table::new(3);
    for now in 0..3 {
        let (_, _, evicted) = admitted(table.admit(now));
        assert!(evicted.is_none());
    }
    assert_eq!(table.len(), 3);
}

#[test]
fn at_the_cap_the_longest_idle_connection_is_evicted() {
    let mut table = Table::new(3);
    let (_, first, _) = admitted(table.admit(0));
    let (_, second, _) = admitted(table.admit(10));
    let (_, third, _) = admitted(table.admit(20));
    // The first connection was active after the others: the second is now the oldest.
    first.last_active_ms.store(30, Ordering::Release);
    let (_, _, evicted) = admitted(table.admit(40));
    let evicted = evicted.expect("someone makes room");
    assert!(Arc::ptr_eq(&evicted, &second));
    assert_eq!(table.len(), 3);
    // Next in line: the third (20), not the first (30).
    let (_, _, evicted) = admitted(table.admit(50));
    assert!(Arc::ptr_eq(&evicted.expect("room"), &third));
}

#[test]
fn a_flood_of_new_connections_evicts_itself_before_served_ones() {
    let mut table = Table::new(3);
    // An SAE's kept-alive connection, idle since long ago but once used.
    let (_, sae, _) = admitted(table.admit(0));
    sae.served.store(true, Ordering::Release);
    let (_, _, _) = admitted(table.admit(100));
    let (_, _, _) = admitted(table.admit(200));
    // New connections that never send a request keep arriving: they replace each other.
    for now in 300..400 {
        let (_, _, evicted) = admitted(table.admit(now));
        assert!(!Arc::ptr_eq(&evicted.expect("room"), &sae), "at {now}");
    }
    assert_eq!(table.len(), 3);
}

#[test]
fn a_connection_with_a_request_in_flight_is_never_evicted() {
    let mut table = Table::new(2);
    let (_, busy, _) = admitted(table.admit(0));
    let (_, idle, _) = admitted(table.admit(5));
    busy.in_flight.store(1, Ordering::Release);
    let (_, _, evicted) = admitted(table.admit(10));
    assert!(Arc::ptr_eq(&evicted.expect("room"), &idle));
}

#[test]
fn a_full_table_of_busy_connections_refuses() {
    let mut table = Table::new(2);
    let (a, first, _) = admitted(table.admit(0));
    let (_, second, _) = admitted(table.admit(1));
    first.in_flight.store(1, Ordering::Release);
    second.in_flight.store(2, Ordering::Release);
    assert!(matches!(table.admit(2), Admission::Refused));
    assert_eq!(table.len(), 2);
    // Once one closes, there is room again without evicting anyone.
    table.remove(a);
    let (_, _, evicted) = admitted(table.admit(3));
    assert!(evicted.is_none());
}

#[test]
fn removing_an_evicted_connection_is_harmless() {
    let mut table = Table::new(1);
    let (old, _, _) = admitted(table.admit(0));
    let (new, _, evicted) = admitted(table.admit(1));
    assert!(evicted.is_some());
    table.remove(old);
    assert_eq!(table.len(), 1, "the new connection stays");
    table.remove(new);
    assert_eq!(table.len(), 0);
}

#[test]
fn log_lines_are_at_most_one_a_second_with_a_count() {
    let mut log = LogLimiter::default();
    assert_eq!(log.event(0), Some(1));
    assert_eq!(log.event(10), None);
    assert_eq!(log.event(999), None);
    assert_eq!(log.event(1000), Some(3));
    assert_eq!(log.event(5000), Some(1));
}

#[test]
fn limits_of_zero_are_refused_by_name() {
    assert!(ServerLimits::default().check().is_ok());
    for (limits, key) in [
        (
            ServerLimits {
                max_connections: 0,
                ..ServerLimits::default()
            },
            "connections.max_connections",
        ),
        (
            ServerLimits {
                handshake_timeout_ms: 0,
                ..ServerLimits::default()
            },
            "connections.handshake_timeout_ms",
        ),
        (
            ServerLimits {
                idle_timeout_ms: 0,
                ..ServerLimits::default()
            },
            "connections.idle_timeout_ms",
        ),
        (
            ServerLimits {
                header_timeout_ms: 0,
                ..ServerLimits::default()
            },
            "connections.header_timeout_ms",
        ),
    ] {
        let err = limits.check().expect_err(key);
        assert!(err.contains(key), "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_spares_a_connection_with_a_request_in_flight() {
    let registry = Registry::new(
        ServerLimits {
            idle_timeout_ms: 1000,
            ..ServerLimits::default()
        },
        vec![("listener", "test".to_owned())].into(),
    );
    let remote: SocketAddr = ([127, 0, 0, 1], 1).into();
    let busy = registry.admit(remote).expect("admitted");
    let request = busy.tracker().request();
    let idle = registry.admit(remote).expect("admitted");
    let busy_ended = tokio::spawn(busy.run(remote, std::future::pending()));
    let idle_ended = tokio::spawn(idle.run(remote, std::future::pending()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(idle_ended.is_finished(), "the idle connection is closed");
    assert!(!busy_ended.is_finished(), "the busy one is not");
    drop(request);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(busy_ended.is_finished(), "closed once idle for the timeout");
}
