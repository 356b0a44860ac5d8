//! The relay against the real databases (SQLite, PostgreSQL `IDEM_POSTGRES_URL`, MySQL/MariaDB
//! `IDEM_MYSQL_URL`) and RabbitMQ (`IDEM_AMQP_URL`): rolled-back enqueues publish nothing,
//! per-key order with three relays on one table and each message published once, a poison
//! message goes dead while later ones proceed (or stops its key), requeue, retention. Each
//! test uses its own table and queues and drops them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{Outbox, Queue, RelayTask, amqp, ids, text};
use idem_outbox::{DbKind, DeadPolicy, NewMessage, Requeue};
use mysql_async::prelude::Queryable;

/// Enqueues `messages` in one transaction of the application's own driver, with a business
/// write in the same transaction, and commits or rolls back.
async fn enqueue_tx(ob: &Outbox, messages: &[NewMessage], commit: bool) {
    match ob.url.kind() {
        DbKind::Sqlite => {
            let mut conn = rusqlite::Connection::open(ob.url.expose()).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch("CREATE TABLE IF NOT EXISTS business (n INTEGER)")
                .unwrap();
            let tx = conn.transaction().unwrap();
            tx.execute("INSERT INTO business VALUES (1)", []).unwrap();
            for m in messages {
                idem_outbox::sqlite::enqueue(&tx, &ob.table, m).unwrap();
            }
            if commit {
                tx.commit().unwrap();
            } else {
                tx.rollback().unwrap();
            }
        }
        DbKind::Postgres => {
            let (mut client, conn) =
                tokio_postgres::connect(ob.url.expose(), tokio_postgres::NoTls)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let tx = client.transaction().await.unwrap();
            tx.execute("SELECT 1", &[]).await.unwrap();
            for m in messages {
                idem_outbox::postgres::enqueue(&tx, &ob.table, m)
                    .await
                    .unwrap();
            }
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
        }
        DbKind::Mysql => {
            let pool = mysql_async::Pool::new(ob.url.expose());
            let mut tx = pool
                .start_transaction(mysql_async::TxOpts::default())
                .await
                .unwrap();
            tx.query_drop("SELECT 1").await.unwrap();
            for m in messages {
                idem_outbox::mysql::enqueue(&mut tx, &ob.table, m)
                    .await
                    .unwrap();
            }
            if commit {
                tx.commit().await.unwrap();
            } else {
                tx.rollback().await.unwrap();
            }
            pool.disconnect().await.unwrap();
        }
    }
}

/// Undoes the marks of a PostgreSQL outbox: every row is pending again and due at once, as
/// after a relay killed between the broker's confirmation and its mark.
async fn lose_marks(ob: &Outbox) {
    let (client, conn) = tokio_postgres::connect(ob.url.expose(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute(
            &format!(
                "UPDATE \"{}\" SET state = 0, sent_ms = NULL, available_ms = 0",
                ob.table.name()
            ),
            &[],
        )
        .await
        .unwrap();
}

async fn setup(kind: DbKind) -> Option<(Outbox, Queue, String)> {
    let ob = Outbox::new(kind).await?;
    let url = amqp()?;
    let q = Queue::new(&url).await;
    Some((ob, q, url))
}

async fn rollback_publishes_nothing(kind: DbKind) {
    let Some((ob, mut q, url)) = setup(kind).await else {
        return;
    };
    let rolled = NewMessage::new(q.name.as_str(), &b"rolled back"[..]);
    let committed = NewMessage::new(q.name.as_str(), &b"committed"[..])
        .with_key("k")
        .with_header("tenant", "acme");
    enqueue_tx(&ob, std::slice::from_ref(&rolled), false).await;
    enqueue_tx(&ob, std::slice::from_ref(&committed), true).await;
    let relay = RelayTask::spawn(ob.config(&url));
    let got = q.receive(1, Duration::from_secs(20)).await;
    let more = q.receive_more(Duration::from_millis(500)).await;
    let stats = relay.stop().await;
    assert_eq!(got.len(), 1);
    assert!(more.is_empty(), "published more than the committed message");
    assert_eq!(got[0].message_id(), Some(committed.id()));
    assert_eq!(text(&got[0]), "committed");
    assert_eq!(got[0].header("tenant"), Some(&b"acme"[..]));
    assert_eq!(
        got[0].header(idem_outbox::ORDERING_KEY_HEADER),
        Some(&b"k"[..])
    );
    assert_eq!((stats.published, stats.marked), (1, 1));
    let s = ob.db.stats().await.unwrap();
    assert_eq!((s.pending, s.sent, s.dead), (0, 1, 0));
    assert_eq!(s.oldest_pending_age_ms, None);
    q.delete().await;
    ob.drop_table().await;
}

/// Three relays on one table: every message published exactly once, and each key's messages
/// in the order they were enqueued.
async fn three_relays_keep_order_and_publish_once(kind: DbKind) {
    let Some((ob, mut q, url)) = setup(kind).await else {
        return;
    };
    const KEYS: usize = 6;
    const PER_KEY: usize = 40;
    // Interleaved keys, several transactions, some keyless messages.
    let mut expected = HashSet::new();
    for round in 0..PER_KEY {
        let mut batch = Vec::new();
        for k in 0..KEYS {
            let m = NewMessage::new(q.name.as_str(), format!("k{k} {round}").into_bytes())
                .with_key(format!("k{k}"));
            expected.insert(m.id().to_owned());
            batch.push(m);
        }
        let free = NewMessage::new(q.name.as_str(), format!("free {round}").into_bytes());
        expected.insert(free.id().to_owned());
        batch.push(free);
        enqueue_tx(&ob, &batch, true).await;
    }
    let total = expected.len();
    let relays: Vec<RelayTask> = (0..3)
        .map(|_| {
            let mut c = ob.config(&url);
            c.batch_size = 8;
            RelayTask::spawn(c)
        })
        .collect();
    let got = q.receive(total, Duration::from_secs(60)).await;
    let more = q.receive_more(Duration::from_millis(500)).await;
    let mut stats = Vec::new();
    for r in relays {
        stats.push(r.stop().await);
    }
    assert_eq!(got.len(), total, "relays: {stats:?}");
    assert!(more.is_empty(), "{} extra publishes", more.len());
    let got_ids: HashSet<String> = ids(&got).into_iter().collect();
    assert_eq!(got_ids, expected, "each message exactly once");
    // Per key, the order of arrival is the order of enqueueing.
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &got {
        let t = text(m);
        let (key, n) = t.split_once(' ').unwrap();
        if key == "free" {
            continue;
        }
        let n: i64 = n.parse().unwrap();
        let prev = last.insert(key.to_owned(), n).unwrap_or(-1);
        assert_eq!(n, prev + 1, "key {key}: {n} after {prev}");
    }
    let published: u64 = stats.iter().map(|s| s.published).sum();
    assert_eq!(published, total as u64);
    // How the work spreads over the relays is timing: on a table without notifications (MySQL)
    // the first relay to poll can drain all 280 rows before the others wake up, so this test
    // holds the relays to exactly-once and per-key order only.
    let s = ob.db.stats().await.unwrap();
    assert_eq!((s.pending, s.sent), (0, total as u64));
    q.delete().await;
    ob.drop_table().await;
}

/// A message to a destination the broker refuses goes dead after its attempts; later
/// messages of its key and of other keys are published meanwhile. Requeued, it fails again
/// until its queue exists, then goes out.
async fn poison_goes_dead_while_later_messages_proceed(kind: DbKind) {
    let Some((ob, mut q, url)) = setup(kind).await else {
        return;
    };
    let missing = common::unique("obq_missing");
    let poison = NewMessage::new(missing.as_str(), &b"poison"[..]).with_key("k");
    let after = NewMessage::new(q.name.as_str(), &b"after"[..]).with_key("k");
    let other = NewMessage::new(q.name.as_str(), &b"other"[..]).with_key("j");
    enqueue_tx(&ob, &[poison.clone(), after.clone(), other.clone()], true).await;
    let mut c = ob.config(&url);
    c.max_attempts = 3;
    c.backoff = idem::Backoff::new(Duration::from_millis(20), Duration::from_millis(50));
    let relay = RelayTask::spawn(c.clone());
    let got = q.receive(2, Duration::from_secs(20)).await;
    let got: HashSet<String> = ids(&got).into_iter().collect();
    assert_eq!(
        got,
        HashSet::from([after.id().to_owned(), other.id().to_owned()])
    );
    // The poison row is dead, with its attempts and error, at its position.
    let mut dead = Vec::new();
    for _ in 0..100 {
        dead = ob.db.dead(10).await.unwrap();
        if !dead.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = relay.stop().await;
    assert_eq!(dead.len(), 1, "{stats:?}");
    assert_eq!(dead[0].message_id, poison.id());
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0]
            .last_error
            .as_deref()
            .unwrap()
            .contains("unroutable"),
        "{:?}",
        dead[0]
    );
    assert_eq!(stats.dead, 1);
    let s = ob.db.stats().await.unwrap();
    assert_eq!((s.pending, s.dead, s.sent), (0, 1, 2));
    // Its queue now exists: requeued, it goes out with its original id.
    let mut target = Queue::named(&url, &missing).await;
    assert_eq!(
        ob.db
            .requeue(&Requeue::MessageId(poison.id().to_owned()))
            .await
            .unwrap(),
        1
    );
    let relay = RelayTask::spawn(c);
    let got = target.receive(1, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(ids(&got), vec![poison.id().to_owned()]);
    assert_eq!(ob.db.stats().await.unwrap().dead, 0);
    target.delete().await;
    q.delete().await;
    ob.drop_table().await;
}

/// With [`DeadPolicy::StopKey`], a dead row holds back the later messages of its key (not the
/// other keys) until it is requeued and sent; then they follow in order.
async fn stop_key_holds_the_key(kind: DbKind) {
    let Some((ob, mut q, url)) = setup(kind).await else {
        return;
    };
    let missing = common::unique("obq_missing");
    let poison = NewMessage::new(missing.as_str(), &b"poison"[..]).with_key("k");
    let after = NewMessage::new(q.name.as_str(), &b"after"[..]).with_key("k");
    let other = NewMessage::new(q.name.as_str(), &b"other"[..]).with_key("j");
    enqueue_tx(&ob, &[poison.clone(), after.clone(), other.clone()], true).await;
    let mut c = ob.config(&url);
    c.max_attempts = 2;
    c.dead_policy = DeadPolicy::StopKey;
    c.backoff = idem::Backoff::new(Duration::from_millis(20), Duration::from_millis(50));
    let relay = RelayTask::spawn(c.clone());
    let got = q.receive(1, Duration::from_secs(20)).await;
    assert_eq!(ids(&got), vec![other.id().to_owned()]);
    for _ in 0..100 {
        if ob.db.stats().await.unwrap().dead == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ob.db.stats().await.unwrap().dead, 1);
    // The key stays stopped.
    assert!(q.receive_more(Duration::from_millis(800)).await.is_empty());
    let mut target = Queue::named(&url, &missing).await;
    assert_eq!(ob.db.requeue(&Requeue::AllDead).await.unwrap(), 1);
    let first = target.receive(1, Duration::from_secs(20)).await;
    let then = q.receive(1, Duration::from_secs(20)).await;
    relay.stop().await;
    assert_eq!(ids(&first), vec![poison.id().to_owned()]);
    assert_eq!(ids(&then), vec![after.id().to_owned()]);
    target.delete().await;
    q.delete().await;
    ob.drop_table().await;
}

async fn retention_deletes_old_sent_rows(kind: DbKind) {
    let Some((ob, mut q, url)) = setup(kind).await else {
        return;
    };
    let batch: Vec<NewMessage> = (0..25)
        .map(|i| NewMessage::new(q.name.as_str(), format!("{i}").into_bytes()))
        .collect();
    enqueue_tx(&ob, &batch, true).await;
    let relay = RelayTask::spawn(ob.config(&url));
    assert_eq!(q.receive(25, Duration::from_secs(20)).await.len(), 25);
    relay.stop().await;
    assert_eq!(ob.db.stats().await.unwrap().sent, 25);
    // Nothing is old enough yet.
    assert_eq!(
        ob.db
            .purge_sent(Duration::from_secs(3600), 10, 100)
            .await
            .unwrap(),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Bounded: 2 batches of 10 at most.
    assert_eq!(
        ob.db
            .purge_sent(Duration::from_millis(1), 10, 2)
            .await
            .unwrap(),
        20
    );
    assert_eq!(
        ob.db
            .purge_sent(Duration::from_millis(1), 10, 2)
            .await
            .unwrap(),
        5
    );
    assert_eq!(ob.db.stats().await.unwrap().sent, 0);
    // And the relay does it by itself.
    let more: Vec<NewMessage> = (0..3)
        .map(|i| NewMessage::new(q.name.as_str(), format!("{i}").into_bytes()))
        .collect();
    enqueue_tx(&ob, &more, true).await;
    let mut c = ob.config(&url);
    c.retention = Some(Duration::from_millis(1));
    c.purge_interval = Duration::from_millis(100);
    let relay = RelayTask::spawn(c);
    assert_eq!(q.receive(3, Duration::from_secs(20)).await.len(), 3);
    let mut s = ob.db.stats().await.unwrap();
    for _ in 0..100 {
        s = ob.db.stats().await.unwrap();
        if s.sent == 0 && s.pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = relay.stop().await;
    assert_eq!((s.sent, s.pending), (0, 0));
    assert_eq!(stats.purged, 3);
    q.delete().await;
    ob.drop_table().await;
}

macro_rules! per_database {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(idem_outbox::DbKind::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(idem_outbox::DbKind::Postgres).await })*
        }
        mod mysql {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() { super::$name(idem_outbox::DbKind::Mysql).await })*
        }
    };
}

per_database!(
    rollback_publishes_nothing,
    three_relays_keep_order_and_publish_once,
    poison_goes_dead_while_later_messages_proceed,
    stop_key_holds_the_key,
    retention_deletes_old_sent_rows,
);

/// PostgreSQL wakes the relay on commit: with a poll interval of an hour, the message still
/// goes out right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_listen_wakes_on_commit() {
    let Some((ob, mut q, url)) = setup(DbKind::Postgres).await else {
        return;
    };
    let mut c = ob.config(&url);
    c.poll_interval = Duration::from_secs(3600);
    let relay = RelayTask::spawn(c);
    // Let the relay go idle (its first claim finds nothing) before the commit.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let m = NewMessage::new(q.name.as_str(), format!("{i}").into_bytes());
        enqueue_tx(&ob, std::slice::from_ref(&m), true).await;
        let got = q.receive(1, Duration::from_secs(10)).await;
        assert_eq!(ids(&got), vec![m.id().to_owned()], "message {i} not woken");
    }
    relay.stop().await;
    q.delete().await;
    ob.drop_table().await;
}

/// In process, a [`idem_outbox::Notifier`] wakes the relay (SQLite has no LISTEN).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifier_wakes_in_process() {
    let Some((ob, mut q, url)) = setup(DbKind::Sqlite).await else {
        return;
    };
    let notifier = idem_outbox::Notifier::new();
    let mut c = ob.config(&url);
    c.poll_interval = Duration::from_secs(3600);
    c.notifier = Some(notifier.clone());
    let relay = RelayTask::spawn(c);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..3 {
        let m = NewMessage::new(q.name.as_str(), format!("{i}").into_bytes());
        enqueue_tx(&ob, std::slice::from_ref(&m), true).await;
        notifier.notify();
        let got = q.receive(1, Duration::from_secs(10)).await;
        assert_eq!(ids(&got), vec![m.id().to_owned()], "message {i} not woken");
    }
    relay.stop().await;
    q.delete().await;
    ob.drop_table().await;
}

/// Publishing again (a row whose mark was lost) to NATS JetStream carries the same
/// `Nats-Msg-Id`: the server recognises the duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_dedups_a_republish() {
    let Some(ob) = Outbox::new(DbKind::Postgres).await else {
        return;
    };
    let Some(nats) = idem_conformance::server::url(idem_conformance::server::NATS) else {
        return;
    };
    let stream = common::unique("OBX").to_uppercase();
    let subject = format!("{}.events", stream.to_lowercase());
    let config = idem_broker::nats::NatsConfig::new(stream.as_str(), subject.as_str(), "reader");
    let mut source = idem_broker::nats::NatsSource::connect(&nats, config)
        .await
        .unwrap();
    let batch: Vec<NewMessage> = (0..5)
        .map(|i| NewMessage::new(subject.as_str(), format!("{i}").into_bytes()))
        .collect();
    enqueue_tx(&ob, &batch, true).await;
    let first = RelayTask::spawn(ob.config(&nats));
    let mut got = Vec::new();
    while got.len() < 5 {
        let b = tokio::time::timeout(
            Duration::from_secs(20),
            idem_broker::Source::receive(&mut source, 10),
        )
        .await
        .unwrap()
        .unwrap();
        let acker = idem_broker::Source::acker(&source);
        let mut d = Vec::new();
        for i in b {
            got.push(i.message);
            d.push(i.delivery);
        }
        idem_broker::Acker::ack(&acker, d).await.unwrap();
    }
    let s1 = first.stop().await;
    assert_eq!((s1.published, s1.duplicates), (5, 0));
    lose_marks(&ob).await;
    let second = RelayTask::spawn(ob.config(&nats));
    for _ in 0..200 {
        if ob.db.stats().await.unwrap().pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s2 = second.stop().await;
    assert_eq!(
        (s2.published, s2.duplicates),
        (5, 5),
        "JetStream saw new messages"
    );
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        idem_broker::Source::receive(&mut source, 10),
    )
    .await;
    assert!(extra.is_err(), "the stream stored a duplicate");
    idem_broker::Source::close(source).await;
    let js = async_nats::jetstream::new(async_nats::connect(&nats).await.unwrap());
    let _ = js.delete_stream(&stream).await;
    let _ = js.delete_stream(format!("{stream}_DLQ")).await;
    ob.drop_table().await;
}

/// Kafka (`IDEM_KAFKA_URL`, default the tansu `.ci/run` starts): a row's ordering key is the
/// record key, so one key's messages land in one partition, in enqueue order; rows whose marks
/// were lost are produced again with the same message ids (Kafka stores them twice: the
/// consumer's idem recognises them), into the same partitions.
#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kafka_keys_pick_the_partition_and_republishes_keep_their_ids() {
    use idem_broker::kafka::admin::KafkaAdmin;
    use idem_broker::kafka::{KafkaConfig, KafkaSource, position};
    use idem_broker::{Acker, Admin, Message, Source};

    /// (message id, key, sequence number, partition, offset) of `n` records.
    async fn read(source: &mut KafkaSource, n: usize) -> Vec<(String, String, u32, i32, i64)> {
        let acker = source.acker();
        let mut out = Vec::new();
        while out.len() < n {
            let batch = tokio::time::timeout(Duration::from_secs(60), source.receive(n))
                .await
                .expect("records within 60 s")
                .unwrap();
            let mut deliveries = Vec::new();
            for i in batch {
                let m: &Message = &i.message;
                let t = text(m);
                let (key, seq) = t.split_once(' ').unwrap();
                let (partition, offset) = position(m).unwrap();
                assert_eq!(
                    m.header(idem_outbox::ORDERING_KEY_HEADER),
                    Some(key.as_bytes())
                );
                out.push((
                    m.message_id().unwrap().to_owned(),
                    key.to_owned(),
                    seq.parse().unwrap(),
                    partition,
                    offset,
                ));
                deliveries.push(i.delivery);
            }
            acker.ack(deliveries).await.unwrap();
        }
        out
    }

    /// Each key on one partition, its records in sequence order by offset; the partitions.
    fn partitions_by_key(got: &[(String, String, u32, i32, i64)]) -> HashMap<String, i32> {
        let mut by_key: HashMap<String, Vec<(i32, i64, u32)>> = HashMap::new();
        for (_, key, seq, partition, offset) in got {
            by_key
                .entry(key.clone())
                .or_default()
                .push((*partition, *offset, *seq));
        }
        by_key
            .into_iter()
            .map(|(key, mut records)| {
                let partition = records[0].0;
                assert!(
                    records.iter().all(|r| r.0 == partition),
                    "key {key} spread over partitions: {records:?}"
                );
                records.sort_unstable();
                let seqs: Vec<u32> = records.iter().map(|r| r.2).collect();
                let want: Vec<u32> = (0..seqs.len() as u32).collect();
                assert_eq!(seqs, want, "key {key}: offsets out of enqueue order");
                (key, partition)
            })
            .collect()
    }

    let Some(ob) = Outbox::new(DbKind::Postgres).await else {
        return;
    };
    let Some(kafka) = idem_conformance::server::url(("IDEM_KAFKA_URL", "kafka://127.0.0.1:19092"))
    else {
        return;
    };
    const KEYS: u32 = 6;
    const PER_KEY: u32 = 10;
    let total = (KEYS * PER_KEY) as usize;
    let topic = common::unique("obk");
    let config = KafkaConfig::new(topic.as_str(), format!("{topic}.g"))
        .partitions(3)
        .position_headers(true);
    let mut source = KafkaSource::connect(&kafka, config.clone()).await.unwrap();
    let mut ids = HashSet::new();
    for seq in 0..PER_KEY {
        let batch: Vec<NewMessage> = (0..KEYS)
            .map(|k| {
                NewMessage::new(topic.as_str(), format!("k{k} {seq}").into_bytes())
                    .with_key(format!("k{k}"))
            })
            .collect();
        ids.extend(batch.iter().map(|m| m.id().to_owned()));
        enqueue_tx(&ob, &batch, true).await;
    }
    let first = RelayTask::spawn(ob.config(&kafka));
    let got = read(&mut source, total).await;
    let s1 = first.stop().await;
    assert_eq!(s1.published, total as u64, "{s1:?}");
    let got_ids: HashSet<String> = got.iter().map(|r| r.0.clone()).collect();
    assert_eq!((got.len(), &got_ids), (total, &ids), "each row once");
    let placed = partitions_by_key(&got);
    let used: HashSet<i32> = placed.values().copied().collect();
    assert!(used.len() > 1, "six keys on one partition: {placed:?}");

    lose_marks(&ob).await;
    let second = RelayTask::spawn(ob.config(&kafka));
    let again = read(&mut source, total).await;
    let s2 = second.stop().await;
    assert_eq!(s2.published, total as u64, "{s2:?}");
    let again_ids: HashSet<String> = again.iter().map(|r| r.0.clone()).collect();
    assert_eq!(again_ids, ids, "republished with the same message ids");
    assert_eq!(partitions_by_key(&again), placed, "same partition per key");
    let extra = tokio::time::timeout(Duration::from_millis(1500), source.receive(10)).await;
    assert!(extra.is_err(), "more records than rows");
    source.close().await;
    let admin = KafkaAdmin::connect(&kafka, config).await.unwrap();
    admin.cleanup().await.unwrap();
    admin.close().await;
    ob.drop_table().await;
}
