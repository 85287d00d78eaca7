//! What depends on the loop that carries the bytes (`--io`). The rest of the
//! suite runs once per loop (scripts/test.sh sets COREMQ_TEST_IO); these
//! tests pick their loop themselves.

mod common;

use std::time::Duration;

use common::{publish_packet, Broker, ConnectOpts, RawClient};

const SEC: Duration = Duration::from_secs(1);

/// With a provided-buffer ring of two buffers, a read runs the ring dry
/// whenever one socket has more than two buffers' worth of bytes (each
/// publisher writes ~21 KiB at once, and a multishot recv fills buffer
/// after buffer in one go) or more than two sockets have bytes in one turn:
/// those reads end with ENOBUFS and are re-armed once the turn's buffers
/// are back. Nothing may be lost, reordered or left stalled: 30 publishers,
/// each writing 100 QoS 0 PUBLISHes at once, five times over, and every
/// message reaches the subscriber in its publisher's order.
#[test]
fn an_empty_buffer_ring_loses_nothing_and_stalls_no_connection() {
    let broker = Broker::start(&["--io", "uring", "--shards", "1", "--ring-buffers", "2"]);
    assert!(broker.log_contains("io=\"uring\""), "{}", broker.log_text());
    let port = broker.port();
    let mut sub = RawClient::subscriber(port, "ring-sub", "burst/#", 0);
    const PUBLISHERS: usize = 30;
    const ROUNDS: usize = 5;
    let mut pubs: Vec<RawClient> = (0..PUBLISHERS)
        .map(|i| RawClient::connect(port, &ConnectOpts::id(&format!("ring-pub-{i}"))).0)
        .collect();
    let mut next = vec![0usize; PUBLISHERS];
    for round in 0..ROUNDS {
        for (i, p) in pubs.iter_mut().enumerate() {
            burst(p, i, round * 100);
        }
        read_in_order(&mut sub, &mut next, PUBLISHERS * 100);
    }
    assert!(next.iter().all(|&n| n == ROUNDS * 100), "{next:?}");
    let empty = broker.wait_for_stat("ring_empty", |_| true, 5 * SEC);
    assert!(
        empty > 0,
        "the ring never ran dry: the test did not test it"
    );
    broker.assert_no_panic();
}

/// 100 QoS 0 PUBLISHes (~21 KiB) to `burst/{i}` in one write, the payloads
/// numbering them from `first`.
fn burst(publisher: &mut RawClient, i: usize, first: usize) {
    let mut batch = Vec::new();
    for n in first..first + 100 {
        batch.extend(publish_packet(
            &format!("burst/{i}"),
            format!("{n:0>200}").as_bytes(),
            0,
            false,
            1,
        ));
    }
    publisher.send(&batch);
}

/// Reads `count` messages of [`burst`]s, each in its publisher's order.
fn read_in_order(sub: &mut RawClient, next: &mut [usize], count: usize) {
    for _ in 0..count {
        let m = sub
            .next_publish(10 * SEC)
            .unwrap_or_else(|| panic!("delivery stalled at {next:?}"));
        let i: usize = m.topic.strip_prefix("burst/").unwrap().parse().unwrap();
        let n: usize = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        assert_eq!(n, next[i], "publisher {i}: out of order or lost");
        next[i] += 1;
    }
}

/// A burst of reads larger than the buffer ring's first 64 buffers grows
/// it, and every byte is delivered in order; once bursts stop, the shard
/// shrinks it back to 64 (within two of its 5-second looks), and reading
/// carries on.
#[test]
fn the_buffer_ring_grows_for_a_burst_and_shrinks_back_after_it() {
    let broker = Broker::start(&["--io", "uring", "--shards", "1"]);
    let port = broker.port();
    assert_eq!(broker.wait_for_stat("ring_buffers", |n| n > 0, 5 * SEC), 64);
    let mut sub = RawClient::subscriber(port, "grow-sub", "burst/#", 0);
    let mut pubs: Vec<RawClient> = (0..30)
        .map(|i| RawClient::connect(port, &ConnectOpts::id(&format!("grow-pub-{i}"))).0)
        .collect();
    let mut next = vec![0usize; pubs.len()];
    // Stopped, the broker reads nothing: every publisher's bytes wait in
    // its socket, and the first turn after SIGCONT reads them all at once,
    // ~180 buffers' worth.
    broker.signal(libc::SIGSTOP);
    for (i, p) in pubs.iter_mut().enumerate() {
        burst(p, i, 0);
    }
    broker.signal(libc::SIGCONT);
    read_in_order(&mut sub, &mut next, pubs.len() * 100);
    assert!(broker.wait_for_stat("ring_empty", |n| n > 0, 5 * SEC) > 0);
    let grown = broker.wait_for_stat("ring_buffers", |n| n > 64, 5 * SEC);
    assert!(grown <= 1024, "{grown}");

    let shrunk = broker.wait_for_stat("ring_buffers", |n| n == 64, 20 * SEC);
    assert_eq!(shrunk, 64);
    // Reading carries on, through the buffers the shrink dropped (still in
    // the ring until read once more) and after them.
    for round in 1..3 {
        for (i, p) in pubs.iter_mut().enumerate() {
            burst(p, i, round * 100);
            read_in_order(&mut sub, &mut next, 100);
        }
    }
    assert!(next.iter().all(|&n| n == 300), "{next:?}");
    broker.assert_no_panic();
}

/// `auto` picks io_uring on a kernel that has it, and says so; `epoll` is
/// taken at its word; a batching io_uring wait still delivers at once.
#[test]
fn io_auto_picks_uring_here_and_epoll_is_obeyed() {
    let auto = Broker::start(&["--io", "auto"]);
    assert!(auto.log_contains("io=\"uring\""), "{}", auto.log_text());
    let epoll = Broker::start(&["--io", "epoll"]);
    assert!(epoll.log_contains("io=\"epoll\""), "{}", epoll.log_text());
    // Batched waits deliver all the same (a lone message does not wait for
    // a batch: the wait has been idle longer than the batch time).
    let batched = Broker::start(&["--io", "uring", "--ring-batch-usec", "2000"]);
    for b in [&auto, &epoll, &batched] {
        let mut sub = RawClient::subscriber(b.port(), "io-sub", "io/t", 1);
        let (mut publ, _) = RawClient::connect(b.port(), &ConnectOpts::id("io-pub"));
        let sent = std::time::Instant::now();
        publ.publish("io/t", b"either loop", 1, false);
        sub.expect_publish("io/t", b"either loop", 5 * SEC);
        assert!(sent.elapsed() < SEC, "{:?}", sent.elapsed());
    }
}
