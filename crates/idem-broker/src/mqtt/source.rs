//! [`MqttSource`]: a persistent QoS 1 session whose event loop runs in a task and hands
//! publishes over a channel; [`MqttAcker`]: fenced `PUBACK`s, local delayed redelivery,
//! confirmed dead letters.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use idem::Backoff;
use parking_lot::Mutex;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use tokio::sync::{OnceCell, mpsc};
use tokio::task::JoinHandle;

use super::publisher::{ConfirmedPublisher, connected, no_matching_subscribers};
use super::{MqttConfig, options};
use crate::error::{BrokerError, BrokerErrorKind, redact};
use crate::message::{Message, header};
use crate::source::{Acker, Incoming, Source};

/// How long a delivery whose dead-letter publish failed waits before it is handed back to be
/// dead-lettered again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Subscribes to a topic in a persistent MQTT 5 session. See the [module docs](super).
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_broker::mqtt::{MqttConfig, MqttSource};
/// let source = MqttSource::connect("mqtt://127.0.0.1:1883", MqttConfig::new("billing-1", "orders/#")).await?;
/// # let _ = source; Ok(()) }
/// ```
pub struct MqttSource {
    config: Arc<MqttConfig>,
    rx: mpsc::UnboundedReceiver<Incoming<MqttDelivery>>,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("client_id", &self.config.client_id)
            .field("topic", &self.config.topic)
            .finish_non_exhaustive()
    }
}

/// What the event loop task and the acker share.
struct Shared {
    url: String,
    config: Arc<MqttConfig>,
    client: AsyncClient,
    tx: mpsc::UnboundedSender<Incoming<MqttDelivery>>,
    // Packet id -> the local sequence number of the copy that holds it now. A `PUBACK` is sent
    // only by that copy: an older copy's packet id may already name another message.
    inflight: Mutex<HashMap<u16, u64>>,
    next_seq: Mutex<u64>,
    closing: AtomicBool,
    dead_letters: OnceCell<ConfirmedPublisher>,
    // One declaration of the dead-letter session at a time: two would take the session over
    // from each other.
    declaring: tokio::sync::Mutex<()>,
}

/// One MQTT delivery.
#[derive(Debug)]
pub struct MqttDelivery {
    publish: Publish,
    seq: u64,
    count: u32,
}

/// Settles [`MqttSource`] deliveries.
#[derive(Clone)]
pub struct MqttAcker {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MqttAcker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAcker")
            .field("client_id", &self.shared.config.client_id)
            .finish_non_exhaustive()
    }
}

/// Creates (or refreshes) a persistent session subscribed to `topic`, then leaves it: the
/// broker queues QoS 1 messages for it from now on.
///
/// The session may exist and hold messages (dead letters), which the broker sends as soon as
/// it resumes: they are never acked here, so they stay in the session.
async fn declare_session(url: &str, client_id: &str, topic: &str) -> Result<(), BrokerError> {
    let mut opts = options(url, client_id, Duration::from_secs(30))?;
    opts.set_clean_start(false);
    opts.set_session_expiry_interval(Some(u32::MAX));
    opts.set_manual_acks(true);
    let (client, mut events) = AsyncClient::new(opts, 8);
    connected(&mut events, url).await?;
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .map_err(|e| BrokerError::new(BrokerErrorKind::Connection, format!("subscribing: {e}")))?;
    let wait = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(BrokerError::new(
                        BrokerErrorKind::Connection,
                        format!("subscribing: {e}"),
                    ));
                }
            }
        }
        let _ = client.disconnect().await;
        while let Ok(ev) = events.poll().await {
            if matches!(ev, Event::Outgoing(Outgoing::Disconnect)) {
                break;
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::new(
                BrokerErrorKind::Timeout,
                "no SUBACK in time",
            ))
        })
}

impl MqttSource {
    /// Connects with `clean_start = false`, subscribes at QoS 1, and declares the dead-letter
    /// session (unless `config.declare_dead_letter_session` is false).
    ///
    /// # Errors
    /// A [`BrokerError`] when the broker is unreachable or refuses the session.
    pub async fn connect(url: &str, config: MqttConfig) -> Result<Self, BrokerError> {
        if config.declare_dead_letter_session {
            declare_session(
                url,
                &config.dead_letter_client_id(),
                &config.dead_letter_topic,
            )
            .await?;
        }
        let mut opts = options(url, &config.client_id, config.keep_alive)?;
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(
            u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX),
        ));
        opts.set_manual_acks(true);
        let (client, mut events) = AsyncClient::new(opts, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let config = Arc::new(config);
        let shared = Arc::new(Shared {
            url: url.to_owned(),
            config: Arc::clone(&config),
            client,
            tx,
            inflight: Mutex::new(HashMap::new()),
            next_seq: Mutex::new(0),
            closing: AtomicBool::new(false),
            dead_letters: OnceCell::new(),
            declaring: tokio::sync::Mutex::new(()),
        });
        // The first connection is made here, so that a wrong URL fails `connect`; messages the
        // resumed session sends right away are handled like any others.
        let session_present = connected(&mut events, url).await?;
        shared.on_connack(session_present);
        if session_present {
            // The session has a subscription, but perhaps not this one: subscribe anyway.
            shared
                .client
                .subscribe(&config.topic, QoS::AtLeastOnce)
                .await
                .map_err(|e| {
                    BrokerError::new(BrokerErrorKind::Connection, format!("subscribing: {e}"))
                })?;
        }
        let wait_suback = async {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                    Ok(ev) => shared.on_event(ev),
                    Err(e) => {
                        return Err(BrokerError::new(
                            BrokerErrorKind::Connection,
                            format!("subscribing: {e}"),
                        ));
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait_suback)
            .await
            .unwrap_or_else(|_| {
                Err(BrokerError::new(
                    BrokerErrorKind::Timeout,
                    "no SUBACK in time",
                ))
            })?;
        tracing::info!(client_id = %config.client_id, topic = %config.topic, url = %redact(url), "consuming");
        let task = tokio::spawn(run_events(Arc::clone(&shared), events));
        Ok(Self {
            config,
            rx,
            shared,
            task,
        })
    }
}

async fn run_events(shared: Arc<Shared>, mut events: EventLoop) {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut failures = 0;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                shared.on_connack(ack.session_present);
            }
            Ok(ev) => shared.on_event(ev),
            Err(e) => {
                if shared.closing.load(Ordering::SeqCst) {
                    return;
                }
                failures += 1;
                let delay = backoff.delay(failures);
                tracing::warn!(error = %e, ?delay, "MQTT connection lost; reconnecting");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

impl Shared {
    async fn declare_dead_letter_session(&self) -> Result<(), BrokerError> {
        let _one = self.declaring.lock().await;
        tracing::warn!(
            client_id = %self.config.dead_letter_client_id(),
            topic = %self.config.dead_letter_topic,
            "no session subscribes to the dead-letter topic; declaring it again"
        );
        declare_session(
            &self.url,
            &self.config.dead_letter_client_id(),
            &self.config.dead_letter_topic,
        )
        .await
    }

    fn on_connack(&self, session_present: bool) {
        if !session_present {
            // A new session: no packet id of the old one means anything now.
            self.inflight.lock().clear();
            if let Err(e) = self
                .client
                .try_subscribe(&self.config.topic, QoS::AtLeastOnce)
            {
                tracing::warn!(error = %e, "cannot queue the subscription");
            }
        }
    }

    fn on_event(&self, ev: Event) {
        if let Event::Incoming(Packet::Publish(p)) = ev {
            let seq = {
                let mut n = self.next_seq.lock();
                *n += 1;
                *n
            };
            if p.qos != QoS::AtMostOnce {
                self.inflight.lock().insert(p.pkid, seq);
            }
            let count = if p.dup { 2 } else { 1 };
            let _ = self.tx.send(self.incoming(p, seq, count));
        }
    }

    fn incoming(&self, publish: Publish, seq: u64, count: u32) -> Incoming<MqttDelivery> {
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        let mut message = Message::new(topic, publish.payload.clone());
        if let Some(props) = &publish.properties {
            for (name, value) in &props.user_properties {
                if name == header::MESSAGE_ID {
                    message = message.with_message_id(value.as_str());
                }
                message = message.with_header(name.as_str(), value.clone());
            }
        }
        Incoming::new(
            message.with_delivery_count(count),
            MqttDelivery {
                publish,
                seq,
                count,
            },
        )
    }

    /// Whether `d` is still the copy holding its packet id.
    fn holds(&self, d: &MqttDelivery) -> bool {
        d.publish.qos == QoS::AtMostOnce
            || self.inflight.lock().get(&d.publish.pkid) == Some(&d.seq)
    }

    async fn puback(&self, d: &MqttDelivery) -> Result<(), BrokerError> {
        if d.publish.qos == QoS::AtMostOnce {
            return Ok(());
        }
        {
            let mut inflight = self.inflight.lock();
            if inflight.get(&d.publish.pkid) != Some(&d.seq) {
                // The broker resent this message since (or the session is new): that copy
                // settles it.
                return Ok(());
            }
            inflight.remove(&d.publish.pkid);
        }
        self.client.ack(&d.publish).await.map_err(|e| {
            BrokerError::new(BrokerErrorKind::Connection, format!("acking: {e}")).with_source(e)
        })
    }
}

impl Source for MqttSource {
    type Delivery = MqttDelivery;
    type Acker = MqttAcker;

    fn acker(&self) -> MqttAcker {
        MqttAcker {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn receive(&mut self, max: usize) -> Result<Vec<Incoming<MqttDelivery>>, BrokerError> {
        let Some(first) = self.rx.recv().await else {
            return Err(BrokerError::new(
                BrokerErrorKind::Connection,
                "the MQTT event loop stopped",
            ));
        };
        let mut out = vec![first];
        while out.len() < max {
            match self.rx.try_recv() {
                Ok(next) => out.push(next),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn close(self) {
        // The session persists: unacked messages are resent when this client id reconnects.
        self.shared.closing.store(true, Ordering::SeqCst);
        let _ = self.shared.client.disconnect().await;
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(2), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

impl Acker for MqttAcker {
    type Delivery = MqttDelivery;

    async fn ack(&self, deliveries: Vec<MqttDelivery>) -> Result<(), BrokerError> {
        let mut result = Ok(());
        for d in &deliveries {
            if let Err(e) = self.shared.puback(d).await {
                result = Err(e);
            }
        }
        result
    }

    async fn nack(&self, delivery: MqttDelivery, delay: Duration) -> Result<(), BrokerError> {
        // MQTT has no nack: keep it unacked and hand it over again after the delay.
        let shared = Arc::clone(&self.shared);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if shared.holds(&delivery) {
                let MqttDelivery {
                    publish,
                    seq,
                    count,
                } = delivery;
                let _ = shared
                    .tx
                    .send(shared.incoming(publish, seq, count.saturating_add(1)));
            }
        });
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: MqttDelivery,
        message: &Message,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let publisher = match shared
            .dead_letters
            .get_or_try_init(|| ConfirmedPublisher::connect(&shared.url))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                self.nack(delivery, DEAD_LETTER_RETRY).await?;
                return Err(e);
            }
        };
        let mut props = PublishProperties::default();
        for (name, value) in message.headers() {
            props
                .user_properties
                .push((name.to_owned(), String::from_utf8_lossy(value).into_owned()));
        }
        props
            .user_properties
            .push((header::DEAD_LETTER_REASON.to_owned(), reason.to_owned()));
        props.user_properties.push((
            header::DEAD_LETTER_ORIGIN.to_owned(),
            message.origin().to_owned(),
        ));
        let topic = &shared.config.dead_letter_topic;
        let payload = message.payload().clone();
        let mut published = publisher
            .publish(topic, payload.clone(), props.clone())
            .await;
        if let Err(e) = &published
            && no_matching_subscribers(e)
            && shared.config.declare_dead_letter_session
        {
            // The session that keeps dead letters is gone (expired, or removed by an operator):
            // declare it again and publish once more.
            match shared.declare_dead_letter_session().await {
                Ok(()) => published = publisher.publish(topic, payload, props).await,
                Err(de) => tracing::warn!(error = %de, "cannot declare the dead-letter session"),
            }
        }
        if let Err(e) = published {
            // Not acked, and not left holding one of the broker's in-flight slots either: handed
            // back a little later to be dead-lettered again.
            self.nack(delivery, DEAD_LETTER_RETRY).await?;
            return Err(e);
        }
        shared.puback(&delivery).await
    }
}
