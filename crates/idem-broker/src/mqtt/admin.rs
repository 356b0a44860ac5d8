//! [`MqttAdmin`]: what the broker still owes a persistent session, the dead letters kept in the
//! dead-letter session, and the removal of both sessions. See [`Admin`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;

use super::publisher::{ConfirmedPublisher, connected};
use super::{MqttConfig, options};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};

/// How long [`Admin::dead_letters`] waits for the first dead letter the broker sends, and then
/// for each next one.
const FIRST_WAIT: Duration = Duration::from_secs(1);
const NEXT_WAIT: Duration = Duration::from_millis(200);

/// Operations on the persistent sessions of an [`MqttConfig`]: the consumer's
/// ([`client_id`](MqttConfig::client_id)) and the dead-letter session
/// ([`dead_letter_client_id`](MqttConfig::dead_letter_client_id)).
///
/// MQTT keeps what it owes a session to itself: [`backlog`](Admin::backlog) is `None`, and
/// [`leftover`](Admin::leftover) connects as the consumer (taking its session over) and counts
/// what the broker sends, without acking it. Dead letters are read by connecting as the
/// dead-letter session with manual acks: the broker sends what it queued, which stays unacked
/// (in the broker's in-flight window, Mosquitto's `max_inflight_messages`, 20 by default) until
/// [`republish`](Admin::republish)ed (to the topic it was published on, QoS 1, with its
/// `message-id` user property, confirmed by a `PUBACK`; then acked) or until the admin is
/// closed (then the broker sends it again next time).
pub struct MqttAdmin {
    url: String,
    config: Arc<MqttConfig>,
    reader: u64,
    session: tokio::sync::Mutex<Option<DeadLetterSession>>,
    publisher: OnceCell<ConfirmedPublisher>,
}

impl std::fmt::Debug for MqttAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAdmin")
            .field("url", &redact(&self.url))
            .field("client_id", &self.config.client_id)
            .finish_non_exhaustive()
    }
}

/// The dead-letter session, connected, its event loop in a task.
struct DeadLetterSession {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Publish>,
    /// Dead letters handed out and not acked yet, by packet id.
    held: HashMap<u16, Publish>,
    task: JoinHandle<()>,
}

impl MqttAdmin {
    /// Checks the URL. Connects nothing yet: each operation connects what it needs.
    ///
    /// # Errors
    /// The URL is not an MQTT URL.
    #[allow(clippy::unused_async)] // The same shape as the other admins' `connect`.
    pub async fn connect(url: &str, config: MqttConfig) -> Result<Self, BrokerError> {
        options(url, &config.client_id, config.keep_alive)?;
        Ok(Self {
            url: url.to_owned(),
            config: Arc::new(config),
            reader: next_reader(),
            session: tokio::sync::Mutex::new(None),
            publisher: OnceCell::new(),
        })
    }

    /// Connects as the dead-letter session (resumed, never cleaned: it keeps the dead letters).
    async fn open_session(&self) -> Result<DeadLetterSession, BrokerError> {
        let id = self.config.dead_letter_client_id();
        let mut opts = options(&self.url, &id, Duration::from_secs(30))?;
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(u32::MAX));
        opts.set_manual_acks(true);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let present = connected(&mut events, &self.url).await?;
        if !present {
            // A new session: subscribe, so that it keeps dead letters from now on (as the
            // source declares it).
            client
                .subscribe(&self.config.dead_letter_topic, QoS::AtLeastOnce)
                .await
                .map_err(|e| {
                    BrokerError::new(BrokerErrorKind::Connection, format!("subscribing: {e}"))
                })?;
        }
        let task = tokio::spawn(run_session(events, tx));
        Ok(DeadLetterSession {
            client,
            rx,
            held: HashMap::new(),
            task,
        })
    }

    fn dead_letter(&self, publish: &Publish) -> DeadLetter {
        let mut id = None;
        let mut reason = None;
        let mut origin = None;
        let mut headers = Vec::new();
        if let Some(props) = &publish.properties {
            for (name, value) in &props.user_properties {
                if name == header::DEAD_LETTER_REASON {
                    reason = Some(value.clone());
                } else if name == header::DEAD_LETTER_ORIGIN {
                    origin = Some(value.clone());
                } else if !is_dead_letter_header(name) {
                    if name == header::MESSAGE_ID {
                        id = Some(value.clone());
                    }
                    headers.push((name.clone(), value.clone()));
                }
            }
        }
        let origin = origin.unwrap_or_else(|| self.config.topic.clone());
        let mut message = Message::new(origin, publish.payload.clone());
        if let Some(id) = id {
            message = message.with_message_id(id);
        }
        for (name, value) in headers {
            message = message.with_header(name, value);
        }
        DeadLetter::new(
            message,
            reason,
            Locator::Packet(publish.pkid, 0),
            self.reader,
        )
    }

    /// Connects with `client_id` and a clean start that expires at once: the broker discards
    /// the session.
    async fn discard_session(&self, client_id: String) -> Result<(), BrokerError> {
        let mut opts = options(&self.url, &client_id, Duration::from_secs(30))?;
        opts.set_clean_start(true);
        opts.set_session_expiry_interval(Some(0));
        let (client, mut events) = AsyncClient::new(opts, 8);
        connected(&mut events, &self.url).await?;
        leave(&client, &mut events).await;
        Ok(())
    }
}

/// Polls a session's events, handing its publishes over, until it disconnects.
async fn run_session(mut events: EventLoop, tx: mpsc::UnboundedSender<Publish>) {
    let mut failures = 0u32;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                failures = 0;
                let _ = tx.send(p);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures > 50 {
                    tracing::warn!(error = %e, "the dead-letter session is lost");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Disconnects and polls until the `DISCONNECT` is out (or a short while has passed).
async fn leave(client: &AsyncClient, events: &mut EventLoop) {
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
    })
    .await;
}

impl Admin for MqttAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        Ok(None)
    }

    async fn leftover(&self, wait: Duration) -> Result<u64, BrokerError> {
        let mut opts = options(&self.url, &self.config.client_id, self.config.keep_alive)?;
        opts.set_clean_start(false);
        opts.set_manual_acks(true);
        opts.set_session_expiry_interval(Some(
            u32::try_from(self.config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ));
        let (client, mut events) = AsyncClient::new(opts, 64);
        connected(&mut events, &self.url).await?;
        let mut n = 0u64;
        let counting = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => n += 1,
                    Ok(_) => {}
                    Err(e) => {
                        return Err::<(), _>(
                            BrokerError::new(
                                BrokerErrorKind::Connection,
                                format!("session {:?}: {e}", self.config.client_id),
                            )
                            .with_source(e),
                        );
                    }
                }
            }
        };
        // Counting ends when `wait` is over (the normal way) or the connection fails.
        if let Ok(Err(e)) = tokio::time::timeout(wait, counting).await {
            return Err(e);
        }
        leave(&client, &mut events).await;
        Ok(n)
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let mut guard = self.session.lock().await;
        if guard.is_none() {
            *guard = Some(self.open_session().await?);
        }
        let Some(session) = guard.as_mut() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        let mut wait = FIRST_WAIT;
        while out.len() < max {
            let Ok(Some(publish)) = tokio::time::timeout(wait, session.rx.recv()).await else {
                break;
            };
            wait = NEXT_WAIT;
            out.push(self.dead_letter(&publish));
            session.held.insert(publish.pkid, publish);
        }
        Ok(out)
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.reader)?;
        let Locator::Packet(pkid, _) = dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not an MQTT dead letter",
            ));
        };
        let message = dead_letter.message();
        let mut props = PublishProperties::default();
        for (name, value) in message.headers() {
            props
                .user_properties
                .push((name.to_owned(), String::from_utf8_lossy(value).into_owned()));
        }
        if let Some(id) = message.message_id()
            && message.header(header::MESSAGE_ID).is_none()
        {
            props
                .user_properties
                .push((header::MESSAGE_ID.to_owned(), id.to_owned()));
        }
        let publisher = self
            .publisher
            .get_or_try_init(|| ConfirmedPublisher::connect(&self.url))
            .await?;
        publisher
            .publish(message.origin(), Bytes::clone(message.payload()), props)
            .await?;
        let mut guard = self.session.lock().await;
        let publish = guard.as_mut().and_then(|s| s.held.remove(&pkid));
        match (guard.as_ref(), publish) {
            (Some(session), Some(publish)) => session.client.ack(&publish).await.map_err(|e| {
                BrokerError::new(
                    BrokerErrorKind::Connection,
                    format!("removing the republished dead letter: {e}"),
                )
                .with_source(e)
            }),
            _ => Err(BrokerError::new(
                BrokerErrorKind::Config,
                "the dead letter is no longer held by this admin",
            )),
        }
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        self.discard_session(self.config.client_id.clone()).await?;
        self.discard_session(self.config.dead_letter_client_id())
            .await
    }

    async fn close(self) {
        if let Some(session) = self.session.into_inner() {
            // The acks queued so far go out before the DISCONNECT.
            let _ = session.client.disconnect().await;
            let mut task = session.task;
            if tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
    }
}
