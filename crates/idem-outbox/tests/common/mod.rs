//! Helpers shared by the integration tests: a fresh outbox table on each database, queues on
//! RabbitMQ, and a reader that collects what the relay published.

#![allow(dead_code, unreachable_pub)]

use std::time::{Duration, Instant};

use idem_broker::amqp::{AmqpConfig, AmqpSource};
use idem_broker::{Acker, BrokerUrl, Message, Source};
use idem_conformance::server;
use idem_outbox::{DbKind, DbUrl, OutboxDb, RelayConfig, Table};
use mysql_async::prelude::Queryable;

/// A name unique across tests and processes.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}_{:x}_{:08x}",
        std::process::id(),
        fastrand::u32(..)
    )
}

pub fn amqp() -> Option<String> {
    server::url(server::AMQP)
}

/// A fresh outbox table (migrated) on one database; dropped by [`Outbox::drop_table`].
pub struct Outbox {
    pub url: DbUrl,
    pub table: Table,
    pub db: OutboxDb,
    _dir: Option<tempfile::TempDir>,
}

impl Outbox {
    /// `None` (skip, loudly) when the server is missing outside CI.
    pub async fn new(kind: DbKind) -> Option<Self> {
        let table = Table::new(&unique("obx")).unwrap();
        let (url, dir) = match kind {
            DbKind::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("app.db");
                (
                    DbUrl::parse(&format!("sqlite:{}", path.display())).unwrap(),
                    Some(dir),
                )
            }
            DbKind::Postgres => (DbUrl::parse(&server::url(server::POSTGRES)?).unwrap(), None),
            DbKind::Mysql => (DbUrl::parse(&server::url(server::MYSQL)?).unwrap(), None),
        };
        Some(Self::attach(url, table, dir).await)
    }

    /// An existing table (a child process of a crash test).
    pub async fn attach(url: DbUrl, table: Table, dir: Option<tempfile::TempDir>) -> Self {
        let db = OutboxDb::connect(&url, table.clone()).await.unwrap();
        db.migrate().await.unwrap();
        Self {
            url,
            table,
            db,
            _dir: dir,
        }
    }

    pub fn config(&self, broker: &str) -> RelayConfig {
        let mut c = RelayConfig::new(self.url.clone(), BrokerUrl::parse(broker).unwrap());
        c.table = self.table.clone();
        c.poll_interval = Duration::from_millis(100);
        c
    }

    pub async fn drop_table(self) {
        let t = self.table.name().to_owned();
        match self.url.kind() {
            DbKind::Sqlite => {}
            DbKind::Postgres => {
                let (client, conn) =
                    tokio_postgres::connect(self.url.expose(), tokio_postgres::NoTls)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                client
                    .batch_execute(&format!(
                        "DROP TABLE IF EXISTS \"{t}\"; DROP FUNCTION IF EXISTS \"{t}_notify\"();"
                    ))
                    .await
                    .unwrap();
            }
            DbKind::Mysql => {
                let pool = mysql_async::Pool::new(self.url.expose());
                let mut conn = pool.get_conn().await.unwrap();
                conn.query_drop(format!("DROP TABLE IF EXISTS `{t}`"))
                    .await
                    .unwrap();
                drop(conn);
                pool.disconnect().await.unwrap();
            }
        }
        self.db.close().await;
    }
}

/// A RabbitMQ queue (declared on creation) and its consumer, deleted by [`Queue::delete`].
pub struct Queue {
    pub name: String,
    pub url: String,
    source: Option<AmqpSource>,
}

impl Queue {
    pub async fn new(url: &str) -> Self {
        Self::named(url, &unique("obq")).await
    }

    /// Declares the queue `name`.
    pub async fn named(url: &str, name: &str) -> Self {
        let name = name.to_owned();
        let source = AmqpSource::connect(url, AmqpConfig::new(name.as_str()))
            .await
            .unwrap();
        Self {
            name,
            url: url.to_owned(),
            source: Some(source),
        }
    }

    /// Receives (and acks) until `n` messages came or `within` passed.
    pub async fn receive(&mut self, n: usize, within: Duration) -> Vec<Message> {
        let source = self.source.as_mut().unwrap();
        let acker = source.acker();
        let deadline = Instant::now() + within;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(batch) = tokio::time::timeout(left, source.receive(256)).await else {
                break;
            };
            let batch = batch.unwrap();
            let mut deliveries = Vec::new();
            for i in batch {
                out.push(i.message);
                deliveries.push(i.delivery);
            }
            acker.ack(deliveries).await.unwrap();
        }
        out
    }

    /// Receives what arrives within `quiet` (to check nothing more comes).
    pub async fn receive_more(&mut self, quiet: Duration) -> Vec<Message> {
        self.receive(usize::MAX, quiet).await
    }

    pub async fn delete(mut self) {
        if let Some(s) = self.source.take() {
            s.close().await;
        }
        delete_queues(&self.url, &[self.name.as_str()]).await;
    }

    /// Hands the queue's source over (to an idem consumer).
    pub fn take_source(&mut self) -> AmqpSource {
        self.source.take().unwrap()
    }
}

pub async fn delete_queues(url: &str, names: &[&str]) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for name in names {
        for q in [name.to_string(), format!("{name}.dlq")] {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
        let _ = ch
            .exchange_delete(
                format!("{name}.dlx").as_str().into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = conn.close(0, "bye".into()).await;
}

/// A relay task; stopped (gracefully) by [`RelayTask::stop`].
pub struct RelayTask {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<idem_outbox::RelayStats>,
}

impl RelayTask {
    pub fn spawn(config: RelayConfig) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            idem_outbox::run(config, async {
                let _ = rx.await;
            })
            .await
            .unwrap()
        });
        Self {
            stop: Some(tx),
            handle,
        }
    }

    pub fn spawn_relay(relay: idem_outbox::Relay) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            relay
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap()
        });
        Self {
            stop: Some(tx),
            handle,
        }
    }

    pub async fn stop(mut self) -> idem_outbox::RelayStats {
        let _ = self.stop.take().unwrap().send(());
        self.handle.await.unwrap()
    }
}

pub fn ids(messages: &[Message]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m.message_id().unwrap().to_owned())
        .collect()
}

pub fn text(m: &Message) -> String {
    String::from_utf8_lossy(m.payload()).into_owned()
}
