//! The Kafka client, plain Kafka only (no broker-specific calls), so the same code runs
//! against a Kafka cluster or the tansu broker the tests start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::error::{Error, Result};

fn kafka(context: impl Into<String>, e: KafkaError) -> Error {
    let code = match &e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    };
    let message = format!("{}: {e}", context.into());
    if code.is_some_and(broker_away) { Error::unavailable("kafka", message) } else { Error::backend("kafka", message) }
}

/// Whether `code` says the brokers could not be reached or did not answer in time, which
/// passes: a broker restarting, a network away.
fn broker_away(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | AllBrokersDown
            | OperationTimedOut
            | MessageTimedOut
            | TimedOutQueue
            | RequestTimedOut
            | BrokerNotAvailable
            | NetworkException
            | LeaderNotAvailable
            | NotLeaderForPartition
    )
}

/// Where the brokers are and any further client properties (security settings for a
/// managed cluster, say), passed to the client unchanged.
#[derive(Clone, Debug, Default)]
pub struct Connection {
    pub brokers: String,
    pub properties: Vec<(String, String)>,
}

impl Connection {
    pub fn new(brokers: impl Into<String>) -> Self {
        Connection { brokers: brokers.into(), properties: Vec::new() }
    }
}

/// The client settings every Candor client shares.
pub fn client_config(conn: &Connection) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &conn.brokers);
    for (k, v) in &conn.properties {
        c.set(k, v);
    }
    c
}

/// Creates the topics that do not exist yet (Kafka does not always auto-create them).
pub fn create_topics(conn: &Connection, topics: &[&str], partitions: i32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(conn).create().map_err(|e| kafka("creating an admin client", e))?;
    let new: Vec<NewTopic> = topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        crate::runtime::block_on(admin.create_topics(&new, &options)).map_err(|e| kafka("creating topics", e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                let message = format!("creating topic `{topic}`: {code}");
                return Err(if broker_away(code) {
                    Error::unavailable("kafka", message)
                } else {
                    Error::backend("kafka", message)
                });
            }
        }
    }
    Ok(())
}

/// Deletes topics; one already gone is not an error.
pub fn delete_topics(conn: &Connection, topics: &[&str]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        client_config(conn).create().map_err(|e| kafka("creating an admin client", e))?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results =
        crate::runtime::block_on(admin.delete_topics(topics, &options)).map_err(|e| kafka("deleting topics", e))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((topic, code)) => return Err(Error::backend("kafka", format!("deleting topic `{topic}`: {code}"))),
        }
    }
    Ok(())
}

/// The names of the topics the brokers have.
pub fn topic_names(conn: &Connection) -> Result<Vec<String>> {
    let c = consumer(conn, "candor-metadata")?;
    let md = c.fetch_metadata(None, Duration::from_secs(10)).map_err(|e| kafka("reading the brokers' metadata", e))?;
    Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
}

/// A consumer that never commits on its own: offsets live in Candor's checkpointed state.
pub fn consumer(conn: &Connection, group: &str) -> Result<BaseConsumer> {
    client_config(conn)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("session.timeout.ms", "6000")
        // A fetch returns within 50 ms when there is little to read (the default waits up
        // to 500 ms), which is most of an evaluation's latency on a quiet stream.
        .set("fetch.wait.max.ms", "50")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| kafka("creating a consumer", e))
}

/// The partition count of a topic.
pub fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<i32> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(md) = &md
            && let Some(t) = md.topics().iter().find(|t| t.name() == topic)
            && t.error().is_none()
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().len() as i32);
        }
        if Instant::now() > deadline {
            return Err(match md {
                // No broker answered: that passes.
                Err(e) => kafka(format!("topic `{topic}`: reading its metadata"), e),
                Ok(_) => Error::backend("kafka", format!("topic `{topic}` has no partitions (does it exist?)")),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A message whose delivery failed, kept to be sent again.
type Failed = (String, Option<Vec<u8>>, Option<Vec<u8>>);

/// Keeps the messages whose delivery failed after the client's own retries (e.g. while a
/// broker restarts), and the last error, so [`Publisher::flush`] can send them again.
#[derive(Clone, Default)]
pub struct Deliveries {
    retry: Arc<std::sync::Mutex<(Vec<Failed>, Option<String>)>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let mut retry = self.retry.lock().expect("delivery lock");
            retry.0.push((m.topic().to_string(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec)));
            retry.1 = Some(format!("{e} (topic `{}`, partition {})", m.topic(), m.partition()));
        }
    }
}

/// How [`Publisher::flush`] sends failed messages again: up to 10 rounds, waiting 0.5 s doubling
/// to 8 s between them (about a minute in all), on the generate stage's retry policy.
const REDELIVERY: crate::generate::limit::RetryPolicy = crate::generate::limit::RetryPolicy {
    max_retries: 10,
    base: Duration::from_millis(500),
    max_delay: Duration::from_secs(8),
};

/// A producer whose failed deliveries are sent again: a batch is published only once
/// [`Publisher::flush`] reports every message delivered. A message sent again may reach a
/// topic twice (identical bytes, same key, epoch and sequence number), which the consumer
/// dedupe contract (README, stream section) already covers.
pub struct Publisher {
    producer: BaseProducer<Deliveries>,
    deliveries: Deliveries,
}

impl Publisher {
    pub fn new(conn: &Connection) -> Result<Self> {
        let deliveries = Deliveries::default();
        let producer = client_config(conn)
            .set("enable.idempotence", "false")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "120000")
            .create_with_context(deliveries.clone())
            .map_err(|e| kafka("creating a producer", e))?;
        Ok(Publisher { producer, deliveries })
    }

    /// Queues one message, waiting while the client's queue is full.
    pub fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
        self.send_bytes(topic, Some(key.as_bytes()), Some(payload))
    }

    fn send_bytes(&self, topic: &str, key: Option<&[u8]>, payload: Option<&[u8]>) -> Result<()> {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = payload {
            record = record.payload(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::ZERO);
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(kafka(format!("producing to `{topic}`"), e)),
            }
        }
    }

    /// Serves delivery reports without blocking.
    pub fn poll(&self) {
        self.producer.poll(Duration::ZERO);
    }

    /// Waits until the client holds no message (each delivered or reported failed). The
    /// client's own `flush` polls in steps of 100 ms that always run to their end (and a
    /// shorter poll spins on the clock), which cost every publication a tenth of a second;
    /// this serves what is there and sleeps half a millisecond between looks.
    fn drain(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.producer.poll(Duration::ZERO);
            let left = self.producer.in_flight_count();
            if left == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::unavailable(
                    "kafka",
                    format!("{left} messages still undelivered after {timeout:?}"),
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Waits until every queued message is delivered, sending failed ones again with backoff;
    /// fails, naming the last error, if some are still undelivered after `REDELIVERY`'s
    /// rounds.
    pub fn flush(&self) -> Result<()> {
        for round in 0..=REDELIVERY.max_retries {
            self.drain(Duration::from_secs(180))?;
            let (failed, last) = {
                let mut retry = self.deliveries.retry.lock().expect("delivery lock");
                (std::mem::take(&mut retry.0), retry.1.take())
            };
            if failed.is_empty() {
                return Ok(());
            }
            if round == REDELIVERY.max_retries {
                return Err(Error::unavailable(
                    "kafka",
                    format!(
                        "{} messages were not delivered after {} redeliveries; last error: {}",
                        failed.len(),
                        REDELIVERY.max_retries,
                        last.unwrap_or_default()
                    ),
                ));
            }
            // The full delay (no jitter): a broker coming back needs the time.
            let backoff = REDELIVERY.delay(round, 1.0);
            eprintln!(
                "candor stream: {} deliveries failed ({}); sending them again in {:?}",
                failed.len(),
                last.unwrap_or_default(),
                backoff
            );
            std::thread::sleep(backoff);
            for (topic, key, payload) in &failed {
                self.send_bytes(topic, key.as_deref(), payload.as_deref())?;
            }
        }
        unreachable!("the last round returns")
    }
}

/// One message read back from a topic.
#[derive(Clone, Debug)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The message's timestamp (ms since the epoch), when it has one.
    pub timestamp: Option<i64>,
}

/// Produces keyed messages and waits for them (for tests, tools and the benchmark).
pub fn produce_all(conn: &Connection, topic: &str, messages: &[(String, Vec<u8>)]) -> Result<()> {
    let p = Publisher::new(conn)?;
    for (k, v) in messages {
        p.send(topic, k, v)?;
    }
    p.flush()
}

/// Reads a whole topic from the beginning, stopping after `idle` without a new message (or
/// once `expect` messages are in). A plain consumer: the raw rate the benchmark compares to.
pub fn read_all(conn: &Connection, topic: &str, idle: Duration, expect: Option<usize>) -> Result<Vec<Record>> {
    let c = consumer(conn, &format!("candor-read-{}", std::process::id()))?;
    let n = partitions(&c, topic)?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition_offset(topic, p, Offset::Beginning).map_err(|e| kafka("assigning", e))?;
    }
    c.assign(&tpl).map_err(|e| kafka("assigning", e))?;
    let mut out = Vec::new();
    let mut last = Instant::now();
    while last.elapsed() < idle && expect.is_none_or(|e| out.len() < e) {
        match c.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => {
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    timestamp: m.timestamp().to_millis(),
                });
                last = Instant::now();
            }
            Some(Err(e)) => eprintln!("reading `{topic}`: {e}"),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_away_are_transient_and_other_kafka_errors_are_not() {
        let away = kafka("creating topics", KafkaError::AdminOp(RDKafkaErrorCode::OperationTimedOut));
        assert_eq!((away.kind(), away.transient()), (crate::error::Domain::External, true));
        assert!(away.retry_hint().is_some());
        let down = kafka("reading metadata", KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown));
        assert!(down.transient(), "{down}");
        let refused =
            kafka("producing to `t`", KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed));
        assert_eq!((refused.kind(), refused.transient()), (crate::error::Domain::External, false));
    }
}
