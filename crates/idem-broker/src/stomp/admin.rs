//! [`StompAdmin`]: the backlog of a STOMP queue (by browsing it), its dead letters in
//! `DLQ.<queue>`, and its clean-up (draining). See [`Admin`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use iridium_stomp::Frame;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use super::client::Client;
use super::source::one_header_line;
use super::{Endpoint, MESSAGE_ID_HEADER, StompConfig, context, destination_of, is_frame_header};
use crate::admin::{Admin, DeadLetter, Locator, check_reader, is_dead_letter_header, next_reader};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};

/// Operations on the queue of a [`StompConfig`] and its dead-letter queue.
///
/// - **Backlog**: on ActiveMQ Classic, a browse of the queue (`browser:true`, its queue
///   browser over STOMP), which sees every message the queue holds, delivered-and-unacked ones
///   included. ActiveMQ stops a browse at its `maxBrowsePageSize` (400 by default): a browse
///   that reaches [`StompConfig::browse_limit`] reports an unknown backlog (`None`). Other
///   brokers (the `server` header of `CONNECTED` tells) report `None`: STOMP has no way to
///   count a queue.
/// - **Dead letters** are read from [`StompConfig::dead_letter_destination`] by a
///   `client-individual` subscription and stay unacked on this admin's connection until
///   [`republish`](Admin::republish)ed (then acked) or until the admin is closed (then the
///   broker takes them back). The reason is idem's `idem-dead-letter-reason` header, or
///   ActiveMQ's `dlqDeliveryFailureCause` for what the broker dead-lettered itself.
/// - **Republish** sends the message to the queue, persistent, with its message id and
///   headers, and waits for the receipt before acking the dead letter.
/// - **Clean-up** drains the queue and its dead-letter queue (STOMP cannot delete a
///   destination; ActiveMQ removes empty, unused queues itself only with
///   `gcInactiveDestinations`).
///
/// ```no_run
/// # async fn demo() -> Result<(), idem_broker::BrokerError> {
/// use idem_broker::Admin;
/// use idem_broker::stomp::{StompConfig, admin::StompAdmin};
/// let admin = StompAdmin::connect("stomp://127.0.0.1:61613", StompConfig::new("orders")).await?;
/// println!("backlog: {:?}", admin.backlog().await?);
/// for dead in admin.dead_letters(10).await? {
///     println!("{:?}: {:?}", dead.message().message_id(), dead.reason());
///     admin.republish(dead).await?; // back to "orders", same message id
/// }
/// admin.close().await;
/// # Ok(()) }
/// ```
pub struct StompAdmin {
    config: Arc<StompConfig>,
    endpoint: Endpoint,
    /// The connection, made again when it is lost (its unacked dead letters go back then).
    client: Mutex<Client>,
    reader: u64,
    dead: Mutex<DeadLetterReader>,
}

/// The subscription dead letters are read from (on one connection), and how many read ones
/// are still unacked.
#[derive(Default)]
struct DeadLetterReader {
    subscription: Option<(Client, String, mpsc::UnboundedReceiver<Frame>)>,
    outstanding: u64,
}

impl std::fmt::Debug for StompAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompAdmin")
            .field("url", &self.endpoint.shown())
            .field("destination", &self.config.destination)
            .finish_non_exhaustive()
    }
}

/// Whether the broker is ActiveMQ Classic (`server:ActiveMQ/5.x`), the one with STOMP queue
/// browsing; Artemis says `ActiveMQ-Artemis/…`.
fn is_activemq_classic(server: &str) -> bool {
    server.starts_with("ActiveMQ/")
}

/// How long a drain waits for one more message before it calls the queue empty.
const DRAIN_IDLE: Duration = Duration::from_millis(300);

impl StompAdmin {
    /// Connects. Creates nothing.
    ///
    /// # Errors
    /// The URL is wrong, the broker is unreachable or refuses the credentials.
    pub async fn connect(url: &str, config: StompConfig) -> Result<Self, BrokerError> {
        let endpoint = Endpoint::parse(url)?;
        let client = endpoint
            .connect(config.heartbeat, config.connect_timeout)
            .await?;
        Ok(Self {
            endpoint,
            config: Arc::new(config),
            client: Mutex::new(client),
            reader: next_reader(),
            dead: Mutex::default(),
        })
    }

    /// The connection, made again if it was lost.
    async fn client(&self) -> Result<Client, BrokerError> {
        let mut guard = self.client.lock().await;
        if !guard.is_alive() {
            *guard = self
                .endpoint
                .connect(self.config.heartbeat, self.config.connect_timeout)
                .await?;
        }
        Ok(guard.clone())
    }

    /// Counts the messages of `destination` by browsing it; `None` when the browse reached
    /// the limit or did not end within the receipt timeout.
    async fn browse(&self, destination: &str) -> Result<Option<u64>, BrokerError> {
        let client = self.client().await?;
        if !is_activemq_classic(client.server()) {
            // Other brokers ignore `browser:true` (and would deliver the messages instead).
            tracing::debug!(
                server = client.server(),
                "no STOMP browsing on this broker: backlog unknown"
            );
            return Ok(None);
        }
        let timeout = self.config.receipt_timeout;
        let (id, mut frames) = client
            .subscribe(
                destination,
                &[("ack", "auto"), ("browser", "true")],
                timeout,
            )
            .await
            .map_err(|e| context("browsing", e))?;
        let deadline = Instant::now() + timeout;
        let mut n = 0u64;
        let counted = loop {
            match tokio::time::timeout_at(deadline, frames.recv()).await {
                Ok(Some(frame)) if frame.get_header("browser") == Some("end") => break Some(n),
                Ok(Some(_)) => n += 1,
                Ok(None) => {
                    return Err(BrokerError::new(
                        BrokerErrorKind::Connection,
                        format!("browsing {destination}: the connection is lost"),
                    ));
                }
                Err(_) => {
                    tracing::warn!(
                        destination,
                        counted = n,
                        "the browse did not end in time (does the broker support STOMP browsing?)"
                    );
                    break None;
                }
            }
        };
        let _ = client.unsubscribe(&id, timeout).await;
        match counted {
            Some(n) if n >= self.config.browse_limit => {
                tracing::warn!(
                    destination,
                    limit = self.config.browse_limit,
                    "the browse reached its limit: the backlog is unknown (raise the broker's maxBrowsePageSize and StompConfig::browse_limit)"
                );
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// Takes whatever `destination` holds (auto acks) until it stays quiet for a moment.
    async fn drain(&self, destination: &str) -> Result<u64, BrokerError> {
        let client = self.client().await?;
        let timeout = self.config.receipt_timeout;
        let (id, mut frames) = client
            .subscribe(
                destination,
                &[
                    ("ack", "auto"),
                    ("activemq.prefetchSize", "1000"),
                    ("prefetch-count", "1000"),
                ],
                timeout,
            )
            .await
            .map_err(|e| context("draining", e))?;
        let mut n = 0u64;
        // The first message may take longer to come than the next ones.
        let mut wait = DRAIN_IDLE * 3;
        while let Ok(Some(_)) = tokio::time::timeout(wait, frames.recv()).await {
            n += 1;
            wait = DRAIN_IDLE;
        }
        let _ = client.unsubscribe(&id, timeout).await;
        Ok(n)
    }

    /// A dead letter from its frame.
    fn dead_letter(&self, frame: Frame) -> Option<DeadLetter> {
        let ack = frame.get_header("ack")?.to_owned();
        let header = |name: &str| frame.get_header(name).map(str::to_owned);
        let reason =
            header(header::DEAD_LETTER_REASON).or_else(|| header("dlqDeliveryFailureCause"));
        let origin = header(header::DEAD_LETTER_ORIGIN)
            .or_else(|| {
                header("original-destination")
                    .map(|d| d.strip_prefix("/queue/").map_or(d.clone(), str::to_owned))
            })
            .unwrap_or_else(|| self.config.queue.clone());
        let id = header(MESSAGE_ID_HEADER);
        let mut message = Message::new(origin, Bytes::from(frame.body));
        if let Some(id) = id {
            message = message.with_message_id(id);
        }
        for (name, value) in frame.headers {
            if !is_dead_letter_header(&name) {
                message = message.with_header(name, Bytes::from(value.into_bytes()));
            }
        }
        Some(DeadLetter::new(
            message,
            reason,
            Locator::Entry(ack),
            self.reader,
        ))
    }
}

impl Admin for StompAdmin {
    async fn backlog(&self) -> Result<Option<u64>, BrokerError> {
        self.browse(&self.config.destination).await
    }

    async fn dead_letters(&self, max: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let dlq = &self.config.dead_letter_destination;
        let mut reader = self.dead.lock().await;
        // How many the queue holds that this admin has not read yet.
        let held = self.browse(dlq).await?;
        let client = self.client().await?;
        if reader
            .subscription
            .as_ref()
            .is_some_and(|(c, _, _)| !c.same(&client))
        {
            // Its connection was lost: what it had read went back to the queue.
            reader.subscription = None;
            reader.outstanding = 0;
        }
        // Without a count (not ActiveMQ, or more than a browse shows), read what comes within
        // a short wait.
        let counted = held.is_some();
        let want = held.map_or(max as u64, |h| {
            h.saturating_sub(reader.outstanding).min(max as u64)
        });
        if want == 0 {
            return Ok(Vec::new());
        }
        if reader.subscription.is_none() {
            let (id, frames) = client
                .subscribe(
                    dlq,
                    &[
                        ("ack", "client-individual"),
                        ("activemq.prefetchSize", "1000"),
                        ("prefetch-count", "1000"),
                    ],
                    self.config.receipt_timeout,
                )
                .await
                .map_err(|e| context("reading dead letters", e))?;
            reader.subscription = Some((client, id, frames));
        }
        let Some((_, _, frames)) = reader.subscription.as_mut() else {
            return Ok(Vec::new());
        };
        let deadline = Instant::now()
            + if counted {
                self.config.receipt_timeout
            } else {
                DRAIN_IDLE * 3
            };
        let mut out = Vec::new();
        while (out.len() as u64) < want {
            match tokio::time::timeout_at(deadline, frames.recv()).await {
                Ok(Some(frame)) => out.extend(self.dead_letter(frame)),
                Ok(None) => {
                    reader.subscription = None;
                    break;
                }
                Err(_) => break,
            }
        }
        reader.outstanding += out.len() as u64;
        Ok(out)
    }

    async fn republish(&self, dead_letter: DeadLetter) -> Result<(), BrokerError> {
        check_reader(&dead_letter, self.reader)?;
        let Locator::Entry(ack) = &dead_letter.locator else {
            return Err(BrokerError::new(
                BrokerErrorKind::Config,
                "not a STOMP dead letter",
            ));
        };
        let message = dead_letter.message();
        let mut frame = Frame::new("SEND")
            .header("destination", self.config.destination.clone())
            .header("persistent", "true");
        if let Some(id) = message.message_id() {
            frame = frame.header(MESSAGE_ID_HEADER, id);
        }
        for (name, value) in message.headers() {
            if is_frame_header(name) {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value) {
                frame = frame.header(name, one_header_line(v));
            }
        }
        let frame = frame.set_body(message.payload().to_vec());
        let mut reader = self.dead.lock().await;
        let Some((client, _, _)) = reader
            .subscription
            .as_ref()
            .filter(|(c, _, _)| c.is_alive())
        else {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "the connection the dead letter was read on is lost: it went back to the dead-letter queue; read it again",
            ));
        };
        client
            .send_confirmed(frame, self.config.receipt_timeout)
            .await
            .map_err(|e| context("republishing a dead letter", e))?;
        // Acked with a receipt: once this returns, the dead letter is gone.
        client
            .send_confirmed(
                Frame::new("ACK").header("id", ack.as_str()),
                self.config.receipt_timeout,
            )
            .await
            .map_err(|e| context("removing a republished dead letter", e))?;
        reader.outstanding = reader.outstanding.saturating_sub(1);
        Ok(())
    }

    async fn cleanup(&self) -> Result<(), BrokerError> {
        let dlq = destination_of(&self.config.dead_letter_destination);
        let (a, b) = tokio::join!(self.drain(&self.config.destination), self.drain(&dlq));
        let drained = a? + b?;
        tracing::debug!(destination = %self.config.destination, drained, "drained");
        Ok(())
    }

    async fn close(self) {
        self.client.lock().await.close().await;
    }
}
