//! The Kafka side of cluster mode's durable log: the one place that turns
//! `[kafka]` settings into client configurations, the topic's creation, and
//! the start-up check that the topic keeps every acked message.
//! The producer (`KafkaSink`), the persist workers' consumers, the seeding
//! scan ([`super::kafka_scan`]) and the admin client all start from
//! [`client_config`], so a connection setting added here (or in
//! `[kafka.client]`) reaches every client.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, ConfigResource, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaSettings;
use crate::error::ChatError;

/// How long a metadata request may take (readiness, topic creation, the
/// seeding scan's requests).
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(3);

/// How long the start-up check may wait for the new topic's metadata: a
/// topic just created takes a moment to have leaders everywhere.
const TOPIC_SETTLE: Duration = Duration::from_secs(10);

/// The `min.insync.replicas` the node asks for: with 2, an acked record is
/// on at least two brokers, so the loss of any one keeps it.
const MIN_INSYNC_REPLICAS: i32 = 2;

/// Properties that name the CA certificates TLS verifies the brokers with.
const CA_PROPERTIES: [&str; 3] = ["ssl.ca.location", "ssl.ca.pem", "ssl.ca.certificate.stores"];

/// What every Kafka client of the node shares: the `[kafka.client]`
/// properties, and where the brokers are.
pub fn client_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    // The OpenSSL built into librdkafka looks for CA certificates under
    // its own build's prefix, where no system has them: unless told where
    // they are, librdkafka probes the usual system locations (used only
    // when a client speaks TLS).
    if !settings
        .client
        .iter()
        .any(|(k, _)| CA_PROPERTIES.contains(&k.trim()))
    {
        config.set("ssl.ca.location", "probe");
    }
    for (key, value) in settings.client.iter() {
        config.set(key, value);
    }
    // The settings check refuses these in [kafka.client]; set last anyway.
    config.set("bootstrap.servers", &settings.brokers);
    config
}

/// The error of creating or using a Kafka client, for logs and start-up
/// messages. librdkafka quotes an invalid property's value, and those of
/// `[kafka.client]` may be secrets: each of them is blanked out.
pub fn client_error(settings: &KafkaSettings, doing: &str, e: &KafkaError) -> ChatError {
    let text = match e {
        KafkaError::ClientConfig(_, description, key, _) => {
            format!("invalid client property `{key}`: {description}")
        }
        other => other.to_string(),
    };
    ChatError::Unavailable(format!(
        "kafka: cannot {doing}: {}",
        redact(settings, &text)
    ))
}

/// `text` with every `[kafka.client]` value replaced.
fn redact(settings: &KafkaSettings, text: &str) -> String {
    let mut values: Vec<&str> = settings
        .client
        .iter()
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty())
        .collect();
    // Longest first, so a value that contains another goes whole.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
        .into_iter()
        .fold(text.to_string(), |t, v| t.replace(v, "<redacted>"))
}

/// The settings the node gives a topic it creates: at most as many
/// in-sync replicas required as there are replicas (more would refuse
/// every record), and never an out-of-sync replica as leader.
pub fn created_topic_config(replication_factor: i32) -> Vec<(&'static str, String)> {
    vec![
        (
            "min.insync.replicas",
            MIN_INSYNC_REPLICAS
                .min(replication_factor)
                .max(1)
                .to_string(),
        ),
        ("unclean.leader.election.enable", "false".to_string()),
    ]
}

/// The node's admin client.
fn admin(settings: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, ChatError> {
    client_config(settings)
        .create()
        .map_err(|e| client_error(settings, "create the admin client", &e))
}

/// Creates the topic unless it exists: the configured partitions and
/// replication factor, and [`created_topic_config`].
async fn ensure_topic(
    settings: &KafkaSettings,
    admin: &AdminClient<DefaultClientContext>,
) -> Result<(), ChatError> {
    let config = created_topic_config(settings.replication_factor);
    let topic = config.iter().fold(
        NewTopic::new(
            &settings.topic,
            settings.partitions,
            TopicReplication::Fixed(settings.replication_factor),
        ),
        |topic, (key, value)| topic.set(key, value),
    );
    let opts = AdminOptions::new().operation_timeout(Some(METADATA_TIMEOUT));
    let results = admin
        .create_topics([&topic], &opts)
        .await
        .map_err(|e| client_error(settings, "create the topic", &e))?;
    for result in results {
        match result {
            Ok(name) => log::info!(
                "Created Kafka topic {name} with {} partitions, replication factor {}, min.insync.replicas {}.",
                settings.partitions,
                settings.replication_factor,
                MIN_INSYNC_REPLICAS.min(settings.replication_factor).max(1)
            ),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(ChatError::Unavailable(format!(
                    "kafka: cannot create topic {name}: {code}"
                )))
            }
        }
    }
    Ok(())
}

/// The settings of a topic that decide whether an acked record survives
/// the loss of a broker, as the brokers report them; `None` when they do
/// not report one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicDurability {
    /// The fewest replicas of any partition.
    pub replication_factor: Option<i32>,
    pub min_insync_replicas: Option<i32>,
    pub unclean_leader_election: Option<bool>,
}

/// Whether a topic keeps every acked record through the loss of a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Durability {
    Safe,
    /// Each setting that could lose an acked record, with its value.
    Unsafe(Vec<String>),
}

impl Durability {
    /// The verdict on a topic's settings. With acks=all a record is acked
    /// once every in-sync replica has it, and the in-sync set may shrink to
    /// `min.insync.replicas`: below 2 the leader alone acks, and losing it
    /// loses the record. One replica is the same, whatever the minimum. An
    /// unclean election makes a replica that missed acked records leader.
    /// A setting the brokers do not report cannot be vouched for.
    pub fn judge(t: &TopicDurability) -> Durability {
        let mut unsafe_settings = Vec::new();
        match t.replication_factor {
            Some(n) if n >= 2 => {}
            Some(n) => unsafe_settings.push(format!("replication factor {n}")),
            None => unsafe_settings.push("replication factor unknown".into()),
        }
        match t.min_insync_replicas {
            Some(n) if n >= MIN_INSYNC_REPLICAS => {}
            Some(n) => unsafe_settings.push(format!("min.insync.replicas {n}")),
            None => unsafe_settings.push("min.insync.replicas unknown".into()),
        }
        match t.unclean_leader_election {
            Some(false) => {}
            Some(true) => unsafe_settings.push("unclean.leader.election.enable true".into()),
            None => unsafe_settings.push("unclean.leader.election.enable unknown".into()),
        }
        if unsafe_settings.is_empty() {
            Durability::Safe
        } else {
            Durability::Unsafe(unsafe_settings)
        }
    }

    /// `ok`, or `unsafe: ` and the settings, for `/readyz` and the log.
    pub fn describe(&self) -> String {
        match self {
            Durability::Safe => "ok".into(),
            Durability::Unsafe(settings) => format!("unsafe: {}", settings.join(", ")),
        }
    }
}

/// The durability of the node's topic as found at start-up, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicCheck {
    pub settings: TopicDurability,
    pub durability: Durability,
}

/// Creates the topic if it is missing and reads its durability settings,
/// judged for start-up, which refuses a topic that could lose an acked
/// record unless `kafka.allow_unsafe_durability` is set.
pub async fn prepare_topic(settings: &KafkaSettings) -> Result<TopicCheck, ChatError> {
    let admin = Arc::new(admin(settings)?);
    ensure_topic(settings, &admin).await?;
    let found = read_durability(settings, &admin).await?;
    let durability = Durability::judge(&found);
    if let (Some(min), Some(rf)) = (found.min_insync_replicas, found.replication_factor) {
        if min > rf {
            log::warn!(
                "Kafka topic {}: min.insync.replicas {min} is above its replication factor {rf}: Kafka 4 requires only {rf} in sync, older brokers refuse every message (NOT_ENOUGH_REPLICAS) and every send answers `unavailable`.",
                settings.topic
            );
        }
    }
    Ok(TopicCheck {
        settings: found,
        durability,
    })
}

/// The topic's replication factor (from the metadata) and its
/// `min.insync.replicas` and `unclean.leader.election.enable` (from
/// DescribeConfigs, which reports the broker's default where the topic has
/// none of its own).
async fn read_durability(
    settings: &KafkaSettings,
    admin: &Arc<AdminClient<DefaultClientContext>>,
) -> Result<TopicDurability, ChatError> {
    let replication_factor = replication_factor(settings, admin.clone()).await?;
    let opts = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
    let deadline = tokio::time::Instant::now() + TOPIC_SETTLE;
    // A broker that has not caught up with a topic just created describes
    // it without its settings (or not at all): ask again for a while.
    loop {
        let described = admin
            .describe_configs([&ResourceSpecifier::Topic(&settings.topic)], &opts)
            .await
            .map_err(|e| client_error(settings, "describe the topic's settings", &e));
        let found = match described.map(|d| d.into_iter().next()) {
            Ok(Some(Ok(resource))) => Ok(durability_of(&resource, replication_factor)),
            Ok(Some(Err(code))) => Err(ChatError::Unavailable(format!(
                "kafka: cannot describe the settings of topic {}: {code}",
                settings.topic
            ))),
            Ok(None) => Err(ChatError::Unavailable(format!(
                "kafka: no settings described for topic {}",
                settings.topic
            ))),
            Err(e) => Err(e),
        };
        let complete = matches!(&found, Ok(t) if t.min_insync_replicas.is_some()
            && t.unclean_leader_election.is_some());
        if complete || tokio::time::Instant::now() >= deadline {
            // Brokers that answer but will not describe the topic (no
            // DescribeConfigs permission, say) leave its settings unknown,
            // which the check treats as unsafe.
            return Ok(found.unwrap_or_else(|e| {
                log::warn!(
                    "Cannot read the settings of Kafka topic {}: {}; taking them as unknown.",
                    settings.topic,
                    e.detail()
                );
                TopicDurability {
                    replication_factor,
                    min_insync_replicas: None,
                    unclean_leader_election: None,
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn durability_of(resource: &ConfigResource, replication_factor: Option<i32>) -> TopicDurability {
    let value = |name: &str| resource.get(name).and_then(|e| e.value.clone());
    TopicDurability {
        replication_factor,
        min_insync_replicas: value("min.insync.replicas").and_then(|v| v.trim().parse().ok()),
        unclean_leader_election: value("unclean.leader.election.enable")
            .and_then(|v| v.trim().parse().ok()),
    }
}

/// The fewest replicas of any partition of the topic, asking again while
/// a topic just created has no partitions in the metadata yet.
async fn replication_factor(
    settings: &KafkaSettings,
    admin: Arc<AdminClient<DefaultClientContext>>,
) -> Result<Option<i32>, ChatError> {
    let topic = settings.topic.clone();
    let read = tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + TOPIC_SETTLE;
        loop {
            let metadata = admin.inner().fetch_metadata(Some(&topic), METADATA_TIMEOUT);
            let found = metadata.as_ref().ok().and_then(|m| {
                m.topics()
                    .iter()
                    .find(|t| t.name() == topic && t.error().is_none())
                    .filter(|t| !t.partitions().is_empty())
                    .and_then(|t| {
                        t.partitions()
                            .iter()
                            .map(|p| i32::try_from(p.replicas().len()).unwrap_or(i32::MAX))
                            .min()
                    })
            });
            match (found, metadata) {
                (Some(n), _) => return Ok(Some(n)),
                (None, Err(e)) if std::time::Instant::now() >= deadline => return Err(e),
                (None, Ok(_)) if std::time::Instant::now() >= deadline => return Ok(None),
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .await
    .map_err(|e| ChatError::Internal(e.to_string()))?;
    read.map_err(|e| client_error(settings, "read the topic's metadata", &e))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::config::KafkaClientProperties;

    fn settings(client: KafkaClientProperties) -> KafkaSettings {
        KafkaSettings {
            brokers: "127.0.0.1:1".into(),
            topic: "t".into(),
            partitions: 1,
            replication_factor: 3,
            allow_unsafe_durability: false,
            client,
            linger_ms: 2,
            message_timeout_ms: 1000,
            group: "g".into(),
            persist_workers: 1,
        }
    }

    fn topic(rf: Option<i32>, min: Option<i32>, unclean: Option<bool>) -> TopicDurability {
        TopicDurability {
            replication_factor: rf,
            min_insync_replicas: min,
            unclean_leader_election: unclean,
        }
    }

    fn judged(rf: Option<i32>, min: Option<i32>, unclean: Option<bool>) -> String {
        Durability::judge(&topic(rf, min, unclean)).describe()
    }

    /// The TLS and SASL mechanisms that managed Kafka services ask for are
    /// built into librdkafka.
    #[test]
    fn librdkafka_is_built_with_tls_and_sasl() {
        let features = ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for wanted in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(features.contains(&wanted), "{wanted} in {features:?}");
        }
    }

    #[test]
    fn replicated_topics_with_two_in_sync_replicas_and_clean_elections_are_safe() {
        assert_eq!(judged(Some(3), Some(2), Some(false)), "ok");
        assert_eq!(judged(Some(5), Some(3), Some(false)), "ok");
        // Two replicas that must both ack: no acked record is lost, sends
        // stop while one broker is away.
        assert_eq!(judged(Some(2), Some(2), Some(false)), "ok");
    }

    #[test]
    fn a_single_replica_is_unsafe() {
        assert_eq!(
            judged(Some(1), Some(2), Some(false)),
            "unsafe: replication factor 1"
        );
    }

    #[test]
    fn fewer_than_two_in_sync_replicas_are_unsafe() {
        assert_eq!(
            judged(Some(3), Some(1), Some(false)),
            "unsafe: min.insync.replicas 1"
        );
        assert_eq!(
            judged(Some(3), Some(0), Some(false)),
            "unsafe: min.insync.replicas 0"
        );
    }

    #[test]
    fn unclean_leader_election_is_unsafe() {
        assert_eq!(
            judged(Some(3), Some(2), Some(true)),
            "unsafe: unclean.leader.election.enable true"
        );
    }

    #[test]
    fn every_unsafe_setting_is_named() {
        assert_eq!(
            judged(Some(1), Some(1), Some(true)),
            "unsafe: replication factor 1, min.insync.replicas 1, unclean.leader.election.enable true"
        );
    }

    #[test]
    fn settings_the_brokers_do_not_report_are_unsafe() {
        assert_eq!(
            judged(None, None, None),
            "unsafe: replication factor unknown, min.insync.replicas unknown, unclean.leader.election.enable unknown"
        );
        assert_eq!(
            judged(Some(3), None, Some(false)),
            "unsafe: min.insync.replicas unknown"
        );
    }

    #[test]
    fn created_topics_ask_for_two_in_sync_replicas_when_they_have_them() {
        let min = |rf| {
            created_topic_config(rf)
                .into_iter()
                .find(|(k, _)| *k == "min.insync.replicas")
                .map(|(_, v)| v)
                .unwrap()
        };
        assert_eq!(min(1), "1");
        assert_eq!(min(2), "2");
        assert_eq!(min(3), "2");
        assert_eq!(min(5), "2");
        for rf in [1, 3] {
            assert!(created_topic_config(rf)
                .contains(&("unclean.leader.election.enable", "false".to_string())));
        }
    }

    #[test]
    fn client_properties_reach_the_client_config() {
        let s = settings(KafkaClientProperties::from([
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
        ]));
        let config = client_config(&s);
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert_eq!(config.get("bootstrap.servers"), Some("127.0.0.1:1"));
        assert_eq!(config.get("ssl.ca.location"), Some("probe"));
        let own = settings(KafkaClientProperties::from([(
            "ssl.ca.location",
            "/etc/kafka/ca.pem",
        )]));
        assert_eq!(
            client_config(&own).get("ssl.ca.location"),
            Some("/etc/kafka/ca.pem")
        );
        // Such clients can be created (the probe runs only with TLS).
        client_config(&settings(KafkaClientProperties::default()))
            .create::<AdminClient<DefaultClientContext>>()
            .unwrap();
    }

    #[test]
    fn client_errors_never_quote_a_property_value() {
        // librdkafka refuses the value and quotes it in its message.
        let s = settings(KafkaClientProperties::from([
            ("sasl.password", "hunter2-secret"),
            ("security.protocol", "hunter2-secret-protocol"),
        ]));
        let Err(e) = client_config(&s).create::<AdminClient<DefaultClientContext>>() else {
            panic!("an invalid security.protocol is refused");
        };
        let shown = client_error(&s, "create the admin client", &e).detail();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("security.protocol"), "{shown}");
        let e = admin(&s).err().unwrap().detail();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
