//! [`StompSource`]: one `client-individual` subscription, connected again when its connection
//! is lost; [`StompAcker`]: individual ACKs on the delivery's own connection, delayed retries
//! held by the source, confirmed dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use iridium_stomp::Frame;
use tokio::sync::mpsc;

use super::client::Client;
use super::{Endpoint, MESSAGE_ID_HEADER, StompConfig, context, is_frame_header};
use crate::error::{BrokerError, BrokerErrorKind};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// Consumes one STOMP queue with `client-individual` acks. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::stomp::{StompConfig, StompSource};
/// let source = StompSource::connect("stomp://127.0.0.1:61613", StompConfig::new("orders")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct StompSource {
    config: Arc<StompConfig>,
    endpoint: Endpoint,
    live: Option<Live>,
    origin: Arc<str>,
    /// Deliveries held for a delayed retry come back here.
    held_tx: mpsc::UnboundedSender<Incoming<StompDelivery>>,
    held_rx: mpsc::UnboundedReceiver<Incoming<StompDelivery>>,
    redeliveries: Redeliveries,
}

/// The connection and its subscription.
struct Live {
    client: Client,
    subscription: Arc<str>,
    frames: mpsc::UnboundedReceiver<Frame>,
}

impl std::fmt::Debug for StompSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompSource")
            .field("url", &self.endpoint.shown())
            .field("destination", &self.config.destination)
            .field("connected", &self.live.is_some())
            .finish_non_exhaustive()
    }
}

/// One STOMP delivery: the connection and subscription it came on, its `ack` id, and the
/// message (handed to the runtime again when it is held for a delayed retry).
pub struct StompDelivery {
    client: Client,
    subscription: Arc<str>,
    ack: String,
    message: Message,
}

impl std::fmt::Debug for StompDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompDelivery")
            .field("ack", &self.ack)
            .field("subscription", &self.subscription)
            .field("message_id", &self.message.message_id())
            .finish()
    }
}

/// Settles [`StompSource`] deliveries.
#[derive(Clone)]
pub struct StompAcker {
    config: Arc<StompConfig>,
    held: mpsc::UnboundedSender<Incoming<StompDelivery>>,
}

impl std::fmt::Debug for StompAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StompAcker")
            .field("destination", &self.config.destination)
            .field(
                "dead_letter_destination",
                &self.config.dead_letter_destination,
            )
            .finish_non_exhaustive()
    }
}

/// How many broker redeliveries of each message this source has seen (STOMP only flags
/// `redelivered`): two generations of at most [`REDELIVERIES_KEPT`] messages each, the older
/// forgotten when the younger fills up.
#[derive(Default)]
struct Redeliveries {
    young: HashMap<idem::Fingerprint, u32>,
    old: HashMap<idem::Fingerprint, u32>,
}

const REDELIVERIES_KEPT: usize = 8192;

impl Redeliveries {
    fn next(&mut self, id: idem::Fingerprint) -> u32 {
        let seen = self
            .young
            .remove(&id)
            .or_else(|| self.old.remove(&id))
            .unwrap_or(1);
        let count = seen.saturating_add(1);
        if self.young.len() >= REDELIVERIES_KEPT {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(id, count);
        count
    }
}

impl StompSource {
    /// Connects and subscribes to `config.destination` with `ack:client-individual` (the
    /// broker's receipt awaited). STOMP brokers create queues on first use: nothing is
    /// declared.
    ///
    /// # Errors
    /// A [`BrokerError`] when the URL is wrong, the broker is unreachable within
    /// `config.connect_timeout`, refuses the credentials or the subscription.
    pub async fn connect(url: &str, config: StompConfig) -> Result<Self, BrokerError> {
        let endpoint = Endpoint::parse(url)?;
        let (held_tx, held_rx) = mpsc::unbounded_channel();
        let mut source = Self {
            origin: config.queue.as_str().into(),
            config: Arc::new(config),
            endpoint,
            live: None,
            held_tx,
            held_rx,
            redeliveries: Redeliveries::default(),
        };
        source.reconnect().await?;
        tracing::info!(destination = %source.config.destination, url = %source.endpoint.shown(), "consuming");
        Ok(source)
    }

    async fn reconnect(&mut self) -> Result<(), BrokerError> {
        if let Some(old) = self.live.take() {
            // What it held unacked goes back to the queue when it closes.
            old.client.close().await;
        }
        let config = &self.config;
        let client = self
            .endpoint
            .connect(config.heartbeat, config.connect_timeout)
            .await?;
        let prefetch = config.prefetch.to_string();
        let (subscription, frames) = client
            .subscribe(
                &config.destination,
                &[
                    ("ack", "client-individual"),
                    ("activemq.prefetchSize", &prefetch),
                    ("prefetch-count", &prefetch),
                ],
                config.receipt_timeout,
            )
            .await?;
        self.live = Some(Live {
            client,
            subscription: subscription.into(),
            frames,
        });
        Ok(())
    }

    fn convert(&mut self, frame: Frame) -> Option<Incoming<StompDelivery>> {
        let live = self.live.as_ref()?;
        let Some(ack) = frame.get_header("ack").map(str::to_owned) else {
            tracing::warn!(destination = %self.config.destination, "a MESSAGE without an ack header: not STOMP 1.2?");
            return None;
        };
        let (client, subscription) = (live.client.clone(), Arc::clone(&live.subscription));
        let redelivered = frame
            .get_header("redelivered")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let id = frame.get_header(MESSAGE_ID_HEADER).map(str::to_owned);
        let mut message = Message::new(Arc::clone(&self.origin), Bytes::from(frame.body));
        if let Some(id) = &id {
            message = message.with_message_id(id.as_str());
        }
        for (name, value) in frame.headers {
            message = message.with_header(name, Bytes::from(value.into_bytes()));
        }
        if redelivered {
            let key = match &id {
                Some(id) => idem::Fingerprint::of(id.as_bytes()),
                None => idem::Fingerprint::of(message.payload()),
            };
            message = message.with_delivery_count(self.redeliveries.next(key));
        }
        Some(Incoming::new(
            message.clone(),
            StompDelivery {
                client,
                subscription,
                ack,
                message,
            },
        ))
    }

    /// Whether a held delivery can still be settled: it came on the current connection
    /// (deliveries of a lost one are redelivered by the broker, so their held copies go).
    fn current(&self, d: &Incoming<StompDelivery>) -> bool {
        self.live
            .as_ref()
            .is_some_and(|l| l.client.same(&d.delivery.client) && l.client.is_alive())
    }

    /// Deliveries ready now (held ones due, and arrived ones), up to `max`.
    fn ready(&mut self, out: &mut Vec<Incoming<StompDelivery>>, max: usize) {
        while out.len() < max {
            match self.held_rx.recv().now_or_never() {
                Some(Some(d)) if self.current(&d) => out.push(d),
                Some(Some(_)) => {}
                _ => break,
            }
        }
        while out.len() < max {
            let Some(live) = self.live.as_mut() else {
                break;
            };
            match live.frames.recv().now_or_never() {
                Some(Some(frame)) => out.extend(self.convert(frame)),
                _ => break,
            }
        }
    }
}

impl Source for StompSource {
    type Delivery = StompDelivery;
    type Acker = StompAcker;

    fn acker(&self) -> StompAcker {
        StompAcker {
            config: Arc::clone(&self.config),
            held: self.held_tx.clone(),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<StompDelivery>>, BrokerError> {
        let max = max.max(1);
        if self.live.is_none() {
            self.reconnect().await?;
        }
        let mut out = Vec::new();
        loop {
            self.ready(&mut out, max);
            if !out.is_empty() {
                return Ok(out);
            }
            let Some(live) = self.live.as_mut() else {
                return Err(BrokerError::new(
                    BrokerErrorKind::Connection,
                    "not connected",
                ));
            };
            // Both waits are cancel-safe (channel receives): a dropped receive loses nothing.
            tokio::select! {
                held = self.held_rx.recv() => {
                    if let Some(d) = held.filter(|d| self.current(d)) {
                        out.push(d);
                    }
                }
                frame = live.frames.recv() => match frame {
                    Some(frame) => out.extend(self.convert(frame)),
                    None => {
                        // The connection is lost: the broker redelivers what it held unacked.
                        self.live = None;
                        return Err(BrokerError::new(
                            BrokerErrorKind::Connection,
                            format!("the connection to {} is lost; connecting again", self.endpoint.shown()),
                        ));
                    }
                },
            }
        }
    }

    async fn close(mut self) {
        // DISCONNECT with a receipt: the acks sent before it are processed first; whatever is
        // unacked (held deliveries included) goes back to the queue.
        if let Some(live) = self.live.take() {
            live.client.close().await;
        }
    }
}

/// How long a delivery whose dead-letter publish failed is held before it is tried again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

impl StompAcker {
    /// Holds `delivery` (unacked) and hands it to the source again after `delay`, counted as a
    /// redelivery. If the source is gone or has lost that connection by then, the copy is
    /// dropped: the broker redelivers it.
    fn hold(&self, delivery: StompDelivery, delay: Duration) {
        let count = delivery.message.delivery_count().saturating_add(1);
        let message = delivery.message.with_delivery_count(count);
        let again = Incoming::new(
            message.clone(),
            StompDelivery {
                message,
                ..delivery
            },
        );
        let held = self.held.clone();
        if delay.is_zero() {
            let _ = held.send(again);
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = held.send(again);
        });
    }

    /// Publishes a dead letter, persistent, on the delivery's connection, and waits for the
    /// broker's receipt.
    async fn publish_dead_letter(
        &self,
        client: &Client,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let mut frame = Frame::new("SEND")
            .header("destination", self.config.dead_letter_destination.clone())
            .header("persistent", "true");
        if let Some(id) = message.message_id() {
            frame = frame.header(MESSAGE_ID_HEADER, id);
        }
        frame = frame
            .header(header::DEAD_LETTER_REASON, one_header_line(reason))
            .header(header::DEAD_LETTER_ORIGIN, message.origin());
        for (name, value) in message.headers() {
            if is_frame_header(name) {
                continue;
            }
            if let Ok(v) = std::str::from_utf8(value) {
                frame = frame.header(name, v);
            }
        }
        let frame = frame.set_body(message.payload().to_vec());
        client
            .send_confirmed(frame, self.config.receipt_timeout)
            .await
            .map_err(|e| context("publishing a dead letter", e))
    }
}

/// Sends the ACK of `d` on its connection; fails when that connection is lost (the broker
/// redelivers it then).
fn ack(d: &StompDelivery) -> Result<(), BrokerError> {
    d.client
        .send(&Frame::new("ACK").header("id", d.ack.as_str()))
}

/// A header value on one line.
pub(super) fn one_header_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
}

impl Acker for StompAcker {
    type Delivery = StompDelivery;

    async fn ack(&self, deliveries: Vec<StompDelivery>) -> Result<(), BrokerError> {
        let mut result = Ok(());
        for d in &deliveries {
            if let Err(e) = ack(d) {
                result = Err(e);
            }
        }
        result
    }

    async fn nack(&self, delivery: StompDelivery, delay: Duration) -> Result<(), BrokerError> {
        // Never a STOMP NACK: see the module docs.
        if !delivery.client.is_alive() {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "holding a delivery: its connection is lost (the broker redelivers it)",
            ));
        }
        self.hold(delivery, delay);
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: StompDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        match self
            .publish_dead_letter(&delivery.client, message, reason)
            .await
        {
            Ok(()) => ack(&delivery),
            Err(e) => {
                // Not acked; handed back a little later to be dead-lettered again.
                self.hold(delivery, DEAD_LETTER_RETRY);
                Err(e)
            }
        }
    }
}
