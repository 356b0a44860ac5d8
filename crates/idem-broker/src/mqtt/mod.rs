//! MQTT 5 with `rumqttc` (tested on Mosquitto): [`MqttSource`] subscribes at QoS 1 in a
//! persistent session with manual acks, [`MqttProducer`] publishes at QoS 1 and waits for the
//! `PUBACK`.
//!
//! ## At-least-once settings
//!
//! - **Persistent session**: `clean_start = false` and a session expiry (default 1 day) under a
//!   fixed client id, so the broker keeps the subscription and every unacked QoS 1 message
//!   while the consumer is away, and resends them (flagged `dup`) when it reconnects.
//! - **QoS 1 subscription** and **manual acks** (`set_manual_acks(true)`): rumqttc would
//!   otherwise `PUBACK` on receipt, before idem has recorded anything. A `PUBACK` is sent only
//!   when the runtime acks.
//! - **The message id** travels in the MQTT 5 user property `message-id` (set by
//!   [`MqttProducer`]); MQTT 3.1.1 producers can carry it in the payload instead and the
//!   consumer keys with [`KeyFrom::Json`](crate::KeyFrom::Json). The packet id is never a key:
//!   it is reused as soon as a message is acked.
//! - **No nack in MQTT**: a delivery to retry later is kept unacked (it stays in the broker's
//!   in-flight window, Mosquitto's `max_inflight_messages`) and handed to the runtime again
//!   after the delay. If the consumer dies meanwhile, the broker resends it on reconnect.
//! - **Acks are per packet id and fenced**: a copy of a message that the broker has resent since
//!   (after a reconnect) is not acked under the old copy's packet id, which the broker may have
//!   reused for another message.
//! - **Dead letters** are published at QoS 1 on a separate connection to a dead-letter topic
//!   (default `idem/dead-letter/<client id>`) with the reason as a user property; the original
//!   is acked only after the `PUBACK` says the broker took it. MQTT keeps messages only for
//!   subscribed sessions, so the source declares a persistent session `<client id>.dead-letter`
//!   subscribed to that topic: Mosquitto queues dead letters there (up to its
//!   `max_queued_messages`) until an operator connects with that client id. A `PUBACK` with
//!   "no matching subscribers" is a failure, never an ack: the session is declared again (it
//!   expired, or an operator removed it) and the publish retried once. A delivery whose dead
//!   letter still failed is handed back after a second, like a nack, so that it neither stays
//!   unsettled for good nor holds one of the broker's in-flight slots meanwhile.
//! - **Reconnects** are rumqttc's: the event loop reconnects on the next poll (with backoff
//!   here), the session resumes, unacked messages come back.
//!
//! ## What QoS 2 does not guarantee
//!
//! QoS 2 ("exactly once") is a handshake between one client and the broker, within one session.
//! It does not make an effect happen once:
//! - a subscriber that crashes after its handler and before `PUBCOMP` gets the message again
//!   on reconnect, like at QoS 1;
//! - a session that expires, is cleaned (`clean_start`), or a broker that loses its state
//!   (Mosquitto persists sessions only every `autosave_interval`) forgets the handshake;
//! - a publisher that retries after losing its connection before `PUBREC` (or restarts
//!   without its session) publishes a new message, which QoS 2 does not recognise;
//! - it covers each hop separately (publisher to broker, broker to subscriber), not end to
//!   end, and bridges add hops.
//!
//! So idem treats MQTT as at-least-once at QoS 1 (cheaper than QoS 2's four packets) and
//! deduplicates by the message id in the store.

pub mod admin;
mod producer;
mod publisher;
mod source;

use std::time::Duration;

pub use self::producer::MqttProducer;
pub use self::source::{MqttAcker, MqttDelivery, MqttSource};

use crate::error::{BrokerError, BrokerErrorKind};

/// The user property carrying the reason of a dead letter.
pub const REASON_PROPERTY: &str = crate::message::header::DEAD_LETTER_REASON;

/// What [`MqttSource`] subscribes to.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MqttConfig {
    /// The client id: the broker keeps the session (subscription, unacked messages) under it,
    /// so it must be stable across restarts and unique among consumers.
    pub client_id: String,
    /// The topic filter to subscribe to (wildcards allowed).
    pub topic: String,
    /// How long the broker keeps the session while the consumer is away (default 1 day).
    pub session_expiry: Duration,
    /// Keep-alive interval (default 30 s).
    pub keep_alive: Duration,
    /// Where dead letters go (default `idem/dead-letter/<client id>`).
    pub dead_letter_topic: String,
    /// Declare the persistent session that keeps dead letters (default true).
    pub declare_dead_letter_session: bool,
}

impl MqttConfig {
    /// Subscribe to `topic` as `client_id`.
    pub fn new(client_id: impl Into<String>, topic: impl Into<String>) -> Self {
        let client_id = client_id.into();
        Self {
            dead_letter_topic: format!("idem/dead-letter/{client_id}"),
            client_id,
            topic: topic.into(),
            session_expiry: Duration::from_secs(24 * 3600),
            keep_alive: Duration::from_secs(30),
            declare_dead_letter_session: true,
        }
    }

    /// The client id of the session that keeps dead letters.
    pub fn dead_letter_client_id(&self) -> String {
        format!("{}.dead-letter", self.client_id)
    }
}

/// MQTT options from a URL `mqtt://[user:password@]host[:port]`.
fn options(
    url: &str,
    client_id: &str,
    keep_alive: Duration,
) -> Result<rumqttc::v5::MqttOptions, BrokerError> {
    let parsed = url::Url::parse(url).map_err(|e| {
        BrokerError::new(
            BrokerErrorKind::Config,
            format!("bad MQTT URL {}: {e}", crate::error::redact(url)),
        )
    })?;
    if !matches!(parsed.scheme(), "mqtt" | "tcp") {
        return Err(BrokerError::new(
            BrokerErrorKind::Config,
            format!(
                "unsupported MQTT URL scheme {:?} (mqtt:// or tcp://)",
                parsed.scheme()
            ),
        ));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| BrokerError::new(BrokerErrorKind::Config, "MQTT URL without a host"))?;
    let mut options = rumqttc::v5::MqttOptions::new(client_id, host, parsed.port().unwrap_or(1883));
    options.set_keep_alive(keep_alive);
    if !parsed.username().is_empty() {
        let password = parsed.password().unwrap_or("");
        options.set_credentials(parsed.username(), password);
    }
    Ok(options)
}
