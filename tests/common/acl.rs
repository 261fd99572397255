//! Clients of the roles in `deploy/nats-server.conf` that hear the server's permission
//! errors, so a refusal is proven by the server's `Permissions Violation` answer, never by a
//! silence or a timeout.

use std::time::Duration;

use tokio::sync::mpsc;

use super::NatsServer;

/// User, password and reply inbox prefix of a role in `deploy/nats-server.conf`.
pub type Role = (&'static str, &'static str, &'static str);
pub const WORKER: Role = ("worker", "worker-change-me", "_INBOX_worker");
pub const ADAPTER: Role = ("adapter-shop", "adapter-change-me", "_INBOX_adapter_shop");
pub const MISSION_CONTROL: Role = (
    "mission-control",
    "mission-control-change-me",
    "_INBOX_mission_control",
);

/// A client of `role` and the server errors it is told about.
pub async fn connect(
    nats: &NatsServer,
    (user, password, inbox): Role,
) -> (async_nats::Client, Violations) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = nats
        .client_with(
            async_nats::ConnectOptions::with_user_and_password(
                user.to_string(),
                password.to_string(),
            )
            .custom_inbox_prefix(inbox)
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    if let async_nats::Event::ServerError(err) = event {
                        let _ = tx.send(err.to_string());
                    }
                }
            }),
        )
        .await;
    (
        client,
        Violations {
            rx,
            seen: Vec::new(),
        },
    )
}

/// The server errors one client received.
pub struct Violations {
    rx: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Violations {
    /// Waits (≤ 10 s) for the server's permission error on `subject` for `what`
    /// (`Publish` or `Subscription`); fails the test with what was seen instead.
    pub async fn expect(&mut self, what: &str, subject: &str) {
        let wanted = |m: &String| {
            m.to_ascii_lowercase().contains("permissions violation")
                && m.contains(what)
                && m.contains(&format!("\"{subject}\""))
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(i) = self.seen.iter().position(wanted) {
                self.seen.remove(i);
                return;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(message)) => self.seen.push(message),
                _ => panic!(
                    "no permission error for {what} to {subject:?}; server errors seen: {:?}",
                    self.seen
                ),
            }
        }
    }
}

impl Violations {
    /// Every server error this client got that no [`Violations::expect`] claimed (those
    /// still queued included): empty when nothing unexpected was refused.
    #[allow(dead_code)]
    pub fn unclaimed(&mut self) -> Vec<String> {
        while let Ok(message) = self.rx.try_recv() {
            self.seen.push(message);
        }
        self.seen.clone()
    }
}

/// Publishes to `subject` and waits for the server's refusal.
pub async fn publish_denied(client: &async_nats::Client, v: &mut Violations, subject: &str) {
    client
        .publish(subject.to_string(), "{}".into())
        .await
        .expect("the publish call itself returns");
    client.flush().await.expect("flush");
    v.expect("Publish", subject).await;
}

/// Subscribes to `subject` and waits for the server's refusal.
pub async fn subscribe_denied(client: &async_nats::Client, v: &mut Violations, subject: &str) {
    // The client may or may not hand back a subscriber: the server's answer is what counts.
    let _ = client.subscribe(subject.to_string()).await;
    client.flush().await.expect("flush");
    v.expect("Subscription", subject).await;
}
