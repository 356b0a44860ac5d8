//! What `verify` itself does on the broker, all through `idem_broker`'s factory and admins
//! ([`SourceConfig`](idem_broker::SourceConfig), [`idem_broker::Admin`],
//! [`idem_broker::AnyProducer`]): declare a mode's topology before anything is published,
//! publish (one attempt at a time, so that every retry is counted), read the backlog, and clean
//! up afterwards on a server that is not its own.

use std::time::Duration;

use anyhow::anyhow;
use idem_broker::{Admin, AnyAdmin, AnyProducer, BrokerError, BrokerErrorKind, Outgoing, Source};

use super::spec::{BrokerKind, BrokerUrl, Names, Settings};

/// The configurations whose sessions hold a mode's messages: one per slot for MQTT (each slot
/// has its persistent session), one for the other brokers (the queue, stream or group is
/// shared).
fn configs(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slots: usize,
) -> Result<Vec<idem_broker::SourceConfig>, BrokerError> {
    let n = if url.kind() == BrokerKind::Mqtt {
        slots.max(1)
    } else {
        1
    };
    (0..n)
        .map(|slot| names.source_config(url.kind(), settings, slot))
        .collect()
}

/// Creates the queue (stream, group, sessions) of a mode, so that nothing published before the
/// consumers start is dropped: each adapter's source declares what it consumes on connect (MQTT
/// keeps messages only for subscribed sessions: every slot's persistent session must exist
/// before the first publish).
pub(crate) async fn declare(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slots: usize,
) -> Result<(), BrokerError> {
    for config in configs(url, names, settings, slots)? {
        config.connect(url).await?.close().await;
    }
    Ok(())
}

/// The admins of a mode's configurations.
async fn admins(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slots: usize,
) -> Result<Vec<AnyAdmin>, BrokerError> {
    let mut out = Vec::new();
    for config in configs(url, names, settings, slots)? {
        match config.admin(url).await {
            Ok(admin) => out.push(admin),
            Err(e) => {
                close(out).await;
                return Err(e);
            }
        }
    }
    Ok(out)
}

async fn close(admins: Vec<AnyAdmin>) {
    for admin in admins {
        admin.close().await;
    }
}

/// A producer of one mode's transfers.
pub(crate) struct Producer {
    producer: AnyProducer,
    destination: String,
}

/// What the broker answered to a publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Published {
    /// The broker recognised the message id and did not store it again (NATS).
    pub(crate) dropped_as_duplicate: bool,
}

/// How long one publish attempt may wait for its confirmation.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

impl Producer {
    pub(crate) async fn connect(url: &BrokerUrl, names: &Names) -> Result<Self, BrokerError> {
        Ok(Self {
            producer: url.producer().await?,
            destination: names.destination(url.kind()),
        })
    }

    /// One publish attempt, confirmed by the broker. The caller retries with the same message
    /// (same id), as a producer after a lost confirm does.
    pub(crate) async fn publish_once(&self, msg: &Outgoing) -> Result<Published, BrokerError> {
        let attempt = self.producer.publish_once(&self.destination, msg);
        match tokio::time::timeout(PUBLISH_TIMEOUT, attempt).await {
            Ok(receipt) => receipt.map(|r| Published {
                dropped_as_duplicate: r.duplicate,
            }),
            Err(_) => Err(BrokerError::new(
                BrokerErrorKind::Timeout,
                "no publish confirmation in time",
            )),
        }
    }
}

/// Copies the broker still holds for a mode: published and not acked (NATS: pending and
/// unacked; Redis: pending and never delivered; RabbitMQ: ready, which includes the unacked
/// ones once no consumer holds them). `None` where the broker cannot tell (MQTT keeps what it
/// owes each session to itself; see [`leftover`]).
pub(crate) async fn backlog(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
) -> anyhow::Result<Option<u64>> {
    let probe = async {
        let admins = admins(url, names, settings, 1).await?;
        let mut total = Some(0);
        let mut failed = None;
        for admin in &admins {
            match admin.backlog().await {
                Ok(n) => total = total.zip(n).map(|(a, b)| a + b),
                Err(e) => failed = Some(e),
            }
        }
        close(admins).await;
        failed.map_or(Ok(total), Err)
    };
    tokio::time::timeout(Duration::from_secs(15), probe)
        .await
        .map_err(|_| anyhow!("the broker did not answer how much it holds within 15 s"))?
        .map_err(anyhow::Error::from)
}

/// What the broker still holds for a mode's consumers once they are stopped: the backlog, and
/// for MQTT what each slot's session is sent within `wait` (nothing is acked: it stays).
pub(crate) async fn leftover(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slots: usize,
    wait: Duration,
) -> anyhow::Result<u64> {
    let admins = admins(url, names, settings, slots).await?;
    let mut total = 0;
    let mut failed = None;
    for admin in &admins {
        match admin.leftover(wait).await {
            Ok(n) => total += n,
            Err(e) => failed = Some(e),
        }
    }
    close(admins).await;
    failed.map_or(Ok(total), |e| Err(e.into()))
}

/// Removes a mode's queue (streams, keys, sessions) from a server that is not `verify`'s own.
/// Best effort: a failure is reported, never fatal.
pub(crate) async fn cleanup(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slots: usize,
) -> anyhow::Result<()> {
    let admins = admins(url, names, settings, slots).await?;
    let mut failed = None;
    for admin in &admins {
        if let Err(e) = admin.cleanup().await {
            failed = Some(e);
        }
    }
    close(admins).await;
    failed.map_or(Ok(()), |e| Err(e.into()))
}

/// What a consumer process connects: the adapter's source for its slot.
pub(crate) async fn connect_source(
    url: &BrokerUrl,
    names: &Names,
    settings: &Settings,
    slot: usize,
) -> Result<impl Source, BrokerError> {
    names
        .source_config(url.kind(), settings, slot)?
        .connect(url)
        .await
}
