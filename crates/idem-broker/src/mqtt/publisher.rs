//! A QoS 1 publisher that reports success only on a `PUBACK` with reason "success": used for
//! dead letters and by [`MqttProducer`](super::MqttProducer). rumqttc's `publish` returns once
//! the request is queued, so the confirmation is matched here by packet id, one publish at a
//! time (dead letters are rare; producers that need throughput run several publishers).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use idem::Backoff;
use parking_lot::Mutex;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::options;
use crate::error::{BrokerError, BrokerErrorKind, redact};

/// How long a publish waits for its `PUBACK`.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

type Reply = oneshot::Sender<Result<(), BrokerError>>;

#[derive(Default)]
struct Waiting {
    reply: Option<Reply>,
    pkid: Option<u16>,
}

pub(super) struct ConfirmedPublisher {
    client: AsyncClient,
    one_at_a_time: tokio::sync::Mutex<()>,
    waiting: Arc<Mutex<Waiting>>,
    task: JoinHandle<()>,
}

impl Drop for ConfirmedPublisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The source of the error of a publish that no session subscribes to: MQTT drops such a
/// message.
#[derive(Debug, thiserror::Error)]
#[error("no matching subscribers")]
pub(super) struct NoMatchingSubscribers;

/// Whether the broker refused a publish because no session subscribes to its topic.
pub(super) fn no_matching_subscribers(e: &BrokerError) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<NoMatchingSubscribers>())
}

/// Polls until the broker's `CONNACK`, or fails.
pub(super) async fn connected(events: &mut EventLoop, url: &str) -> Result<bool, BrokerError> {
    let wait = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => return Ok(ack.session_present),
                Ok(_) => {}
                Err(e) => {
                    return Err(BrokerError::new(
                        BrokerErrorKind::Connection,
                        format!("connecting to {}: {e}", redact(url)),
                    )
                    .with_source(e));
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::new(
                BrokerErrorKind::Timeout,
                format!("no CONNACK from {}", redact(url)),
            ))
        })
}

impl ConfirmedPublisher {
    /// Connects a clean session.
    pub(super) async fn connect(url: &str) -> Result<Self, BrokerError> {
        let client_id = format!("idem-pub-{:016x}", fastrand::u64(..));
        let mut opts = options(url, &client_id, Duration::from_secs(30))?;
        opts.set_clean_start(true);
        let (client, mut events) = AsyncClient::new(opts, 16);
        connected(&mut events, url).await?;
        let waiting: Arc<Mutex<Waiting>> = Arc::default();
        let w = Arc::clone(&waiting);
        let task = tokio::spawn(async move {
            let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let mut failures = 0;
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => w.lock().pkid = Some(pkid),
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        let mut st = w.lock();
                        if st.pkid == Some(ack.pkid) {
                            st.pkid = None;
                            let result = match ack.reason {
                                PubAckReason::Success => Ok(()),
                                // Nobody would ever get it: not a success.
                                PubAckReason::NoMatchingSubscribers => Err(BrokerError::new(
                                    BrokerErrorKind::Rejected,
                                    "the broker answered the publish with NoMatchingSubscribers",
                                )
                                .with_source(NoMatchingSubscribers)),
                                other => Err(BrokerError::new(
                                    BrokerErrorKind::Rejected,
                                    format!("the broker answered the publish with {other:?}"),
                                )),
                            };
                            if let Some(reply) = st.reply.take() {
                                let _ = reply.send(result);
                            }
                        }
                    }
                    Ok(_) => failures = 0,
                    Err(e) => {
                        // The publish in flight, if any, is dropped with the clean session:
                        // fail it so the caller retries.
                        let reply = {
                            let mut st = w.lock();
                            st.pkid = None;
                            st.reply.take()
                        };
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(BrokerError::new(
                                BrokerErrorKind::Connection,
                                format!("connection lost before the PUBACK: {e}"),
                            )));
                        }
                        failures += 1;
                        tokio::time::sleep(backoff.delay(failures)).await;
                    }
                }
            }
        });
        Ok(Self {
            client,
            one_at_a_time: tokio::sync::Mutex::new(()),
            waiting,
            task,
        })
    }

    /// Publishes at QoS 1 and waits for a successful `PUBACK`.
    pub(super) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        properties: PublishProperties,
    ) -> Result<(), BrokerError> {
        let _turn = self.one_at_a_time.lock().await;
        let (reply, confirmed) = oneshot::channel();
        *self.waiting.lock() = Waiting {
            reply: Some(reply),
            pkid: None,
        };
        self.client
            .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .await
            .map_err(|e| {
                BrokerError::new(BrokerErrorKind::Connection, format!("publishing: {e}"))
                    .with_source(e)
            })?;
        match tokio::time::timeout(CONFIRM_TIMEOUT, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "the publisher stopped",
            )),
            Err(_) => {
                *self.waiting.lock() = Waiting::default();
                Err(BrokerError::new(
                    BrokerErrorKind::Timeout,
                    "no PUBACK in time",
                ))
            }
        }
    }
}
